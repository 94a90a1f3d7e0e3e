/* plugin.h — the moontune plugin ABI (version 2). All a plugin author needs.
 *
 * A plugin is a shared object that exports exactly one symbol:
 *
 *     MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host);
 *
 * The host loads it with dlopen(RTLD_NOW | RTLD_LOCAL), calls the entry with its
 * function table and reads the returned descriptor: ABI version, kind, name,
 * version string, description, option schema and the kind's vtable. The host
 * checks the ABI version and the kind before it calls anything else. A plugin
 * links against nothing of the core: everything it needs from moontune comes
 * through the mt_host table (memory, logging, errors, options, compute, the model
 * for losses and adapters). This header and moontune/types.h declare nothing a
 * plugin cannot call: every function here is a slot of mt_host or inline.
 *
 * Devices (ABI 2). Every tensor a plugin receives carries its device, and a plugin
 * never dereferences tensor memory itself: it computes through the host's
 * operations (matmul, elementwise updates, reductions, softmax rows, dropout,
 * 4-bit dequantization), allocates with tensor_alloc on the device the model runs
 * on (model_device), and moves bytes with tensor_upload / tensor_download. So one
 * plugin runs on the CPU and on CUDA. The operations are queued: a misuse (a device,
 * dtype or shape that does not fit) or a device failure is recorded, later
 * operations of the same call are skipped, and the host turns the record into the
 * error of the plugin call that made it. A plugin may ask for it earlier with
 * host->check.
 *
 * Compatibility rules (as in SQLite's and Redis' module tables):
 * - Every struct a plugin and the host exchange starts with `uint32_t size`, set by
 *   whoever fills it to its own sizeof. A reader uses only the fields that fit in
 *   both sizes, so a newer host fills only what an older plugin knows, and reads an
 *   older plugin's vtable no further than it reaches. Arrays of such structs are
 *   walked by the size of their first element (mt_param_at). Structs only grow at
 *   their end; mt_tensor and mt_option_spec are frozen (the descriptor says the
 *   size of its option specs).
 * - mt_host only grows at its end; new slots are grouped under a comment naming
 *   the ABI version that added them. host->size says which slots exist.
 * - The descriptor carries the ABI version the plugin was built against. The host
 *   loads versions from MT_PLUGIN_ABI_OLDEST to MT_PLUGIN_ABI_VERSION and refuses
 *   the rest with a message naming the file, the supported and the found versions.
 *   ABI 1 (host memory only, raw float pointers) is refused with that reason:
 *   its plugins dereference memory that may live on a GPU, so they must be rebuilt.
 *
 * Threads: the host calls a plugin from one thread at a time. Numbers: fp32,
 * row-major, contiguous. */
#ifndef MOONTUNE_PLUGIN_H
#define MOONTUNE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/types.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_PLUGIN_ABI_VERSION 2
#define MT_PLUGIN_ABI_OLDEST 2 /* the oldest plugin ABI this header's host still loads */
#define MT_PLUGIN_ENTRY_SYMBOL "moontune_plugin_entry"

#if defined(__GNUC__)
#define MT_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define MT_PLUGIN_EXPORT
#endif

typedef enum mt_plugin_kind {
    MT_PLUGIN_OPTIMIZER = 1,
    MT_PLUGIN_LOSS = 2,
    MT_PLUGIN_ADAPTER = 3,
    MT_PLUGIN_SCHEDULER = 4,
} mt_plugin_kind;

/* splitmix64's finaliser: the mix behind host->random_uniform, for plugins that derive
 * their own stream keys from a seed (as LoRA does for each projection and pass). */
static inline uint64_t mt_mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* ---- tensor views (pointer arithmetic only: valid for memory on any device) ---- */

/* Rows [row0, row0 + nrows) of t along its first dimension. */
static inline mt_tensor mt_tensor_rows(const mt_tensor *t, int64_t row0, int64_t nrows) {
    mt_tensor v = *t;
    int64_t row = 1;
    for (int i = 1; i < t->ndim; i++) row *= t->shape[i];
    v.shape[0] = nrows;
    v.data = (char *)t->data + (size_t)(row0 * row) * mt_dtype_size(t->dtype);
    return v;
}

