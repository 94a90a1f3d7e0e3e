/* model.h — the Llama-family decoder (Llama 2/3, SmolLM2, Qwen2, Mistral).
 *
 * Explicit forward and backward in the style of llm.c: parameters, gradients
 * and activations are plain named arrays carved out of a few allocations made
 * up front; a training step allocates nothing. Every projection (q, k, v, o,
 * gate, up, down and lm_head) is called through mt_linear, the one interface
 * adapter plugins wrap. */
#ifndef MT_CORE_MODEL_H
#define MT_CORE_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "moontune/moontune.h"

/* ---- configuration (from a Hugging Face config.json) -------------------- */

typedef enum mt_rope_type {
    MT_ROPE_DEFAULT = 0,
    MT_ROPE_LINEAR,  /* positions divided by factor */
    MT_ROPE_LLAMA3,  /* Llama 3.1 frequency bands */
} mt_rope_type;

typedef struct mt_model_config {
    char model_type[32]; /* "llama", "qwen2", "mistral", ... */
    int hidden_size;       /* C */
    int intermediate_size; /* F */
    int num_layers;        /* L */
    int num_heads;         /* H */
    int num_kv_heads;      /* KVH */
    int head_dim;          /* D */
    int vocab_size;        /* V */
    int max_position_embeddings;
    float rms_norm_eps;
    double rope_theta;
    mt_rope_type rope_type;
    double rope_factor;
    double rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_position_embeddings;
    int tie_word_embeddings;
    int qkv_bias; /* q/k/v projections carry biases (Qwen2, or Llama attention_bias) */
    int o_bias;   /* o_proj carries a bias (Llama attention_bias) */
    int mlp_bias; /* gate/up/down carry biases (Llama mlp_bias) */
} mt_model_config;

/* Parses a config.json; the error names the file and the key. */
mt_status mt_config_load(const char *path, mt_model_config *cfg, mt_error *err);
/* Parses config.json text; `source` names it in errors. */
mt_status mt_config_parse(const char *text, size_t len, const char *source, mt_model_config *cfg,
                          mt_error *err);
/* Named shapes for benchmarks: "tiny", "smollm2-135m", "llama-1b". */
mt_status mt_config_preset(const char *name, mt_model_config *cfg, mt_error *err);
/* Rope scaling factors (factor, and llama3's low/high_freq_factor) in use run from 1 to
 * 64; outside this range they would only underflow or overflow the fp32 frequencies. */
#define MT_ROPE_FACTOR_MIN 1e-6
#define MT_ROPE_FACTOR_MAX 1e6
/* Checks sizes are positive and consistent (heads divide, head_dim even, ...), each
 * against a bound, and the parameter count (in 64 bits) against 2^40; rope settings
 * within the ranges that keep the fp32 frequencies finite. Errors name the key, the
 * value found and what was expected. */
mt_status mt_config_validate(const mt_model_config *cfg, const char *source, mt_error *err);
/* Fills inv_freq (head_dim/2) exactly as transformers computes it in fp32,
 * including the rope scaling type. */
void mt_rope_inv_freq(const mt_model_config *cfg, float *inv_freq);

/* ---- the linear-layer interface ---------------------------------------- */

typedef enum mt_module {
    MT_MOD_Q, MT_MOD_K, MT_MOD_V, MT_MOD_O, MT_MOD_GATE, MT_MOD_UP, MT_MOD_DOWN, MT_MOD_LM_HEAD,
    MT_MOD_COUNT
} mt_module;

/* "q_proj", ..., "lm_head" as Hugging Face and PEFT name them. */
const char *mt_module_name(mt_module module);

typedef struct mt_linear mt_linear;

/* What an adapter installs in place of a projection (moontune/plugin.h). */
struct mt_linear_impl;

