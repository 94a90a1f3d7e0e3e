/* testutil.h — helpers shared by the cmocka tests. */
#ifndef MT_TESTUTIL_H
#define MT_TESTUTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "formats/safetensors.h"
#include "model/model.h"
#include "plugin/registry.h"

/* Deterministic xorshift64* stream for test data. */
uint64_t mt_test_rand_u64(uint64_t *state);
float mt_test_rand_uniform(uint64_t *state, float lo, float hi);
void mt_test_fill_uniform(float *x, size_t n, uint64_t *state, float lo, float hi);

/* Relative error of a tensor against a reference: max |a - ref| / max |ref|
 * (element-wise relative error is meaningless for entries near zero). Returns
 * the absolute max error when the reference is all zero. */
double mt_test_rel_err(const float *a, const float *ref, size_t n);
double mt_test_rel_err_d(const double *a, const double *ref, size_t n);

/* A fresh directory under $TMPDIR (or /tmp); the caller frees the string. */
char *mt_test_tmpdir(const char *tag);
/* Writes bytes to a file; fails the test on error. */
void mt_test_write_file(const char *path, const void *data, size_t n);
/* Recursively removes a directory made by mt_test_tmpdir. */
void mt_test_rmtree(const char *path);

/* The SmolLM2-135M-Instruct GGUF that scripts/fetch-model caches:
 * $MOONTUNE_SMOLLM2_GGUF, else ~/.cache/moontune/SmolLM2-135M-Instruct.Q4_1.gguf.
 * NULL when absent; but when MOONTUNE_REQUIRE_MODEL is set (scripts/test sets it, so
 * CI does) an absent file fails the test instead of skipping it. */
const char *mt_test_smollm2_gguf(void);

/* The tokenizer corpus (tests/fixtures/tokenizer/corpus.txt), one sample a line, with
 * the escapes \n \t \r \\ (any other backslash is literal) undone. */
typedef struct mt_test_corpus {
    char **line;
    size_t *len;
    size_t n;
} mt_test_corpus;

void mt_test_corpus_load(mt_test_corpus *c);
void mt_test_corpus_free(mt_test_corpus *c);

/* A tensor of a reference file as float32 (any stored float dtype), newly allocated;
 * fails the test when it is missing. numel may be NULL. */
float *mt_test_read_f32(const mt_safetensors *st, const char *name, size_t *numel);

/* A standard plugin of this build (MT_BUILD_DIR/plugins/NAME.so); fails the test when it
 * does not load. */
mt_plugin *mt_test_load_plugin(const char *name);

/* A scalar of a reference file (its first value). */
double mt_test_read_scalar(const mt_safetensors *st, const char *name);

/* Sets every trainable parameter of m to the reference tensor <prefix><name> (the
 * model must have `expect` of them); fails the test on a missing or misshapen one. */
void mt_test_load_trainable(mt_model *m, const mt_safetensors *ref, const char *prefix, size_t expect);

/* Attaches the LoRA of the parity fixtures (r 4, alpha 8, all-linear) to tiny_gqa model
 * m, with the init.<name> values of tests/fixtures/lora/reference.safetensors (lora_ref);
 * returns the adapter's instance, which the caller frees after the model. */
mt_plugin_instance *mt_test_attach_reference_lora(mt_model *m, const mt_plugin *lora,
                                                  const mt_safetensors *lora_ref);

/* Every trainable gradient of the model in one new host array, in
 * mt_model_trainable_params order; *total receives its length. */
float *mt_test_all_grads(mt_model *m, size_t *total);

/* Checks |got - ref| <= tol · max(|ref|, 1) (relative for large values, absolute below
 * 1, where sums of fp32 log-probabilities carry absolute rounding) and prints the pair. */
void mt_test_check_close(const char *what, double got, double ref, double tol);

#endif
