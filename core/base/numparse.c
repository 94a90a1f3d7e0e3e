/* numparse.c — see numparse.h. */
#include "base/numparse.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/internal.h"

const mt_int_limit MT_LIMIT_SEQ_LEN = {"seq_len", 2, 1 << 20};
const mt_int_limit MT_LIMIT_BATCH = {"batch", 1, 65536};
const mt_int_limit MT_LIMIT_MAX_NEW_TOKENS = {"max_new_tokens", 0, 1 << 20};
const mt_int_limit MT_LIMIT_PROMPT_TOKENS = {"prompt", 0, 1 << 20};
const mt_int_limit MT_LIMIT_TOP_K = {"top_k", 0, INT32_MAX};
const mt_int_limit MT_LIMIT_THREADS = {"threads", 0, 1024};
const mt_int_limit MT_LIMIT_GENERATE_SLOTS = {"batch", 1, 4096};
/* bench runs warmup + steps in an int loop and divides by steps: both bounded so the
 * sum cannot overflow, steps >= 1 so the average exists */
const mt_int_limit MT_LIMIT_BENCH_STEPS = {"steps", 1, 1000000};
const mt_int_limit MT_LIMIT_BENCH_WARMUP = {"warmup", 0, 1000000};
const mt_real_limit MT_LIMIT_TEMPERATURE = {"temperature", 0.0, 1000.0, 0, 0};
const mt_real_limit MT_LIMIT_TOP_P = {"top_p", 0.0, 1.0, 1, 0};
const mt_real_limit MT_LIMIT_FRACTION = {"fraction", 0.0, 1.0, 0, 1};

static const char *name_of(const char *name, const char *what) { return name ? name : what; }

/* strtoll/strtod accept leading blanks and a sign on unsigned parsing; we refuse blanks
 * anywhere, so "1 " and " 1" are errors like "1x". */
static int blank_or_empty(const char *text) {
    return !text || !*text || isspace((unsigned char)text[0]) ||
           isspace((unsigned char)text[strlen(text) - 1]);
}

mt_status mt_check_int(const char *name, int64_t v, const mt_int_limit *lim, mt_error *err) {
    if (v < lim->min || v > lim->max)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: %" PRId64 " is out of range (expected an integer from %" PRId64
                            " to %" PRId64 ")",
                            name_of(name, lim->what), v, lim->min, lim->max);
    return MT_OK;
}

mt_status mt_parse_int(const char *name, const char *text, const mt_int_limit *lim, int64_t *out,
                       mt_error *err) {
    const char *shown = name_of(name, lim->what);
    if (blank_or_empty(text))
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: '%s' is not an integer (expected one from %" PRId64 " to %" PRId64 ")",
                            shown, text ? text : "", lim->min, lim->max);
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (*end)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: '%s' is not an integer (expected one from %" PRId64 " to %" PRId64 ")",
                            shown, text, lim->min, lim->max);
    if (errno == ERANGE || v < lim->min || v > lim->max)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: '%s' is out of range (expected an integer from %" PRId64 " to %" PRId64 ")",
                            shown, text, lim->min, lim->max);
    *out = (int64_t)v;
    return MT_OK;
}

static mt_status real_range_error(const char *shown, const char *text, const mt_real_limit *lim,
                                  const char *why, mt_error *err) {
    return mt_error_set(err, MT_ERR_INVALID_ARG, "%s: %s %s (expected a number %s %g and %s %g)",
                        shown, text, why, lim->min_open ? ">" : ">=", lim->min,
                        lim->max_open ? "<" : "<=", lim->max);
}

static int outside(double v, const mt_real_limit *lim) {
    return v < lim->min || (lim->min_open && v == lim->min) || v > lim->max ||
           (lim->max_open && v == lim->max);
}

/* The shortest %g text that reads back as v, so an error shows "0.1" for 0.1 and not
 * "0.10000000000000001", yet never rounds an out-of-range value onto the bound. */
static void shortest(char *buf, size_t size, double v) {
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, size, "%.*g", prec, v);
        if (!isfinite(v) || strtod(buf, NULL) == v) return;
    }
}