struct mt_linear {
    char name[64]; /* e.g. "model.layers.3.self_attn.q_proj" */
    mt_module module;
    int layer;     /* -1 for lm_head */
    int in, out;
    mt_backend *be;
    struct mt_model *model; /* the model this projection belongs to */
    float *weight; /* (out,in); NULL while released (QLoRA keeps its own copy) */
    float *bias;   /* (out) or NULL */
    float *grad_weight; /* (out,in) or NULL when frozen */
    float *grad_bias;   /* (out) or NULL */
    float *weight_memory; /* where weight lives when not released */
    /* The backend's int8 copies of weight while a decoder that made one runs
     * (generation), or a training step runs with mt_model_set_int8_training, or an
     * evaluation asked for int8 (mt_evaluate), else NULL:
     * the base forward then multiplies by weight_int8 and the input gradient by
     * weight_int8_t (of Wᵀ) in int8 (kernels/backend.h). */
    const void *weight_int8;
    const void *weight_int8_t;
    /* An adapter's computation replacing this projection, or NULL for the base layer. */
    const struct mt_linear_impl *impl;
    void *impl_self;
};

/* y (N,out) = x (N,in) · W^T + b, through the adapter when one wraps the layer. */
void mt_linear_forward(mt_linear *lin, float *y, const float *x, int N);
/* dx (N,in) += dy (N,out) · W; when the layer trains, also dW (out,in) += dy^T · x
 * and db (out) += column sums of dy. A frozen layer computes only dx. */
void mt_linear_backward(mt_linear *lin, float *dx, const float *dy, const float *x, int N);
/* The base layer alone, for adapters that wrap it. */
void mt_linear_base_forward(mt_linear *lin, float *y, const float *x, int N);
void mt_linear_base_backward(mt_linear *lin, float *dx, const float *dy, const float *x, int N);

/* The model's projections, numbered as adapters see them (the host table's
 * model_linear): per layer q, k, v, o, gate, up, down, then lm_head last. */
int mt_model_linear_count(const struct mt_model *m);
/* Projection index in [0, mt_model_linear_count(m)), or NULL outside it. */
mt_linear *mt_model_linear(struct mt_model *m, int index);

/* ---- parameters --------------------------------------------------------- */

typedef struct mt_param {
    char name[96]; /* Hugging Face name, e.g. "model.layers.0.mlp.up_proj.weight" */
    int ndim;
    int64_t shape[2];
    size_t numel;
    float *data;
    float *grad; /* NULL unless trainable (allocated when it becomes trainable) */
    int trainable;
    int no_decay; /* norms and biases: excluded from weight decay by default */
} mt_param;

typedef struct mt_layer {
    float *attn_norm; /* (C) input_layernorm.weight */
    float *attn_norm_grad, *mlp_norm_grad; /* (C) or NULL when frozen */
    mt_linear q, k, v, o;
    float *mlp_norm;  /* (C) post_attention_layernorm.weight */
    mt_linear gate, up, down;
} mt_layer;

/* Saved activations of one layer for one planned (B,T); BT = B*T rows. What
 * mt_model_set_recompute recomputes in backward points into buffers every layer shares:
 * with MT_RECOMPUTE_NORMS ln1, ln2 (one buffer) and act; with MT_RECOMPUTE_LAYERS all
 * but res_in. */
typedef struct mt_layer_acts {
    float *res_in;    /* (BT,C) the residual stream entering the layer */
    float *ln1;       /* (BT,C) */
    float *ln1_rstd;  /* (BT) */
    float *q;         /* (BT,H*D) after rotary embedding */
    float *k;         /* (BT,KVH*D) after rotary embedding */
    float *v;         /* (BT,KVH*D) */
    float *att;       /* (BT,H*D) attention output */
    float *lse;       /* (B,H,T) attention log-sum-exp */
    float *res_mid;   /* (BT,C) res_in + o_proj(att) */
    float *ln2;       /* (BT,C) */
    float *ln2_rstd;  /* (BT) */
    float *gate;      /* (BT,F) */
    float *up;        /* (BT,F) */
    float *act;       /* (BT,F) silu(gate) * up */
} mt_layer_acts;

