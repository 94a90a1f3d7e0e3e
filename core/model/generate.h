/* generate.h — text generation with a key/value cache, for one sequence or many.
 *
 * The training forward (mt_model_forward) plans full (B,T) activations and keeps no
 * cache; generation runs its own incremental decoder over the same parameters: a
 * prefill of the prompt, then one token at a time, each new token attending to the
 * keys and values cached for every earlier position. Every projection goes through
 * mt_linear_forward, so attached adapters apply (put them in evaluation mode first:
 * mt_model_set_training(m, 0)).
 *
 * The decoder holds several sequences ("slots"), each with its own cache region and
 * length. One decode step feeds one token to each of k slots, so the projections are
 * one matrix product of k rows instead of k matrix-vector products (decoding one token
 * at a time is bound by reading the weights; k rows read them once). */
#ifndef MT_CORE_GENERATE_H
#define MT_CORE_GENERATE_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "text/tokenizer.h"

/* ---- the incremental decoder -------------------------------------------- */

typedef struct mt_kv_decoder mt_kv_decoder;

/* A decoder of `slots` sequences whose caches hold `capacity` positions each
 * (<= max_position_embeddings); tokens are run at most `max_rows` at a time (longer
 * feeds and steps are split; 0 picks 64). All memory is allocated here, once: the
 * host cache is 2 * layers * slots * capacity * kv_heads * head_dim floats. */
mt_status mt_kv_decoder_create(mt_model *m, int slots, int capacity, int max_rows,
                               mt_kv_decoder **out, mt_error *err);
void mt_kv_decoder_free(mt_kv_decoder *d);
/* From now on the decoder multiplies by int8 copies of the projections' weights where
 * the backend has int8 products (the CPU with AVX512-VNNI or AVX2: kernels/backend.h), each
 * made once, here, from the weights as they are now: the caller keeps the weights
 * unchanged while it uses the decoder. Inputs are quantised on the fly (per group of 32
 * in a row), so the logits differ from fp32's by the quantisations (docs/speed.md).
 * Returns how many
 * projections are in int8 (0: all stay fp32). */
int mt_kv_decoder_use_int8(mt_kv_decoder *d);
int mt_kv_decoder_slots(const mt_kv_decoder *d);
int mt_kv_decoder_capacity(const mt_kv_decoder *d);
/* Empties the cache of slot (in [0, slots); others are ignored): its next token is at
 * position 0. */
void mt_kv_decoder_reset(mt_kv_decoder *d, int slot);
/* The cache of slot `to` becomes the first n positions of slot `from` (n <= from's
 * length; both in [0, slots)): a shared prompt prefix run once. */
mt_status mt_kv_decoder_copy(mt_kv_decoder *d, int to, int from, int n, mt_error *err);
/* Number of positions in the cache of slot; -1 for a slot outside [0, slots). */
int mt_kv_decoder_length(const mt_kv_decoder *d, int slot);
/* Runs the decoder over tokens (n) of one slot at positions length .. length+n-1,
 * appending their keys and values to its cache (a prompt's prefill). logits (V, host
 * memory) receives the next-token logits after the last of them, when not NULL. */
mt_status mt_kv_decoder_feed(mt_kv_decoder *d, int slot, const int32_t *tokens, int n,
                             float *logits, mt_error *err);
/* Appends tokens[i] (n) to the cache of slot slots[i], in row order: a slot named r
 * times takes its next r positions, so one call can prefill some slots while it steps
 * others, and the rows share each matrix product (max_rows at a time). logits (host
 * memory), when not NULL, receives the next-token logits of every row i with want[i]
 * set (want NULL: every row), in row order: (wanted,V). Nothing changes when the
 * arguments are refused (a slot outside [0, slots), a full cache, a token outside the
 * vocabulary). */
mt_status mt_kv_decoder_append(mt_kv_decoder *d, const int *slots, const int32_t *tokens, int n,
                               const unsigned char *want, float *logits, mt_error *err);
/* One decode step: tokens[i] (k) is fed to slot slots[i] at that slot's own position
 * (its length); the k slots are distinct. logits (k,V) (host memory) receives each
 * row's next-token logits, in the order of slots. Nothing changes when the arguments
 * are refused. */
mt_status mt_kv_decoder_step(mt_kv_decoder *d, const int *slots, const int32_t *tokens, int k,
                             float *logits, mt_error *err);

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
 * the top_k, then the top_p nucleus, softmax, draw. logits is only read; work
 * holds V floats and V ints (mt_sample_work_bytes). *rng is the generator state. */
size_t mt_sample_work_bytes(int V);
int32_t mt_sample(const float *logits, int V, const mt_sampling *s, uint64_t *rng, void *work);

/* ---- generation ---------------------------------------------------------- */