/* The first rows·cols elements of t as a (rows, cols) matrix (t must hold them). */
static inline mt_tensor mt_tensor_2d(const mt_tensor *t, int64_t rows, int64_t cols) {
    mt_tensor v = *t;
    v.ndim = 2;
    v.shape[0] = rows;
    v.shape[1] = cols;
    for (int i = 2; i < MT_MAX_DIMS; i++) v.shape[i] = 0;
    return v;
}

/* ---- options ------------------------------------------------------------- */

typedef enum mt_option_type {
    MT_OPT_BOOL = 1,
    MT_OPT_INT,
    MT_OPT_FLOAT,
    MT_OPT_STRING,
    MT_OPT_STRING_LIST, /* a Lua array of strings, or one comma-separated string */
} mt_option_type;

/* One declared option. The host refuses unknown keys, wrong types, numbers
 * outside [min, max] and strings outside `choices` before the plugin is created,
 * and fills in defaults, so a plugin reads every declared option unconditionally. */
typedef struct mt_option_spec {
    const char *name;
    mt_option_type type;
    const char *default_value; /* as text: "true", "8", "1e-3", "q_proj,v_proj"; NULL = "" */
    double min, max;           /* numeric range, inclusive; no range when min > max (use 1, 0) */
    const char *choices;       /* strings: "a|b|c", or NULL for any string */
    const char *help;
} mt_option_spec;

/* opaque: the validated options of one instance, valid until the instance is destroyed */
typedef struct mt_options mt_options;

/* ---- parameters ---------------------------------------------------------- */

/* A trainable tensor and its gradient, as optimizers and checkpoints see them. Both
 * live on the model's device. */
typedef struct mt_param_view {
    uint32_t size;     /* sizeof(mt_param_view) of whoever filled it */
    const char *name;  /* e.g. "model.layers.0.self_attn.q_proj.lora_A.weight" */
    mt_tensor value;   /* F32 */
    mt_tensor grad;    /* F32, same shape */
    int no_decay;      /* excluded from weight decay (norms, biases, by default) */
} mt_param_view;

/* Element i of an array of parameter views, walked by the filler's struct size. */
static inline mt_param_view *mt_param_at(mt_param_view *params, size_t i) {
    return (mt_param_view *)((char *)params + i * params[0].size);
}

/* ---- the model, as losses and adapters reach it --------------------------- */

typedef struct mt_model_handle mt_model_handle; /* opaque */

/* A batch of B rows of T tokens in host memory; positions, segments and targets may
 * be NULL (positions 0..T-1, one segment per row, no targets). targets < 0 are
 * ignored. Targets are pre-shifted: targets[b][t] is the token that row b's logits
 * at position t predict (tokens[b][t+1] in plain language modelling). */
/* The segment id of a shared prefix. Tokens of one segment see (causally) only tokens of
 * that segment, except tokens of this one, which every later token of the row sees: a
 * prompt prefix that all examples of a row begin with (a system prompt, say) stands
 * once at the row's start, and the examples after it continue at its positions. Its
 * tokens carry no targets. Padding is segment -1. */
#define MT_SHARED_SEGMENT (-2)

typedef struct mt_batch {
    uint32_t size; /* sizeof(mt_batch) of the host */
    int B, T;
    const int32_t *tokens;    /* (B,T) */
    const int32_t *positions; /* (B,T) or NULL */
    const int32_t *segments;  /* (B,T) or NULL; MT_SHARED_SEGMENT: see above */
    const int32_t *targets;   /* (B,T) or NULL */
    /* ABI 2: the items (the loss' count: target tokens for cross-entropy) of the whole
     * optimizer step, summed over its micro-batches; 0 outside training (evaluation),
     * where a loss normalises by the items of this batch alone. */
    int64_t step_items;
    /* ABI 2, read only when size covers them. pairs: 1 when rows 2i and 2i+1 are a
     * preference pair (chosen, rejected; the same prompt, targets on the replies): a loss
     * that cannot use pairs refuses such a batch (cross-entropy would train on the
     * rejected replies), a pair loss refuses a batch without them. ref_logps (B) or
     * NULL: each row's reference log-probability (Σ over its targets of log p), computed
     * once before training where the reference cannot be the model with adapters
     * disabled (full fine-tuning, or continuing an SFT adapter); NAN on padding rows. */
    int pairs;
    const double *ref_logps;
    /* ABI 2, read only when size covers them: a batch of sampled completions for
     * reinforcement learning (GRPO), else NULL. Each row is a prompt then a completion
     * the model sampled; the targets mark the completion's tokens. advantages (B): each
     * row's advantage (NAN on padding rows). old_logps (B,T), aligned with targets: the
     * log-probability the sampling policy gave each target token (log softmax of the
     * logits over the sampling temperature), recorded when it was generated; 0 where
     * there is no target. */
    const float *advantages;
    const float *old_logps;
} mt_batch;