/* What backward recomputes instead of keeping it from the forward (mt_model_set_recompute). */
typedef enum mt_recompute {
    MT_RECOMPUTE_OFF = 0,    /* every activation kept */
    MT_RECOMPUTE_NORMS = 1,  /* the norms' outputs and SwiGLU's product (cheap: no products) */
    MT_RECOMPUTE_LAYERS = 2, /* each layer from its input: gradient checkpointing */
} mt_recompute;

/* What mt_model_set_int8_training multiplies in int8 (see there). */
typedef enum mt_int8_training {
    MT_INT8_OFF = 0,
    MT_INT8_FORWARD = 1, /* the forward products; input gradients stay fp32 */
    MT_INT8_ALL = 2,     /* the forward and the input gradients (stochastically rounded) */
} mt_int8_training;

typedef struct mt_model {
    mt_model_config cfg;
    mt_backend *be;

    /* parameters: one allocation, described by params[] */
    mt_param *params;
    size_t num_params;
    size_t total_numel;
    float *param_memory;
    /* parameters adapters registered (LoRA A and B, ...): memory owned by the adapter */
    struct mt_param_view *extra_params;
    size_t num_extra, cap_extra;
    /* adapters attached to this model, for set_enabled (a reference pass without them) */
    struct mt_attached_adapter {
        const struct mt_adapter_vtable *vtable;
        void *state;
        int wraps; /* its attach wrapped projections: recomputing a layer runs its forward */
    } *adapters;
    size_t num_adapters;
    int adapters_enabled; /* as last set by mt_model_set_adapters_enabled (1 at creation) */
    float *embed;       /* (V,C) */
    float *final_norm;  /* (C) */
    float *embed_grad, *final_norm_grad; /* NULL when frozen */
    mt_layer *layers;   /* (L) */
    mt_linear lm_head;  /* weight aliases embed when tied */

    /* plan for one (B,T) shape */
    int plan_B, plan_T, plan_chunk;
    void *act_memory;
    size_t act_bytes;
    mt_layer_acts *acts;  /* (L) */
    float *res_out;       /* (BT,C) residual after the last layer */
    float *lnf;           /* (BT,C) final norm output */
    float *lnf_rstd;      /* (BT) */
    float *rope_cos, *rope_sin; /* (T, D/2) */
    int32_t *tokens, *positions, *segments, *targets; /* (BT) copies of the batch */
    int has_segments;
    float *logits_chunk;  /* (chunk,V) */
    float *chunk_losses;  /* (chunk) */
    /* the output layer of listed rows only (mt_model_logits_rows): their indices, their
     * gathered final-norm outputs and those outputs' gradient */
    int32_t *row_index;   /* (chunk) */
    float *rows_lnf;      /* (chunk,C) */
    float *rows_d_lnf;    /* (chunk,C) */
    /* backward scratch shared by all layers */
    float *d_res;   /* (BT,C) gradient of the residual stream */
    float *d_ln;    /* (BT,C) */
    float *d_att;   /* (BT,H*D) */
    float *d_q, *d_k, *d_v; /* (BT,H*D), (BT,KVH*D), (BT,KVH*D) */
    float *d_act, *d_gate, *d_up; /* (BT,F) */
    float *rstd_work; /* (BT) the rstd of a norm recomputed in backward */
    mt_recompute recompute; /* what the plan leaves to backward (mt_model_set_recompute) */
    void *att_work;
    float *host_losses;   /* (chunk) host copy of chunk_losses */
    int32_t *host_positions; /* (BT) default positions staged for upload */
    int32_t *host_rows, *host_row_targets; /* (chunk) the rows with a target of a chunk */
    int cur_B, cur_T;     /* shape of the last forward */
    int forward_done;     /* a forward ran; backward may follow */
    /* the base model's identity as loaded (core/model/model_identity.c), 64 hex digits, or ""
     * for a model not loaded from files; checkpoints record it and refuse another base */
    char fingerprint[65];
    /* mt_model_set_int8_training: wanted, and the frozen projections' copies (W and Wᵀ
     * for each of mt_model_linear_count, NULL where none), made at the first step */
    mt_int8_training int8_training;
    void **int8_copies;
    uint64_t int8_round_seed; /* counts the int8 input-gradient products: each its seed */
    /* mt_model_share_input: the activation several projections read next (q, k and v;
     * gate and up), its rows, and its int8 quantisation once a product made it */
    const float *shared_input;
    int shared_rows;
    void *shared_int8;
} mt_model;

