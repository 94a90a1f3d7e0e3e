/* plugin.h — the moontune plugin ABI. All a plugin author needs.
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
 * through the mt_host table (allocation, logging, errors, options, matrix
 * products, the model for losses and adapters).
 *
 * Compatibility rules (as in SQLite's and Redis' module tables):
 * - mt_host only grows at its end; new slots are grouped under a comment naming
 *   the ABI version that added them. A plugin may read host->size to see which
 *   slots exist.
 * - The descriptor carries the ABI version the plugin was built against; the
 *   host refuses any other version with a message naming the file, the expected
 *   and the found version. (ABI 1 is the first; a later host that grows mt_host
 *   only at its end will keep accepting plugins built for the versions before it.)
 *
 * Threads: the host calls a plugin from one thread at a time. Numbers: fp32,
 * row-major. In ABI 1 every tensor a plugin receives lives in CPU memory
 * (tensor.device == MT_DEVICE_CPU); the CUDA path adds device-aware slots. */
#ifndef MOONTUNE_PLUGIN_H
#define MOONTUNE_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#include "moontune/moontune.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MT_PLUGIN_ABI_VERSION 1
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

typedef struct mt_options mt_options; /* opaque: the validated options of one instance */

/* ---- parameters ---------------------------------------------------------- */

/* A trainable tensor and its gradient, as optimizers and checkpoints see them. */
typedef struct mt_param_view {
    const char *name;  /* e.g. "model.layers.0.self_attn.q_proj.lora_A.weight" */
    mt_tensor value;   /* F32 */
    mt_tensor grad;    /* F32, same shape */
    int no_decay;      /* excluded from weight decay (norms, biases, by default) */
} mt_param_view;

/* ---- the model, as losses and adapters reach it --------------------------- */

typedef struct mt_model_handle mt_model_handle; /* opaque */

/* A batch of B rows of T tokens; positions, segments and targets may be NULL
 * (positions 0..T-1, one segment per row, no targets). targets < 0 are ignored. */
typedef struct mt_batch {
    int B, T;
    const int32_t *tokens;    /* (B,T) */
    const int32_t *positions; /* (B,T) or NULL */
    const int32_t *segments;  /* (B,T) or NULL */
    const int32_t *targets;   /* (B,T) or NULL */
} mt_batch;

/* One projection of the model, as an adapter sees it. */
typedef struct mt_linear_info {
    const char *name;   /* "model.layers.3.self_attn.q_proj", "lm_head" */
    const char *module; /* "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                           "down_proj", "lm_head" */
    int layer;          /* -1 for lm_head */
    int in, out;
    mt_tensor weight;   /* (out,in) F32; data NULL once an adapter released it */
    mt_tensor bias;     /* (out) F32, data NULL when the layer has none */
} mt_linear_info;

typedef struct mt_linear_handle mt_linear_handle; /* opaque: one projection */

/* The computation an adapter installs in place of a projection. `self` is the
 * pointer the adapter passed to wrap_linear. */
typedef struct mt_linear_impl {
    /* y (N,out) = f(x (N,in)) */
    void (*forward)(void *self, float *y, const float *x, int N);
    /* dx (N,in) += df/dx · dy (N,out); accumulate the adapter's own parameter gradients. */
    void (*backward)(void *self, float *dx, const float *dy, const float *x, int N);
} mt_linear_impl;

/* ---- the host table ------------------------------------------------------ */

typedef enum mt_log_level { MT_LOG_DEBUG = 0, MT_LOG_INFO, MT_LOG_WARN, MT_LOG_ERROR } mt_log_level;