/* One projection of the model, as an adapter sees it. */
typedef struct mt_linear_info {
    uint32_t size;      /* set by the caller of linear_info to its sizeof */
    const char *name;   /* "model.layers.3.self_attn.q_proj", "lm_head" */
    const char *module; /* "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj", "lm_head" */
    int layer;          /* -1 for lm_head */
    int in, out;
    mt_tensor weight;   /* (out,in) F32 on the model's device; data NULL once released */
    mt_tensor bias;     /* (out) F32, data NULL when the layer has none */
} mt_linear_info;

typedef struct mt_linear_handle mt_linear_handle; /* opaque: one projection */

/* The computation an adapter installs in place of a projection. `self` is the
 * pointer the adapter passed to linear_wrap. Tensors live on the model's device. */
typedef struct mt_linear_impl {
    uint32_t size; /* sizeof(mt_linear_impl) of the adapter */
    /* y (N,out) = f(x (N,in)) */
    void (*forward)(void *self, mt_tensor *y, const mt_tensor *x);
    /* dx (N,in) += df/dx · dy (N,out); accumulate the adapter's own parameter gradients.
     * x is the input of the latest forward of this projection. */
    void (*backward)(void *self, mt_tensor *dx, const mt_tensor *dy, const mt_tensor *x);
    /* ABI 2, optional (read only when size covers them; NULL: the host calls forward and
     * backward of each): the projections of one layer that read the same input (q, k, v;
     * gate, up) in one call, when this impl wraps every one of them, so that an adapter
     * can multiply that input once for all of them (LoRA's down-projections). selves[i]
     * is projection i's self, in the model's order (q, k, v; gate, up). forward_shared
     * gives ys[i] = forward(selves[i], x) for every i; backward_shared what
     * backward(selves[i], dx, dys[i], x) for every i gives, the terms of dx summed in
     * an order of its choosing (so not always to the same bits). */
    void (*forward_shared)(void *const *selves, int n, mt_tensor *const *ys, const mt_tensor *x);
    void (*backward_shared)(void *const *selves, int n, mt_tensor *dx, const mt_tensor *const *dys,
                            const mt_tensor *x);
} mt_linear_impl;

/* An adapter directory being written (save) or read (import_options, load): a PEFT
 * adapter's adapter_config.json and adapter_model.safetensors, which the host reads
 * and writes; the adapter says what goes in them. Opaque. */
typedef struct mt_adapter_io mt_adapter_io;

/* ---- the host table ------------------------------------------------------ */

typedef enum mt_log_level { MT_LOG_DEBUG = 0, MT_LOG_INFO, MT_LOG_WARN, MT_LOG_ERROR } mt_log_level;