/* Builds the parameter table and allocates parameters (zero) on the backend. */
mt_status mt_model_create(const mt_model_config *cfg, mt_backend *be, mt_model **out,
                          mt_error *err);
/* mt_model_create in two steps, for the loaders: the parameter table alone (names,
 * shapes, no memory; data pointers NULL), so that the weights on disk can be checked
 * against it first — a config.json or GGUF header that lies about its sizes is then
 * refused naming the tensor instead of allocating what it claims — then the memory. */
mt_status mt_model_create_table(const mt_model_config *cfg, mt_backend *be, mt_model **out,
                                mt_error *err);
mt_status mt_model_alloc_params(mt_model *m, mt_error *err);
void mt_model_free(mt_model *m);

/* MT_OK when every value of x is finite; otherwise an error naming the file, the
 * tensor, the count and the first non-finite value's index (weights are checked on load:
 * a NaN there would only show as NaN losses or garbage text later). */
mt_status mt_check_finite(const char *file, const char *tensor, const float *x, size_t n,
                          mt_error *err);
/* Loads a Hugging Face directory (config.json + model.safetensors or sharded). */
mt_status mt_model_load_hf(const char *dir, mt_backend *be, mt_model **out, mt_error *err);
/* Loads a GGUF file (llama, mistral, qwen2): config from its metadata, every tensor
 * dequantized to fp32 (llama's permuted q/k rows restored to transformers' order). */
mt_status mt_model_load_gguf(const char *path, mt_backend *be, mt_model **out, mt_error *err);
/* The GGUF name of a parameter ("blk.3.attn_q.weight" for
 * model.layers.3.self_attn.q_proj.weight); 0 when it has none. *n_head receives the
 * head count of q (num_heads) and k (num_kv_heads) projections, whose rows llama.cpp
 * permutes, and 0 otherwise. */
int mt_gguf_param_name(const mt_model *m, const mt_param *p, char *out, size_t size, int *n_head);
/* llama.cpp's row order for rotary q/k weights: HF row h*D + j*D/2 + i is GGUF row
 * h*D + 2i + j. to_gguf applies it, otherwise undoes it; rows of `cols` floats. */
void mt_gguf_permute_qk(float *dst, const float *src, int n_head, int D, size_t cols, int to_gguf);
/* A .gguf file or a Hugging Face model directory. */
mt_status mt_model_load(const char *path, mt_backend *be, mt_model **out, mt_error *err);
/* Loads weights from an opened safetensors set into an existing model; every
 * parameter must be present with its exact shape; unknown tensors are refused. */
struct mt_safetensors;
mt_status mt_model_load_weights(mt_model *m, const struct mt_safetensors *st, mt_error *err);
/* Fills parameters the way transformers initialises them: normal(0, std) for
 * matrices, ones for norms, zeros for biases. Deterministic from seed. */
mt_status mt_model_init_random(mt_model *m, uint64_t seed, float std, mt_error *err);

mt_param *mt_model_find_param(mt_model *m, const char *name);
/* The parameter whose memory starts at data (a layer's weight or bias), or NULL. */
mt_param *mt_model_param_of(mt_model *m, const float *data);
/* Marks every parameter trainable (full fine-tuning), allocating gradients. */
mt_status mt_model_set_all_trainable(mt_model *m, mt_error *err);
/* Makes one parameter trainable or frozen; a trainable one gets a zeroed gradient. */
mt_status mt_model_set_trainable(mt_model *m, mt_param *p, int trainable, mt_error *err);
/* Zeroes the gradients of every trainable parameter, adapters' included. */
void mt_model_zero_grad(mt_model *m);
/* Every trainable parameter: the base ones, then those adapters registered. The array
 * is the caller's to free; names and tensors point into the model. */