typedef struct mt_host {
    uint32_t abi_version; /* MT_PLUGIN_ABI_VERSION of the host */
    uint32_t size;        /* sizeof(mt_host) of the host: slots past it do not exist */

    /* ---- ABI 1: memory (CPU, zero-filled, 64-byte aligned; NULL when out of memory) ---- */
    void *(*alloc)(size_t bytes);
    void (*free)(void *ptr);

    /* ---- ABI 1: logging and errors ---- */
    void (*log)(mt_log_level level, const char *plugin, const char *fmt, ...);
    /* Fills err and returns status, like the core's own errors. */
    mt_status (*error)(mt_error *err, mt_status status, const char *fmt, ...);

    /* ---- ABI 1: options (names must be declared in the plugin's schema) ---- */
    int (*opt_bool)(const mt_options *opts, const char *name);
    int64_t (*opt_int)(const mt_options *opts, const char *name);
    double (*opt_float)(const mt_options *opts, const char *name);
    const char *(*opt_string)(const mt_options *opts, const char *name);
    int (*opt_list_len)(const mt_options *opts, const char *name);
    const char *(*opt_list_item)(const mt_options *opts, const char *name, int index);

    /* ---- ABI 1: compute ---- */
    /* c (M,N) = alpha * op(a) · op(b) + beta * c, row-major; op transposes when trans_* is set
     * (a is (M,K), or (K,M) when trans_a; b is (K,N), or (N,K) when trans_b). */
    void (*matmul)(float *c, const float *a, const float *b, int M, int N, int K, int trans_a,
                   int trans_b, float alpha, float beta);
    /* Deterministic random numbers: a counter-based stream, uniform in [0, 1). The same
     * (seed, counter) always gives the same value, so a backward pass can regenerate the
     * dropout mask its forward pass drew. */
    float (*random_uniform)(uint64_t seed, uint64_t counter);

    /* ---- ABI 1: the model (losses) ---- */
    /* Runs the decoder on a batch; adapters on or off (DPO's reference model is the
     * base with adapters disabled). */
    mt_status (*model_forward)(mt_model_handle *model, const mt_batch *batch, int adapters_enabled,
                               mt_error *err);
    int (*model_vocab_size)(const mt_model_handle *model);
    /* Rows per call of model_logits that the model planned for (the loss' chunk). */
    int (*model_chunk_rows)(const mt_model_handle *model);
    /* logits (nrows,V) of rows [row0, row0+nrows) of the last forward, row = b*T + t. */
    mt_status (*model_logits)(mt_model_handle *model, int row0, int nrows, float *logits,
                              mt_error *err);
    /* Accumulates dlogits (nrows,V) of those rows into the model's output gradient. */
    mt_status (*model_backward_logits)(mt_model_handle *model, int row0, int nrows,
                                       const float *dlogits, mt_error *err);
    /* Back-propagates the accumulated output gradient into every trainable parameter. */
    mt_status (*model_backward)(mt_model_handle *model, mt_error *err);

    /* ---- ABI 1: the model (adapters) ---- */
    int (*model_linear_count)(const mt_model_handle *model);
    mt_linear_handle *(*model_linear)(mt_model_handle *model, int index);
    void (*linear_info)(const mt_linear_handle *lin, mt_linear_info *info);
    /* Replaces the projection's computation; NULL impl restores the base layer. */
    mt_status (*linear_wrap)(mt_linear_handle *lin, const mt_linear_impl *impl, void *self,
                             mt_error *err);
    /* The base layer's own computation, for an adapter to call inside its wrapper. */
    void (*linear_base_forward)(mt_linear_handle *lin, float *y, const float *x, int N);
    void (*linear_base_backward)(mt_linear_handle *lin, float *dx, const float *dy,
                                 const float *x, int N);
    /* Gives the base weight (and bias) gradients: full fine-tuning of this projection. */
    mt_status (*linear_set_trainable)(mt_linear_handle *lin, int trainable, mt_error *err);
    /* Returns the fp32 base weight's memory to the system (QLoRA keeps its own copy);
     * info.weight.data is NULL afterwards until linear_restore_weight. */
    void (*linear_release_weight)(mt_linear_handle *lin);
    /* Makes the fp32 base weight writable memory again (zero-filled) and returns it. */
    float *(*linear_restore_weight)(mt_linear_handle *lin, mt_error *err);
    /* Makes any base parameter trainable by name: embeddings, norms. */
    mt_status (*model_set_param_trainable)(mt_model_handle *model, const char *name,
                                           int trainable, mt_error *err);
    int (*model_param_count)(const mt_model_handle *model);
    const char *(*model_param_name)(const mt_model_handle *model, int index);
    /* Registers a tensor the adapter owns as a trainable parameter (optimizers and
     * checkpoints see it under `name`). value and grad stay owned by the adapter. */
    mt_status (*model_add_param)(mt_model_handle *model, const mt_param_view *param,
                                 mt_error *err);
} mt_host;

