/* full.c — full fine-tuning: the base weights themselves become trainable.
 *
 * By default every projection but lm_head (PEFT's "all-linear"), the embeddings and
 * the norms train — the whole model, as torchtune's full recipes do. Each can be
 * narrowed: target_modules picks projections, train_embeddings and train_norms the
 * rest. Nothing is wrapped and nothing needs merging: the weights are the model.
 *
 * merge and unmerge therefore succeed doing nothing, so that the merged exports
 * (model:export_merged, export_gguf) write the trained weights as they are. There is no
 * save: a full fine-tune has no adapter directory, it is exported as a whole model. */
#include <moontune/plugin.h>
#include <string.h>

static const mt_host *host;

typedef struct full_state {
    const mt_options *opts;
} full_state;

static const mt_option_spec options[] = {
    {"target_modules", MT_OPT_STRING_LIST, "all-linear", 1, 0,
     "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head|all-linear",
     "projections whose weights (and biases) train; all-linear = every one but lm_head"},
    {"train_embeddings", MT_OPT_BOOL, "true", 1, 0, NULL,
     "train the token embeddings (and an untied lm_head)"},
    {"train_norms", MT_OPT_BOOL, "true", 1, 0, NULL, "train the RMSNorm weights"},
};

static mt_status full_create(const mt_host *h, const mt_options *opts, void **state,
                             mt_error *err) {
    full_state *s = h->alloc(sizeof *s);
    if (!s) return h->error(err, MT_ERR_NOMEM, "full: out of memory");
    s->opts = opts;
    *state = s;
    return MT_OK;
}

static void full_destroy(void *state) { host->free(state); }

static int targeted(const mt_options *opts, const char *module) {
    int n = host->opt_list_len(opts, "target_modules");
    for (int i = 0; i < n; i++) {
        const char *t = host->opt_list_item(opts, "target_modules", i);
        if (!strcmp(t, module) || (!strcmp(t, "all-linear") && strcmp(module, "lm_head")))
            return 1;
    }
    return 0;
}

static mt_status full_attach(void *state, mt_model_handle *model, mt_error *err) {
    full_state *s = state;
    mt_status st;
    int n_linear = host->model_linear_count(model);
    for (int i = 0; i < n_linear; i++) {
        mt_linear_handle *lin = host->model_linear(model, i);
        mt_linear_info info = {.size = sizeof info}; /* ABI 2: the caller sets the size */
        host->linear_info(lin, &info);
        if (targeted(s->opts, info.module) &&
            (st = host->linear_set_trainable(lin, 1, err)))
            return st;
    }
    int train_embeddings = host->opt_bool(s->opts, "train_embeddings");
    int train_norms = host->opt_bool(s->opts, "train_norms");
    int n_params = host->model_param_count(model);
    for (int i = 0; i < n_params; i++) {
        const char *name = host->model_param_name(model, i);
        size_t len = strlen(name), suffix = strlen("norm.weight");
        int is_norm = len >= suffix && !strcmp(name + len - suffix, "norm.weight");
        int is_embedding = !strcmp(name, "model.embed_tokens.weight") ||
                           !strcmp(name, "lm_head.weight");
        if (((is_norm && train_norms) || (is_embedding && train_embeddings)) &&
            (st = host->model_set_param_trainable(model, name, 1, err)))
            return st;
    }
    return MT_OK;
}

/* The trained weights are the model's own: there is nothing to fold in or out. */
static mt_status full_merge(void *state, mt_error *err) {
    (void)state;
    (void)err;
    return MT_OK;
}

static mt_status full_unmerge(void *state, mt_error *err) {
    (void)state;
    (void)err;
    return MT_OK;
}

static const mt_adapter_vtable vtable = {
    MT_VTABLE_SIZE(mt_adapter_vtable),
    .create = full_create,
    .destroy = full_destroy,
    .attach = full_attach,
    .merge = full_merge,
    .unmerge = full_unmerge,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_ADAPTER,
                 .name = "full",
                 .version = "1.0.0",
                 .description = "full fine-tuning: the chosen base weights, embeddings and norms train",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
