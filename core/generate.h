/* generate.h — text generation with a key/value cache, for one sequence.
 *
 * The training forward (mt_model_forward) plans full (B,T) activations and keeps no
 * cache; generation runs its own incremental decoder over the same parameters: a
 * prefill of the prompt, then one token at a time, each new token attending to the
 * keys and values cached for every earlier position. Every projection goes through
 * mt_linear_forward, so attached adapters apply (put them in evaluation mode first:
 * mt_model_set_training(m, 0)). */
#ifndef MT_CORE_GENERATE_H
#define MT_CORE_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "tokenizer.h"

/* ---- the incremental decoder -------------------------------------------- */

typedef struct mt_kv_decoder mt_kv_decoder;

/* A decoder whose cache holds `capacity` positions (<= max_position_embeddings);
 * tokens are fed at most `max_rows` at a time (longer feeds are split; 0 picks 64).
 * All memory is allocated here, once. */
mt_status mt_kv_decoder_create(mt_model *m, int capacity, int max_rows, mt_kv_decoder **out,
                               mt_error *err);
void mt_kv_decoder_free(mt_kv_decoder *d);
/* Empties the cache (the next token is at position 0). */
void mt_kv_decoder_reset(mt_kv_decoder *d);
/* Number of positions in the cache. */
int mt_kv_decoder_length(const mt_kv_decoder *d);
/* Runs the decoder over tokens (n) at positions length .. length+n-1, appending their
 * keys and values to the cache. logits (V, host memory) receives the next-token
 * logits after the last of them, when not NULL. */
mt_status mt_kv_decoder_feed(mt_kv_decoder *d, const int32_t *tokens, int n, float *logits,
                             mt_error *err);

/* ---- sampling ------------------------------------------------------------ */

typedef struct mt_sampling {
    float temperature; /* <= 0: greedy (argmax) */
    int top_k;         /* keep the k most likely tokens; 0: all */
    float top_p;       /* keep the smallest set whose probability reaches top_p; >= 1: all */
    uint64_t seed;     /* of the sampler's own generator */
} mt_sampling;

/* The first index of the largest logit. */
int32_t mt_argmax(const float *logits, int V);
/* Draws a token from logits (V), as transformers does: divide by temperature, keep
 * the top_k, then the top_p nucleus, softmax, draw. logits is overwritten; work
 * holds V floats and V ints (mt_sample_work_bytes). *rng is the generator state. */
size_t mt_sample_work_bytes(int V);
int32_t mt_sample(float *logits, int V, const mt_sampling *s, uint64_t *rng, void *work);

/* ---- generation ---------------------------------------------------------- */

typedef enum mt_stop_reason {
    MT_STOP_LENGTH = 0, /* max_new_tokens generated */
    MT_STOP_EOS,        /* a stop id (EOS, end of turn) was generated */
    MT_STOP_STRING,     /* the text reached a stop string */
    MT_STOP_CALLBACK,   /* the callback asked to stop */
    MT_STOP_CONTEXT,    /* the model's context length was reached */
} mt_stop_reason;

/* Called with each new piece of text as it becomes final: whole UTF-8 characters,
 * and never text that could still turn out to begin a stop string. Returns nonzero
 * to stop generating. */
typedef int (*mt_text_callback)(void *user, const char *piece, size_t len);

typedef struct mt_generate_options {
    int max_new_tokens;
    mt_sampling sampling;
    const int32_t *stop_ids; /* generation ends at any of these (not part of the text) */
    int n_stop_ids;
    const char *const *stop_strings; /* the text ends before the first of these */
    int n_stop_strings;
    int skip_special;        /* leave special tokens out of the text */
    mt_text_callback on_text; /* or NULL */
    void *user;
} mt_generate_options;

typedef struct mt_generation {
    int32_t *ids;    /* generated ids (a final stop id included) */
    int n_ids;
    char *text;      /* decoded text of the ids, cut before a stop string; NULL without a tokenizer */
    size_t text_len;
    mt_stop_reason reason;
    int n_prompt;
    double prefill_seconds, decode_seconds; /* decode: every token after the first */
} mt_generation;

/* Generates from the prompt ids with a cache sized for prompt + max_new_tokens.
 * tok may be NULL: then there is no text, no stop strings and no callback. */
mt_status mt_generate(mt_model *m, const mt_tokenizer *tok, const int32_t *prompt, int n_prompt,
                      const mt_generate_options *opt, mt_generation *out, mt_error *err);
void mt_generation_free(mt_generation *g);

#endif /* MT_CORE_GENERATE_H */