mt_status mt_model_trainable_params(mt_model *m, struct mt_param_view **out, size_t *count,
                                    mt_error *err);
/* Registers an adapter-owned trainable tensor (the name is copied). */
mt_status mt_model_add_param(mt_model *m, const struct mt_param_view *param, mt_error *err);
/* Global L2 norm of all trainable gradients; when max_norm > 0 and the norm exceeds
 * it, scales every gradient by max_norm / norm (torch.nn.utils.clip_grad_norm_). */
double mt_model_clip_grad_norm(mt_model *m, double max_norm);
/* Attaches an adapter instance: calls its attach() and remembers it. */
mt_status mt_model_attach_adapter(mt_model *m, const struct mt_adapter_vtable *vtable,
                                  void *state, mt_error *err);
/* Turns every attached adapter off or on (where the adapter supports it). */
void mt_model_set_adapters_enabled(mt_model *m, int enabled);
/* Training (dropout active) or evaluation mode for every attached adapter. */
void mt_model_set_training(mt_model *m, int training);
/* Frozen base products in int8 during training steps (off at creation). On: every
 * projection whose weight is frozen and present gets an int8 copy of W, and with
 * MT_INT8_ALL one of Wᵀ (the backend's, kernels/backend.h), made at the next
 * mt_model_int8_attach; its forward, and with MT_INT8_ALL its input gradient, then
 * multiply in int8; its adapter (LoRA's A and B) stays fp32. Off frees them. Anything
 * that may change a base weight or make it trainable drops the copies
 * (mt_model_int8_drop), and the next attach makes them again. */
void mt_model_set_int8_training(mt_model *m, mt_int8_training mode);
/* While int8 training is on: makes missing copies and points the projections at them;
 * returns how many projections multiply in int8 (0: off, or the backend has none). */
int mt_model_int8_attach(mt_model *m);
/* The projections back to fp32 (the copies are kept). */
void mt_model_int8_detach(mt_model *m);
/* Frees the copies (a weight changed, or its trainability). */
void mt_model_int8_drop(mt_model *m);
/* Between mt_model_share_input(m, x, N) and mt_model_share_input(m, NULL, 0), the base
 * products that multiply the N rows of x in int8 quantise x once between them (the
 * same bits: each would quantise it alike). x must not change in between: the callers
 * bracket the projections of one normed input. */
void mt_model_share_input(mt_model *m, const float *x, int N);
/* ys[i] = lins[i](x) for i < n, projections of one input x (N rows) through
 * mt_linear_forward, with x shared between them (mt_model_share_input); in one call of
 * the adapter's forward_shared where one impl with it wraps all of them. */
void mt_linears_forward_shared(mt_model *m, mt_linear *const *lins, float *const *ys, int n,
                               const float *x, int N);
/* mt_linear_backward(lins[i], dx, dys[i], x, N) for every i < n; in one call of the
 * adapter's backward_shared where one impl with it wraps all of them. */
void mt_linears_backward_shared(mt_linear *const *lins, float *dx, float *const *dys, int n,
                                const float *x, int N);
/* Releases / restores the fp32 base weight memory of a projection (CPU: pages go back
 * to the system and come back zero-filled). */
void mt_linear_release_weight(mt_linear *lin);
float *mt_linear_restore_weight(mt_linear *lin);

/* What backward recomputes (MT_RECOMPUTE_NORMS at creation), and so what the activation
 * plan holds: per layer and row, OFF keeps 6C + 2·KVD + 3F floats (C hidden, KVD key/value
 * width, F intermediate; 8448 for SmolLM2-135M), NORMS 4C + 2·KVD + 2F (the norm outputs
 * and SwiGLU's product are recomputed from what is kept: no products), LAYERS C (each
 * layer's forward runs again in backward, up to SwiGLU: about a third more work per step).
 * The gradients are the same bits in every mode. LAYERS runs adapters' forwards twice per
 * pass, so an adapter that wraps projections must replay (mt_adapter_vtable.set_replay);
 * one that cannot is refused here, or, attached after LAYERS was set, at the next
 * forward (mt_model_forward checks the mode every time). An existing plan
 * is made again for the new mode (its shape kept). */
