#define _XOPEN_SOURCE 700
#include "testutil.h"

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

uint64_t mt_test_rand_u64(uint64_t *state) {
    uint64_t x = *state ? *state : 0x9E3779B97F4A7C15ull;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1Dull;
}

float mt_test_rand_uniform(uint64_t *state, float lo, float hi) {
    double u = (double)(mt_test_rand_u64(state) >> 11) / 9007199254740992.0;
    return lo + (float)u * (hi - lo);
}

void mt_test_fill_uniform(float *x, size_t n, uint64_t *state, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = mt_test_rand_uniform(state, lo, hi);
}

double mt_test_rel_err(const float *a, const float *ref, size_t n) {
    double max_err = 0.0, max_ref = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - (double)ref[i]);
        if (!(e <= max_err)) max_err = e; /* NaN propagates as a failure */
        if (fabs((double)ref[i]) > max_ref) max_ref = fabs((double)ref[i]);
    }
    return max_ref > 0.0 ? max_err / max_ref : max_err;
}

double mt_test_rel_err_d(const double *a, const double *ref, size_t n) {
    double max_err = 0.0, max_ref = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs(a[i] - ref[i]);
        if (!(e <= max_err)) max_err = e;
        if (fabs(ref[i]) > max_ref) max_ref = fabs(ref[i]);
    }
    return max_ref > 0.0 ? max_err / max_ref : max_err;
}

char *mt_test_tmpdir(const char *tag) {
    const char *base = getenv("TMPDIR");
    if (!base || !*base) base = "/tmp";
    size_t n = strlen(base) + strlen(tag) + 32;
    char *path = malloc(n);
    assert_non_null(path);
    snprintf(path, n, "%s/mt-%s-XXXXXX", base, tag);
    assert_non_null(mkdtemp(path));
    return path;
}

void mt_test_write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void mt_test_rmtree(const char *path) { nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS); }

const char *mt_test_smollm2_gguf(void) {
    static char path[1024];
    const char *env = getenv("MOONTUNE_SMOLLM2_GGUF");
    const char *home = getenv("HOME");
    if (env && *env) snprintf(path, sizeof path, "%s", env);
    else snprintf(path, sizeof path, "%s/.cache/moontune/SmolLM2-135M-Instruct.Q4_1.gguf",
                  home ? home : "/root");
    if (access(path, R_OK) == 0) return path;
    const char *require = getenv("MOONTUNE_REQUIRE_MODEL");
    if (require && *require && strcmp(require, "0"))
        fail_msg("the SmolLM2 GGUF is required (MOONTUNE_REQUIRE_MODEL) but %s is missing: "
                 "run scripts/fetch-model", path);
    printf("  skipped: %s is not present (scripts/fetch-model fetches it)\n", path);
    return NULL;
}

void mt_test_corpus_load(mt_test_corpus *c) {
    FILE *f = fopen(MT_FIXTURE_DIR "/tokenizer/corpus.txt", "rb");
    assert_non_null(f);
    size_t cap = 0;
    c->n = 0;
    c->line = NULL;
    c->len = NULL;
    char *raw = NULL;
    size_t raw_cap = 0;
    ssize_t got;
    while ((got = getline(&raw, &raw_cap, f)) > 0) {
        if (raw[got - 1] == '\n') got--;
        if (c->n == cap) {
            cap = cap ? 2 * cap : 256;
            c->line = realloc(c->line, cap * sizeof *c->line);
            c->len = realloc(c->len, cap * sizeof *c->len);
            assert_non_null(c->line);
            assert_non_null(c->len);
        }
        char *out = malloc((size_t)got + 1);
        assert_non_null(out);
        size_t o = 0;
        for (ssize_t i = 0; i < got; i++) {
            if (raw[i] == '\\' && i + 1 < got && strchr("ntr\\", raw[i + 1])) {
                char e = raw[++i];
                out[o++] = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : '\\';
            } else {
                out[o++] = raw[i];
            }
        }
        out[o] = '\0';
        c->line[c->n] = out;
        c->len[c->n++] = o;
    }
    free(raw);
    fclose(f);
    assert_true(c->n > 0);
}