typedef struct mt_host {
    uint32_t abi_version; /* MT_PLUGIN_ABI_VERSION of the host */
    uint32_t size;        /* sizeof(mt_host) of the host: slots past it do not exist */

    /* ---- host memory (zero-filled, 64-byte aligned; NULL when out of memory): for a
     * plugin's own bookkeeping, never for tensors the model or the backend computes on ---- */
    void *(*alloc)(size_t bytes);
    void (*free)(void *ptr);

    /* ---- logging and errors ---- */
    void (*log)(mt_log_level level, const char *plugin, const char *fmt, ...);
    /* Fills err and returns status, like the core's own errors. */
    mt_status (*error)(mt_error *err, mt_status status, const char *fmt, ...);

    /* ---- options (names must be declared in the plugin's schema) ---- */
    int (*opt_bool)(const mt_options *opts, const char *name);
    int64_t (*opt_int)(const mt_options *opts, const char *name);
    double (*opt_float)(const mt_options *opts, const char *name);
    const char *(*opt_string)(const mt_options *opts, const char *name);
    int (*opt_list_len)(const mt_options *opts, const char *name);
    const char *(*opt_list_item)(const mt_options *opts, const char *name, int index);

    /* ---- random numbers (pure functions, no device) ---- */
    /* A counter-based stream, uniform in [0, 1): the same (seed, counter) always gives the
     * same value, so a backward pass can regenerate the mask its forward pass drew. */
    float (*random_uniform)(uint64_t seed, uint64_t counter);

    /* ---- device memory ---- */
    /* A zero-filled tensor of the given dtype and shape on `device`. */
    mt_status (*tensor_alloc)(mt_device device, mt_dtype dtype, int ndim, const int64_t *shape,
                              mt_tensor *out, mt_error *err);
    /* Frees what tensor_alloc gave (NULL data: nothing) and sets data to NULL. */
    void (*tensor_free)(mt_tensor *t);
    /* Copies mt_tensor_nbytes(t) bytes from host memory into t, or from t into host
     * memory; both wait for the copy. */
    mt_status (*tensor_upload)(mt_tensor *dst, const void *src_host, mt_error *err);
    mt_status (*tensor_download)(void *dst_host, const mt_tensor *src, mt_error *err);
    /* The first failure of an operation below since the last check (then cleared), with
     * the queued work waited for; MT_OK when none. The host also checks after every
     * plugin call. */
    mt_status (*check)(mt_error *err);

    /* ---- compute: every tensor on one device, F32 and contiguous unless noted, the
     * element count n = numel of the first argument, the others matching it. Elementwise
     * operations work element by element, so an input may be the output tensor itself
     * (axpby(p, decay, p, 0) scales p); matmul's c must not overlap a or b. ---- */
    /* c (M,N) = alpha · op(a) · op(b) + beta · c on 2-D tensors; op transposes when
     * trans_* is set (a is (M,K), or (K,M) when trans_a; b is (K,N), or (N,K) when
     * trans_b). */
    void (*matmul)(mt_tensor *c, const mt_tensor *a, const mt_tensor *b, int trans_a,
                   int trans_b, float alpha, float beta);
    void (*copy)(mt_tensor *dst, const mt_tensor *src); /* same dtype and element count */
    void (*fill)(mt_tensor *t, float value);
    void (*axpby)(mt_tensor *y, float alpha, const mt_tensor *x, float beta); /* y = αx + βy */
    void (*lerp)(mt_tensor *y, const mt_tensor *x, float w); /* y = y + w(x - y), torch's lerp */
    /* y = beta · y + alpha · a ⊙ b */
    void (*addcmul)(mt_tensor *y, float beta, float alpha, const mt_tensor *a,
                    const mt_tensor *b);
    /* y += alpha · a / (sqrt(b) / b_div + eps): Adam's and RMSprop's step */
    void (*addcdiv_sqrt)(mt_tensor *y, float alpha, const mt_tensor *a, const mt_tensor *b,
                         float b_div, float eps);
    void (*maximum)(mt_tensor *y, const mt_tensor *x); /* y = max(y, x); NaN propagates */
    void (*add_sign)(mt_tensor *y, float alpha, const mt_tensor *x); /* y += α sign(x) */
    void (*mul)(mt_tensor *y, const mt_tensor *x);                  /* y = y ⊙ x */
    /* Inverted dropout with the mask of random_uniform(seed, counter0 + i) >= p:
     * y (=, or += when accumulate) x ⊙ mask / (1 - p). */
    void (*dropout)(mt_tensor *y, const mt_tensor *x, float p, uint64_t seed, uint64_t counter0,
                    int accumulate);
    /* Σ x², accumulated in double; NaN when a recorded failure made it unknown. */
    double (*sum_squares)(const mt_tensor *x);

    /* ---- compute: softmax over rows of logits, for losses ---- */
    /* For logits (n,V) and targets (n) I32, per row: lse (n) = log Σ_j exp x_j;
     * target_logit (n) = x_t, or 0 for a target >= V (a row without a target whose
     * statistics are still wanted), or NULL; mean_logit (n) = Σ_j x_j / V or NULL. Sums in
     * double. A row whose target is < 0 is skipped: its values are 0 and no work is done
     * (a loss passes -1 for the masked rows it does not need). */
    void (*softmax_stats)(const mt_tensor *logits, const mt_tensor *targets, mt_tensor *lse,
                          mt_tensor *target_logit, mt_tensor *mean_logit);
    /* In place, per row r of logits (n,V) with coefs (n,3) = (c0, c1, c2):
     * x_j = c0 · exp(x_j - lse_r) + c1 + c2 · [j == t_r]: the gradient of a loss that
     * is a function of the softmax, its uniform mix and the target's log-probability.
     * A row whose target is < 0 becomes 0 (skipped); t_r >= V adds no c2 term. */
    void (*softmax_backward)(mt_tensor *logits, const mt_tensor *lse, const mt_tensor *targets,
                             const mt_tensor *coefs);

    /* ---- compute: 4-bit block quantization with double-quantized scales (QLoRA) ---- */
    /* out (n) = elements [first, first + n) of a tensor stored as codes (U8, two 4-bit
     * codes a byte, the even element in the high nibble), absmax_q (U8, one code per
     * `block` elements), absmax2 (F32, one per block2 scales) and offset:
     * w = table[code] · (dyn[absmax_q] · absmax2 + offset), in that order, where table
     * (F32, 16 + 256 values) holds the 4-bit code values and then the 8-bit dynamic map. */
    void (*dequantize_4bit)(mt_tensor *out, const mt_tensor *codes, const mt_tensor *absmax_q,
                            const mt_tensor *absmax2, const mt_tensor *table, float offset,
                            int64_t first, int block, int block2);

    /* ---- the model (losses) ---- */
    mt_device (*model_device)(const mt_model_handle *model);
    /* Runs the decoder on a batch; adapters on or off (DPO's reference model is the
     * base with adapters disabled). */
    mt_status (*model_forward)(mt_model_handle *model, const mt_batch *batch, int adapters_enabled,
                               mt_error *err);
    int (*model_vocab_size)(const mt_model_handle *model);
    /* Rows per call of model_logits that the model planned for (the loss' chunk). */
    int (*model_chunk_rows)(const mt_model_handle *model);
    /* logits (nrows,V) on the model's device = rows [row0, row0+nrows) of the last
     * forward, row = b*T + t. */
    mt_status (*model_logits)(mt_model_handle *model, int row0, int nrows, mt_tensor *logits,
                              mt_error *err);
    /* Accumulates dlogits (nrows,V) of those rows into the model's output gradient. */
    mt_status (*model_backward_logits)(mt_model_handle *model, int row0, int nrows,
                                       const mt_tensor *dlogits, mt_error *err);
    /* Back-propagates the accumulated output gradient into every trainable parameter. */
    mt_status (*model_backward)(mt_model_handle *model, mt_error *err);

    /* ---- the model (adapters) ---- */
    int (*model_linear_count)(const mt_model_handle *model);
    mt_linear_handle *(*model_linear)(mt_model_handle *model, int index);
    /* Fills info up to info->size (the caller sets it). info->weight may be written
     * (a merge), so the host drops what it derived from the weights (the int8 copies
     * of int8 training, made again at the next step): call it when attaching or
     * merging, not in every step. */
    void (*linear_info)(const mt_linear_handle *lin, mt_linear_info *info);
    /* Replaces the projection's computation; NULL impl restores the base layer. */
    mt_status (*linear_wrap)(mt_linear_handle *lin, const mt_linear_impl *impl, void *self,
                             mt_error *err);
    /* The base layer's own computation, for an adapter to call inside its wrapper. */
    void (*linear_base_forward)(mt_linear_handle *lin, mt_tensor *y, const mt_tensor *x);
    void (*linear_base_backward)(mt_linear_handle *lin, mt_tensor *dx, const mt_tensor *dy,
                                 const mt_tensor *x);
    /* Gives the base weight (and bias) gradients: full fine-tuning of this projection. */
    mt_status (*linear_set_trainable)(mt_linear_handle *lin, int trainable, mt_error *err);
    /* Returns the fp32 base weight's memory to the system (QLoRA keeps its own copy);
     * info.weight.data is NULL afterwards until linear_restore_weight. */
    void (*linear_release_weight)(mt_linear_handle *lin);
    /* Makes the fp32 base weight memory again (zero-filled) and gives it in *weight. */
    mt_status (*linear_restore_weight)(mt_linear_handle *lin, mt_tensor *weight, mt_error *err);
    /* Makes any base parameter trainable by name: embeddings, norms. */
    mt_status (*model_set_param_trainable)(mt_model_handle *model, const char *name,
                                           int trainable, mt_error *err);
    int (*model_param_count)(const mt_model_handle *model);
    const char *(*model_param_name)(const mt_model_handle *model, int index);
    /* The base parameter `name` (weights, norms, embeddings) as a view on the model's
     * device; MT_ERR_INVALID_ARG when there is none. */
    mt_status (*model_param)(mt_model_handle *model, const char *name, mt_tensor *value,
                             mt_error *err);
    /* Registers a tensor the adapter owns as a trainable parameter (optimizers and
     * checkpoints see it under `name`). value and grad stay owned by the adapter and
     * live on the model's device. */
    mt_status (*model_add_param)(mt_model_handle *model, const mt_param_view *param,
                                 mt_error *err);

    /* ---- adapter directories (save, import_options, load) ---- */
    /* save: one key of adapter_config.json, its value as JSON text ("8", "true",
     * "[\"q_proj\"]", "\"LORA\""). */
    mt_status (*io_put_config)(mt_adapter_io *io, const char *key, const char *json,
                               mt_error *err);
    /* save: one tensor of the adapter's weights under `name` (the host prefixes the
     * format's own, e.g. PEFT's "base_model.model."); any device. */
    mt_status (*io_put_tensor)(mt_adapter_io *io, const char *name, const mt_tensor *t,
                               mt_error *err);
    /* import and load: the value of a key as JSON text, or NULL when absent; the keys in
     * file order by index (NULL past the last). Valid while the io lives. */
    const char *(*io_get_config)(const mt_adapter_io *io, const char *key);
    const char *(*io_config_key)(const mt_adapter_io *io, int index);
    /* load: the tensors by index (name without the format's prefix; NULL past the last),
     * and one by name as a read-only view in host memory (dtype as stored: F32, F16 or
     * BF16 are converted to F32). MT_ERR_FORMAT naming the file when absent. */
    const char *(*io_tensor_name)(const mt_adapter_io *io, int index);
    mt_status (*io_get_tensor)(mt_adapter_io *io, const char *name, mt_tensor *out,
                               mt_error *err);
    /* import_options: sets one of the plugin's own options (text, validated against its
     * schema as a recipe's value would be). */
    mt_status (*io_set_option)(mt_adapter_io *io, const char *name, const char *value,
                               mt_error *err);

    /* ---- the model (losses), continued ---- */
    /* 1 when no base parameter is trainable (only adapters train), so that the model with
     * adapters disabled is a fixed reference (DPO, GRPO's KL); 0 otherwise. */
    int (*model_base_frozen)(const mt_model_handle *model);
    /* model_logits and model_backward_logits of the listed rows (row = b*T + t; at most
     * model_chunk_rows of them; distinct), so that a loss runs the output layer for the
     * rows with a target only: prompt tokens need no logits. */
    mt_status (*model_logits_rows)(mt_model_handle *model, const int32_t *rows, int nrows,
                                   mt_tensor *logits, mt_error *err);
    mt_status (*model_backward_logits_rows)(mt_model_handle *model, const int32_t *rows,
                                            int nrows, const mt_tensor *dlogits, mt_error *err);
} mt_host;