mt_status mt_model_set_recompute(mt_model *m, mt_recompute mode, mt_error *err);
/* "off", "norms", "layers": the mode of that name into *mode; 0 when none is. */
int mt_recompute_parse(const char *name, mt_recompute *mode);

/* Allocates activation memory for batches of B rows of T tokens; chunk is the
 * number of rows whose logits are held at once (0 picks a default). */
mt_status mt_model_plan(mt_model *m, int B, int T, int chunk, mt_error *err);
/* Bytes planned for activations and scratch. */
size_t mt_model_plan_bytes(const mt_model *m);

/* Runs the decoder to the final norm. tokens (B,T); positions (B,T) or NULL for
 * 0..T-1 in every row; segments (B,T) or NULL (packed rows: attention stays
 * within equal segment ids, and MT_SHARED_SEGMENT's tokens are seen by all). B * T
 * must not exceed the plan's tokens, nor T its sequence unless positions are given
 * (they must stay below it). */
mt_status mt_model_forward(mt_model *m, const int32_t *tokens, const int32_t *positions,
                           const int32_t *segments, int B, int T, mt_error *err);
/* logits (nrows,V) for rows [row0, row0+nrows) of the last forward (row = b*T+t). */
mt_status mt_model_logits(mt_model *m, int row0, int nrows, float *logits, mt_error *err);
/* Mean cross-entropy over targets (B,T) of the last forward (negative = ignored),
 * computed chunk by chunk so that all logits are never held at once. When
 * backward is set, also propagates d(mean loss) into the final hidden state
 * and lm_head gradients; then call mt_model_backward. *n_targets (optional)
 * receives the number of unmasked targets. */
mt_status mt_model_cross_entropy(mt_model *m, const int32_t *targets, int backward, float *loss,
                                 int64_t *n_targets, mt_error *err);
/* Each row's Σ over its targets (B,T; negative = ignored) of log p(target) under the
 * last forward, into row_logp (B): a sequence's log-probability (0 for a row without
 * targets). No gradient. */
mt_status mt_model_sequence_logps(mt_model *m, const int32_t *targets, double *row_logp,
                                  mt_error *err);
/* Accumulates into the final hidden gradient from dlogits (nrows,V) of rows
 * [row0, row0+nrows), for losses that compute their own dlogits. */
mt_status mt_model_backward_logits(mt_model *m, int row0, int nrows, const float *dlogits,
                                   mt_error *err);
/* mt_model_logits and mt_model_backward_logits of the listed rows (row = b*T + t of the
 * last forward; nrows <= the plan's chunk; distinct): the output layer runs for those
 * rows only, e.g. the rows with a target. */
mt_status mt_model_logits_rows(mt_model *m, const int32_t *rows, int nrows, float *logits,
                               mt_error *err);
mt_status mt_model_backward_logits_rows(mt_model *m, const int32_t *rows, int nrows,
                                        const float *dlogits, mt_error *err);
/* Back-propagates from the final hidden gradient to every trainable parameter
 * (and the input gradients of every frozen layer); resets the hidden gradient. */
mt_status mt_model_backward(mt_model *m, mt_error *err);

/* Matrix-product FLOPs of one forward pass over B*T tokens: the linear layers
 * (lm_head included) and causal attention (QK^T and PV), counted separately
 * because a frozen backward repeats only part of them. */
void mt_model_forward_flops(const mt_model_config *cfg, int B, int T, double *linear,
                            double *attention);
size_t mt_config_num_params(const mt_model_config *cfg);

#endif /* MT_CORE_MODEL_H */
