/* numparse.h — one parser for every number a user gives (command-line values, Lua
 * options): whole text, no silent 32-bit truncation, no NaN or infinity, each with the
 * accepted range in the error. The limits shared by the commands and the Lua API are
 * here too, so both accept exactly the same values (docs/limits.md). */
#ifndef MT_CORE_NUMPARSE_H
#define MT_CORE_NUMPARSE_H

#include <stdint.h>

#include "moontune/moontune.h"

/* A named integer range, e.g. {"seq_len", 2, 1 << 20}. */
typedef struct mt_int_limit {
    const char *what; /* shown in errors when the caller gives no name */
    int64_t min, max;
} mt_int_limit;

/* A named range of finite reals; min_open / max_open: that bound itself is excluded. */
typedef struct mt_real_limit {
    const char *what;
    double min, max;
    int min_open, max_open;
} mt_real_limit;

extern const mt_int_limit MT_LIMIT_SEQ_LEN;        /* 2 .. 1048576 tokens per row */
extern const mt_int_limit MT_LIMIT_BATCH;          /* 1 .. 65536 rows */
extern const mt_int_limit MT_LIMIT_MAX_NEW_TOKENS; /* 0 .. 1048576 */
extern const mt_int_limit MT_LIMIT_PROMPT_TOKENS;   /* 0 .. 1048576 tokens without a target */
extern const mt_int_limit MT_LIMIT_TOP_K;          /* 0 (off) .. 2^31-1 */
extern const mt_int_limit MT_LIMIT_THREADS;        /* 0 (default) .. 1024 */
extern const mt_int_limit MT_LIMIT_GENERATE_SLOTS; /* 1 .. 4096 sequences decoded together */
extern const mt_int_limit MT_LIMIT_BENCH_STEPS;    /* 1 .. 1000000 timed steps */
extern const mt_int_limit MT_LIMIT_BENCH_WARMUP;   /* 0 .. 1000000 untimed steps first */
extern const mt_real_limit MT_LIMIT_TEMPERATURE;   /* 0 (greedy) .. 1000 */
extern const mt_real_limit MT_LIMIT_TOP_P;         /* (0, 1] */
extern const mt_real_limit MT_LIMIT_FRACTION;      /* [0, 1) */

/* Parses all of `text` as a decimal integer within lim; `name` (e.g. "--seq") names
 * the value in the error: "--seq: '4294967298' is out of range (expected an integer
 * from 2 to 1048576)". */
mt_status mt_parse_int(const char *name, const char *text, const mt_int_limit *lim, int64_t *out,
                       mt_error *err);
/* Parses all of `text` as a finite real within lim. */
mt_status mt_parse_real(const char *name, const char *text, const mt_real_limit *lim, double *out,
                        mt_error *err);
/* Parses all of `text` as an unsigned 64-bit decimal integer (a seed). */
mt_status mt_parse_u64(const char *name, const char *text, uint64_t *out, mt_error *err);
/* The same range checks on a value that is already a number (the Lua API). */
mt_status mt_check_int(const char *name, int64_t v, const mt_int_limit *lim, mt_error *err);
mt_status mt_check_real(const char *name, double v, const mt_real_limit *lim, mt_error *err);

/* A real already checked against lim, as the float the sampler uses: refused when the
 * rounding to float leaves lim or turns a non-zero value into 0 (top_p 1e-50 would
 * otherwise become 0, a value the limit excludes). */
mt_status mt_check_float(const char *name, double v, const mt_real_limit *lim, float *out,
                         mt_error *err);
/* A seed from a value that is already a signed 64-bit integer (the Lua API): negative
 * seeds are refused, as the command refuses "-1", instead of wrapping to 2^64 - 1. */
mt_status mt_check_seed(const char *name, int64_t v, uint64_t *out, mt_error *err);

/* mt_parse_int / mt_parse_real into an int / a float (the limits fit them). */
mt_status mt_parse_int_into(const char *name, const char *text, const mt_int_limit *lim, int *out,
                         mt_error *err);
mt_status mt_parse_float_into(const char *name, const char *text, const mt_real_limit *lim,
                           float *out, mt_error *err);

#endif