/* ---- the four kinds ------------------------------------------------------ */

/* Named tensors of a plugin's state for checkpoints (optimizers, and optionally
 * losses and adapters): state_get gives a view of the plugin's own memory on any
 * device, valid until the next call into the plugin; state_set receives a tensor in
 * host memory (device MT_DEVICE_CPU) and copies it. */
#define MT_STATE_SLOTS                                                                        \
    size_t (*state_count)(void *state);                                                        \
    mt_status (*state_get)(void *state, size_t index, const char **name, mt_tensor *tensor,  \
                           mt_error *err);                                                     \
    mt_status (*state_set)(void *state, const char *name, const mt_tensor *tensor, mt_error *err)

typedef struct mt_optimizer_vtable {
    uint32_t size; /* sizeof(mt_optimizer_vtable) of the plugin */
    mt_status (*create)(const mt_host *host, const mt_options *opts, void **state, mt_error *err);
    void (*destroy)(void *state);
    /* One update of every parameter from its gradient at learning rate lr; step counts
     * optimizer steps from 1. Parameter state is created on the first step, on the
     * parameters' device. Walk params with mt_param_at. */
    mt_status (*step)(void *state, mt_param_view *params, size_t count, double lr, int64_t step,
                      mt_error *err);
    /* State names are "<kind>/<parameter name>", e.g. "exp_avg/model.norm.weight".
     * A state_set may come before the first step. */
    MT_STATE_SLOTS;
} mt_optimizer_vtable;