mt_status mt_check_real(const char *name, double v, const mt_real_limit *lim, mt_error *err) {
    char text[64];
    shortest(text, sizeof text, v);
    const char *shown = name_of(name, lim->what);
    if (!isfinite(v)) return real_range_error(shown, text, lim, "is not finite", err);
    if (outside(v, lim)) return real_range_error(shown, text, lim, "is out of range", err);
    return MT_OK;
}

mt_status mt_parse_real(const char *name, const char *text, const mt_real_limit *lim, double *out,
                        mt_error *err) {
    const char *shown = name_of(name, lim->what);
    char quoted[96];
    snprintf(quoted, sizeof quoted, "'%s'", text ? text : "");
    if (blank_or_empty(text)) return real_range_error(shown, quoted, lim, "is not a number", err);
    char *end = NULL;
    errno = 0;
    double v = strtod(text, &end);
    /* strtod also reads C99 hex floats ("0x1p-1"); the text users give is decimal */
    if (*end || strpbrk(text, "xX"))
        return real_range_error(shown, quoted, lim, "is not a decimal number", err);
    /* ERANGE: past DBL_MAX (inf) or so close to 0 that it rounded to 0; either way the
     * value used would not be the value written */
    if (errno == ERANGE && (isinf(v) || v == 0))
        return real_range_error(shown, quoted, lim, "is out of range", err);
    if (!isfinite(v)) return real_range_error(shown, quoted, lim, "is not finite", err);
    if (outside(v, lim)) return real_range_error(shown, quoted, lim, "is out of range", err);
    *out = v;
    return MT_OK;
}

mt_status mt_parse_u64(const char *name, const char *text, uint64_t *out, mt_error *err) {
    const char *shown = name ? name : "seed";
    if (blank_or_empty(text) || text[0] == '-' || text[0] == '+')
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: '%s' is not an unsigned integer (expected 0 to 18446744073709551615)",
                            shown, text ? text : "");
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (*end || errno == ERANGE)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: '%s' is not an unsigned integer (expected 0 to 18446744073709551615)",
                            shown, text);
    *out = (uint64_t)v;
    return MT_OK;
}

/* v (within lim) as a float; `shown` is v as the error quotes it. */
static mt_status to_float(const char *name, const char *shown, double v, const mt_real_limit *lim,
                          float *out, mt_error *err) {
    float f = (float)v;
    if (!isfinite(f) || (v != 0 && f == 0) || outside((double)f, lim))
        return real_range_error(name_of(name, lim->what), shown, lim,
                                "is out of range for a 32-bit float", err);
    *out = f;
    return MT_OK;
}

mt_status mt_check_float(const char *name, double v, const mt_real_limit *lim, float *out,
                         mt_error *err) {
    mt_status st = mt_check_real(name, v, lim, err);
    if (st) return st;
    char text[64];
    shortest(text, sizeof text, v);
    return to_float(name, text, v, lim, out, err);
}

mt_status mt_check_seed(const char *name, int64_t v, uint64_t *out, mt_error *err) {
    if (v < 0)
        return mt_error_set(err, MT_ERR_INVALID_ARG,
                            "%s: %" PRId64 " is out of range (expected an integer from 0 to "
                            "18446744073709551615)",
                            name ? name : "seed", v);
    *out = (uint64_t)v;
    return MT_OK;
}

mt_status mt_parse_int_into(const char *name, const char *text, const mt_int_limit *lim, int *out,
                            mt_error *err) {
    int64_t v = 0;
    mt_status st = mt_parse_int(name, text, lim, &v, err);
    if (st == MT_OK) *out = (int)v; /* every shared limit lies within int */
    return st;
}

mt_status mt_parse_float_into(const char *name, const char *text, const mt_real_limit *lim,
                              float *out, mt_error *err) {
    double v = 0;
    mt_status st = mt_parse_real(name, text, lim, &v, err);
    if (st == MT_OK) {
        char quoted[96];
        snprintf(quoted, sizeof quoted, "'%s'", text);
        st = to_float(name, quoted, v, lim, out, err);
    }
    return st;
}