void mt_test_corpus_free(mt_test_corpus *c) {
    for (size_t k = 0; k < c->n; k++) free(c->line[k]);
    free(c->line);
    free(c->len);
}

float *mt_test_read_f32(const mt_safetensors *st, const char *name, size_t *numel) {
    const mt_st_tensor *t = mt_st_find(st, name);
    if (!t) fail_msg("reference tensor %s missing", name);
    size_t n = t->nbytes / mt_st_dtype_size(t->dtype);
    float *out = malloc(n * sizeof(float) + 1);
    assert_non_null(out);
    mt_error err = {0};
    if (mt_st_read_f32(t, out, &err)) fail_msg("%s", err.msg);
    if (numel) *numel = n;
    return out;
}

mt_plugin *mt_test_load_plugin(const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/plugins/%s.so", MT_BUILD_DIR, name);
    mt_plugin *p = NULL;
    mt_error err = {0};
    if (mt_plugin_load(path, &p, &err)) fail_msg("%s", err.msg);
    return p;
}

float *mt_test_all_grads(mt_model *m, size_t *total) {
    const mt_host *h = mt_host_table();
    mt_param_view *v;
    size_t n;
    mt_error err = {0};
    assert_int_equal(mt_model_trainable_params(m, &v, &n, &err), MT_OK);
    size_t len = 0;
    for (size_t i = 0; i < n; i++) len += (size_t)mt_tensor_numel(&v[i].grad);
    float *out = malloc(len * sizeof(float) + 1), *p = out;
    assert_non_null(out);
    for (size_t i = 0; i < n; i++) {
        if (h->tensor_download(p, &v[i].grad, &err)) fail_msg("%s", err.msg);
        p += mt_tensor_numel(&v[i].grad);
    }
    free(v);
    *total = len;
    return out;
}

void mt_test_check_close(const char *what, double got, double ref, double tol) {
    double e = fabs(got - ref) / fmax(fabs(ref), 1.0);
    printf("  %-28s %.9g reference %.9g (error %.2g)\n", what, got, ref, e);
    if (!(e <= tol)) fail_msg("%s: %.9g against %.9g: error %.3g > %.3g", what, got, ref, e, tol);
}

double mt_test_read_scalar(const mt_safetensors *st, const char *name) {
    float *v = mt_test_read_f32(st, name, NULL);
    double x = v[0];
    free(v);
    return x;
}

void mt_test_load_trainable(mt_model *m, const mt_safetensors *ref, const char *prefix, size_t expect) {
    mt_error err = {0};
    mt_param_view *v;
    size_t n;
    assert_int_equal(mt_model_trainable_params(m, &v, &n, &err), MT_OK);
    assert_int_equal(n, expect);
    for (size_t i = 0; i < n; i++) {
        char name[200];
        snprintf(name, sizeof name, "%s%s", prefix, v[i].name);
        size_t numel;
        float *val = mt_test_read_f32(ref, name, &numel);
        assert_int_equal(numel, (size_t)mt_tensor_numel(&v[i].value));
        if (mt_host_table()->tensor_upload(&v[i].value, val, &err)) fail_msg("%s", err.msg);
        free(val);
    }
    free(v);
}

mt_plugin_instance *mt_test_attach_reference_lora(mt_model *m, const mt_plugin *lora,
                                                  const mt_safetensors *lora_ref) {
    const char *all_linear[] = {"all-linear"};
    mt_kv kv[] = {{.key = "r", .type = MT_KV_NUMBER, .number = 4},
                  {.key = "alpha", .type = MT_KV_NUMBER, .number = 8},
                  {.key = "target_modules", .type = MT_KV_LIST, .list = all_linear, .list_len = 1}};
    mt_error err = {0};
    mt_plugin_instance *inst = NULL;
    if (mt_plugin_instantiate(lora, kv, 3, &inst, &err)) fail_msg("%s", err.msg);
    if (mt_model_attach_adapter(m, inst->desc->vtable, inst->state, &err)) fail_msg("%s", err.msg);
    mt_test_load_trainable(m, lora_ref, "init.", 28); /* 2 layers x 7 projections x (A, B) */
    return inst;
}