typedef struct mt_scheduler_vtable {
    uint32_t size; /* sizeof(mt_scheduler_vtable) of the plugin */
    mt_status (*create)(const mt_host *host, const mt_options *opts, void **state, mt_error *err);
    void (*destroy)(void *state);
    /* Learning rate for optimizer step `step` (0-based, as transformers' lr_lambda sees
     * it) of total_steps, given the optimizer's base learning rate. */
    double (*lr)(void *state, int64_t step, int64_t total_steps, double base_lr);
} mt_scheduler_vtable;

/* DPO reports TRL's seven metrics. */
#define MT_LOSS_MAX_METRICS 8

typedef struct mt_loss_result {
    uint32_t size; /* set by the host to its sizeof before compute; keep it */
    /* The value minimised (what backward differentiates): with batch->step_items > 0 the
     * batch's share of the step's loss, normalised by step_items, so that the step's loss
     * is the sum over its micro-batches; otherwise normalised by this batch's items. */
    double loss;
    int64_t n_tokens; /* items of this batch that contributed (the count of `count`) */
    /* up to MT_LOSS_MAX_METRICS extra named metrics (e.g. "nll", "rewards/margins"),
     * each normalised like loss, so that a step's value is the sum over its micro-batches */
    int n_metrics;
    const char *metric_names[MT_LOSS_MAX_METRICS];
    double metrics[MT_LOSS_MAX_METRICS];
} mt_loss_result;