/* ---- the four kinds ------------------------------------------------------ */

typedef struct mt_optimizer_vtable {
    mt_status (*create)(const mt_host *host, const mt_options *opts, void **state, mt_error *err);
    void (*destroy)(void *state);
    /* One update of every parameter from its gradient at learning rate lr; step counts
     * optimizer steps from 1. Parameter state is created on the first step. */
    mt_status (*step)(void *state, mt_param_view *params, size_t count, double lr, int64_t step,
                      mt_error *err);
    /* State as named tensors for checkpoints: name i is "<kind>/<parameter name>",
     * e.g. "exp_avg/model.norm.weight". Returns the number of state tensors. */
    size_t (*state_count)(void *state);
    mt_status (*state_get)(void *state, size_t index, const char **name, mt_tensor *tensor,
                           mt_error *err);
    /* Restores one state tensor by name (before or after the first step). */
    mt_status (*state_set)(void *state, const char *name, const mt_tensor *tensor, mt_error *err);
} mt_optimizer_vtable;

typedef struct mt_scheduler_vtable {
    mt_status (*create)(const mt_host *host, const mt_options *opts, void **state, mt_error *err);
    void (*destroy)(void *state);
    /* Learning rate for optimizer step `step` (0-based, as transformers' lr_lambda sees
     * it) of total_steps, given the optimizer's base learning rate. */
    double (*lr)(void *state, int64_t step, int64_t total_steps, double base_lr);
} mt_scheduler_vtable;

typedef struct mt_loss_result {
    double loss;      /* the value minimised (what backward differentiates) */
    int64_t n_tokens; /* tokens that contributed */
    /* up to 4 extra named metrics (e.g. "nll", "z_loss", "reward_margin") */
    int n_metrics;
    const char *metric_names[4];
    double metrics[4];
} mt_loss_result;

typedef struct mt_loss_vtable {
    mt_status (*create)(const mt_host *host, const mt_options *opts, void **state, mt_error *err);
    void (*destroy)(void *state);
    /* Runs the model on the batch through the host, computes the loss and, when backward
     * is set, back-propagates it (model_backward_logits then model_backward). */
    mt_status (*compute)(void *state, mt_model_handle *model, const mt_batch *batch, int backward,
                         mt_loss_result *result, mt_error *err);
} mt_loss_vtable;

typedef struct mt_adapter_vtable {
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
} mt_adapter_vtable;

/* ---- the descriptor ------------------------------------------------------ */

typedef struct mt_plugin_descriptor {
    uint32_t abi_version; /* MT_PLUGIN_ABI_VERSION the plugin was built against */
    mt_plugin_kind kind;
    const char *name;        /* unique per kind: "adamw", "cosine", "lora" */
    const char *version;     /* the plugin's own version, e.g. "1.0.0" */
    const char *description; /* one line */
    const mt_option_spec *options; /* array of n_options */
    size_t n_options;
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
 * A plugin that must do more when it is loaded writes its entry by hand. */
#define MT_PLUGIN_DEFINE(HOST_VAR, ...)                                                       \
    static const mt_plugin_descriptor mt_plugin_descriptor_ = {                             \
        .abi_version = MT_PLUGIN_ABI_VERSION, __VA_ARGS__};                                  \
    MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *h) {    \
        HOST_VAR = h;                                                                        \
        return &mt_plugin_descriptor_;                                                       \
    }

#ifdef __cplusplus
}
#endif
#endif /* MOONTUNE_PLUGIN_H */