/* The ids generation stops at for a chat model: EOS and the end-of-turn markers chat
 * templates emit (<|im_end|>, <|eot_id|>, <|end_of_text|>, <|endoftext|>, </s>) when the
 * tokenizer has them as special tokens, each once. ids holds MT_CHAT_STOP_IDS_MAX;
 * returns how many were written. */
#define MT_CHAT_STOP_IDS_MAX 8
int mt_chat_stop_ids(const mt_tokenizer *tok, int32_t *ids);

typedef enum mt_stop_reason {
    MT_STOP_LENGTH = 0, /* max_new_tokens generated */
    MT_STOP_EOS,        /* a stop id (EOS, end of turn) was generated */
    MT_STOP_STRING,     /* the text reached a stop string */
    MT_STOP_CALLBACK,   /* the callback asked to stop */
    MT_STOP_CONTEXT,    /* the model's context length was reached */
    MT_STOP_MISMATCH,   /* the text can no longer equal its expected text (opt.expect) */
    MT_STOP_REASONS     /* how many reasons there are */
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
    int fp32;                 /* 1: every product in fp32; 0: mt_kv_decoder_use_int8 */
    int logps;                /* 1: record each id's log-probability (mt_generation.logps) */
    /* Expected texts, one per prompt (an entry may be NULL), or NULL: a sequence ends
     * (MT_STOP_MISMATCH) as soon as its settled text can no longer equal its expected
     * text with surrounding whitespace ignored (mt_text_may_equal). An evaluation by
     * exact match scores the same and skips the rest of every wrong answer. Needs a
     * tokenizer. */
    const char *const *expect;
} mt_generate_options;

typedef struct mt_generation {
    int32_t *ids;    /* generated ids (a final stop id included) */
    float *logps;    /* (n_ids) each id's log-probability when it was drawn: log softmax of
                        the logits over the temperature (1 when greedy), before top-k and
                        top-p, as a reinforcement-learning loss recomputes it; NULL unless
                        the options' logps (a sum over the vocabulary for every id) */
    int n_ids;
    char *text;      /* decoded text of the ids, cut before a stop string; NULL without a tokenizer */
    size_t text_len;
    mt_stop_reason reason;
    int n_prompt;
    double prefill_seconds, decode_seconds; /* decode: every token after the first */
    int int8;        /* projections multiplied in int8 (mt_kv_decoder_use_int8), 0: fp32 */
} mt_generation;

/* Generates from the prompt ids with a cache sized for prompt + max_new_tokens.
 * tok may be NULL: then there is no text, no stop strings and no callback. The
 * sampler's generator starts from opt->sampling.seed. */
mt_status mt_generate(mt_model *m, const mt_tokenizer *tok, const int32_t *prompt, int n_prompt,
                      const mt_generate_options *opt, mt_generation *out, mt_error *err);

/* The default number of sequences mt_generate_batch decodes together. */
#define MT_GENERATE_SLOTS 16

/* Generates for n prompts (prompts[i] has n_prompt[i] ids) with the same options,
 * decoding up to `slots` sequences together (<= 0: MT_GENERATE_SLOTS) with continuous
 * batching: when a sequence ends, its slot takes the next waiting prompt, and that
 * prompt's prefill rides in the same chunks as the other slots' decode steps (up to
 * 128 prompt rows a chunk, a long prompt over several). out[i] (n of them) is what
 * mt_generate gives for prompt i with sampling seed opt->sampling.seed + i: ids, text,
 * reason, n_prompt. Greedy decoding gives the same ids as mt_generate unless two
 * logits are within rounding of each other (a matrix product of many rows may round
 * otherwise than one of a single row). Every slot's cache holds the longest prompt +
 * max_new_tokens (at most the model's context).
 * Times: every row of a chunk costs the chunk's wall time (sampling included) divided
 * by its rows; a sequence's prompt rows add to its prefill_seconds, its generated
 * tokens' rows to its decode_seconds. The sums over all sequences come to about the
 * wall time of the call, and sum(n_ids) / sum(prefill + decode) is the throughput.
 * opt->on_text must be NULL (no streaming). On an error every out[i] is empty. */
mt_status mt_generate_batch(mt_model *m, const mt_tokenizer *tok, const int32_t *const *prompts,
                            const int *n_prompt, int n, int slots, const mt_generate_options *opt,
                            mt_generation *out, mt_error *err);
void mt_generation_free(mt_generation *g);

/* Whether text (len bytes), followed by more text, can still equal the NUL-terminated
 * expected text when leading and trailing whitespace (" \t\n\v\f\r", as Lua's %s) is
 * ignored on both: once text holds anything but whitespace, what follows its leading
 * whitespace must begin the trimmed expected text, or be all of it and then whitespace. */
int mt_text_may_equal(const char *text, size_t len, const char *expected);

#endif /* MT_CORE_GENERATE_H */