typedef struct mt_loss_vtable {
    uint32_t size; /* sizeof(mt_loss_vtable) of the plugin */
    mt_status (*create)(const mt_host *host, const mt_options *opts, void **state, mt_error *err);
    void (*destroy)(void *state);
    /* Runs the model on the batch through the host, computes the loss and, when backward
     * is set, back-propagates it (model_backward_logits then model_backward). A batch
     * without a single item gives loss 0 and no gradient. A loss that is not finite
     * returns MT_ERR_NUMERIC: the step is skipped, not applied. */
    mt_status (*compute)(void *state, mt_model_handle *model, const mt_batch *batch, int backward,
                         mt_loss_result *result, mt_error *err);
    /* ABI 2, optional: the items of a batch the loss normalises by (NULL: targets >= 0).
     * The host sums them over an optimizer step's micro-batches into step_items. */
    int64_t (*count)(void *state, const mt_batch *batch);
    /* ABI 2, optional (NULL state_count: no state). */
    MT_STATE_SLOTS;
} mt_loss_vtable;

typedef struct mt_adapter_vtable {
    uint32_t size; /* sizeof(mt_adapter_vtable) of the plugin */
    mt_status (*create)(const mt_host *host, const mt_options *opts, void **state, mt_error *err);
    void (*destroy)(void *state);
    /* Attaches to a model: wraps projections, makes parameters trainable, registers its
     * own parameters. Called once per model, before the model is planned. */
    mt_status (*attach)(void *state, mt_model_handle *model, mt_error *err);
    /* Folds the adapter into the base weights (and back); optional (NULL: unsupported). */
    mt_status (*merge)(void *state, mt_error *err);
    mt_status (*unmerge)(void *state, mt_error *err);
    /* Turns the adapter's contribution off and on (DPO's reference pass); optional. */
    void (*set_enabled)(void *state, int enabled);
    /* Training (1, the default) or evaluation (0): dropout and the like act only while
     * training; optional. */
    void (*set_training)(void *state, int training);
    /* ABI 2, optional: state beyond the trainable parameters (LoRA's dropout passes). */
    MT_STATE_SLOTS;
    /* ABI 2, optional: the adapter as a directory other tools load (its format's
     * config keys and tensors; for LoRA a PEFT adapter). `format` names it ("peft"). */
    const char *format;
    mt_status (*save)(void *state, mt_adapter_io *io, mt_error *err);
    /* Static (no instance yet): reads a saved directory's config and sets the options
     * an instance needs to load it (io_set_option); refuses what it cannot load. */
    mt_status (*import_options)(const mt_host *host, mt_adapter_io *io, mt_error *err);
    /* After attach: reads the saved tensors into the adapter's parameters. */
    mt_status (*load)(void *state, mt_adapter_io *io, mt_error *err);
    /* ABI 2, optional: gradient checkpointing (recompute = "layers") runs a layer's
     * forward again in backward, on the same inputs. Between set_replay(state, 1) and
     * set_replay(state, 0) the wrapped projections' forwards must give the outputs of
     * their latest forward: no new random draws (dropout masks), no pass counted. An
     * adapter that wraps projections and lacks it cannot be used with checkpointing. */
    void (*set_replay)(void *state, int replaying);
} mt_adapter_vtable;

/* ---- the descriptor ------------------------------------------------------ */

typedef struct mt_plugin_descriptor {
    uint32_t abi_version; /* MT_PLUGIN_ABI_VERSION the plugin was built against (first in
                             every ABI version, so any host can read it) */
    uint32_t size;        /* sizeof(mt_plugin_descriptor) of the plugin */
    mt_plugin_kind kind;
    const char *name;        /* unique per kind: "adamw", "cosine", "lora" */
    const char *version;     /* the plugin's own version, e.g. "1.0.0" */
    const char *description; /* one line */
    const mt_option_spec *options; /* array of n_options */
    size_t n_options;
    uint32_t option_size; /* sizeof(mt_option_spec) of the plugin */
    const void *vtable; /* mt_optimizer_vtable, mt_loss_vtable, ... as kind says */
} mt_plugin_descriptor;

typedef const mt_plugin_descriptor *(*mt_plugin_entry_fn)(const mt_host *host);

/* The one symbol a plugin defines (declared here so that plugins compile cleanly
 * with -Wmissing-prototypes). */
MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *host);

/* The descriptor and the entry point in one place. The entry keeps the host table in
 * HOST_VAR (a `static const mt_host *` of the plugin) and returns a descriptor of this
 * ABI version with the given fields:
 *
 *     static const mt_host *host;
 *     ...
 *     MT_PLUGIN_DEFINE(host, .kind = MT_PLUGIN_SCHEDULER, .name = "constant",
 *                      .version = "1.0.0", .description = "...", .options = options,
 *                      .n_options = sizeof options / sizeof options[0], .vtable = &vtable)
 *
 * Vtables set their size with MT_VTABLE_SIZE(type). A plugin that must do more when it
 * is loaded writes its entry by hand. */
#define MT_PLUGIN_DEFINE(HOST_VAR, ...)                                                       \
    static const mt_plugin_descriptor mt_plugin_descriptor_ = {                             \
        .abi_version = MT_PLUGIN_ABI_VERSION,                                                \
        .size = sizeof(mt_plugin_descriptor),                                                \
        .option_size = sizeof(mt_option_spec),                                               \
        __VA_ARGS__};                                                                        \
    MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *h) {    \
        HOST_VAR = h;                                                                        \
        return &mt_plugin_descriptor_;                                                       \
    }

#define MT_VTABLE_SIZE(type) .size = sizeof(type)

#ifdef __cplusplus
}
#endif
#endif /* MOONTUNE_PLUGIN_H */
