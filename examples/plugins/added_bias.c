/* added_bias.c — an out-of-tree adapter plugin: a trainable bias added to the output of
 * chosen projections (in the spirit of BitFit), written against the installed
 * moontune/plugin.h alone. The base weights stay frozen; per wrapped projection the
 * adapter trains one vector b of `out` values, zeros at first:
 *
 *     y  = base(x) + b                 every row of y (N, out) gets b
 *     db += Σ_rows dy                  the bias' gradient
 *     dx += base'(dy)                  the base layer's own backward
 *
 * What it shows (plugin ABI 2):
 * - attach: walking the model's projections (linear_info with its size set), wrapping
 *   them (linear_wrap with an mt_linear_impl that carries its size), registering the
 *   adapter's own tensors as trainable parameters (model_add_param);
 * - the device rule: b, its gradient and a column of ones live on the model's device
 *   (tensor_alloc), and broadcasting and summing over rows are matrix products with that
 *   column (host->matmul), in tiles of TILE rows so that the ones need not grow with N;
 * - set_enabled (DPO's reference pass runs the base alone).
 * Optional slots it leaves out: merge/unmerge (a base layer may have no bias to fold b
 * into), state slots (it has no state beyond its parameters, which the host saves), and
 * save/import_options/load (there is no PEFT format for it; plugins/adapter/lora.c shows
 * them).
 *
 * Build it against an installed moontune:
 *   cc -std=c11 -shared -fPIC -fvisibility=hidden $(pkg-config --cflags moontune) \
 *      added_bias.c -o ~/moontune-plugins/added_bias.so
 * and use it in a recipe as adapter = {name = "added_bias", target_modules = "v_proj"}. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <moontune/plugin.h>

#define NAME "added_bias"
#define TILE 256 /* rows per matrix product with the column of ones */

static const mt_host *host;

static const char *const MODULES[] = {"q_proj",    "k_proj", "v_proj",    "o_proj",
                                       "gate_proj", "up_proj", "down_proj", "lm_head"};

static const mt_option_spec options[] = {
    {"target_modules", MT_OPT_STRING_LIST, "q_proj,v_proj", 1, 0,
     "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head",
     "the projections that get a trainable output bias"},
};

typedef struct added_bias added_bias;

typedef struct layer {
    added_bias *ab;
    mt_linear_handle *lin;
    int out;
    mt_tensor bias, grad; /* (1, out) on the model's device */
    char name[256];       /* "<projection>.added_bias" */
} layer;

struct added_bias {
    unsigned targets; /* bit i: MODULES[i] is wrapped */
    int enabled;
    mt_device device;
    mt_tensor ones; /* (TILE, 1), all ones */
    layer *layers;
    int n_layers;
};

static mt_status create(const mt_host *h, const mt_options *opts, void **state, mt_error *err) {
    added_bias *ab = h->alloc(sizeof *ab);
    if (!ab) return h->error(err, MT_ERR_NOMEM, NAME ": out of memory");
    /* the host validated every name against the option's choices */
    for (int i = 0; i < h->opt_list_len(opts, "target_modules"); i++)
        for (unsigned m = 0; m < sizeof MODULES / sizeof MODULES[0]; m++)
            if (!strcmp(h->opt_list_item(opts, "target_modules", i), MODULES[m]))
                ab->targets |= 1u << m;
    ab->enabled = 1;
    *state = ab;
    return MT_OK;
}

static void destroy(void *state) {
    added_bias *ab = state;
    if (!ab) return;
    for (int i = 0; i < ab->n_layers; i++) {
        host->tensor_free(&ab->layers[i].bias);
        host->tensor_free(&ab->layers[i].grad);
    }
    host->tensor_free(&ab->ones);
    host->free(ab->layers);
    host->free(ab);
}

static int targeted(const added_bias *ab, const char *module) {
    for (unsigned m = 0; m < sizeof MODULES / sizeof MODULES[0]; m++)
        if (!strcmp(MODULES[m], module)) return (ab->targets >> m) & 1;
    return 0;
}

/* y (N, out) = base(x) + b, b added to each row as ones (n,1) · b (1,out). */
static void forward(void *self, mt_tensor *y, const mt_tensor *x) {
    layer *L = self;
    host->linear_base_forward(L->lin, y, x);
    if (!L->ab->enabled) return;
    for (int64_t r0 = 0; r0 < y->shape[0]; r0 += TILE) {
        const int64_t n = y->shape[0] - r0 < TILE ? y->shape[0] - r0 : TILE;
        mt_tensor yt = mt_tensor_rows(y, r0, n), ones = mt_tensor_2d(&L->ab->ones, n, 1);
        host->matmul(&yt, &ones, &L->bias, 0, 0, 1.0f, 1.0f);
    }
}

/* dx += base'(dy); db (1, out) += ones^T (1,n) · dy (n, out). */
static void backward(void *self, mt_tensor *dx, const mt_tensor *dy, const mt_tensor *x) {
    layer *L = self;
    host->linear_base_backward(L->lin, dx, dy, x);
    if (!L->ab->enabled) return;
    for (int64_t r0 = 0; r0 < dy->shape[0]; r0 += TILE) {
        const int64_t n = dy->shape[0] - r0 < TILE ? dy->shape[0] - r0 : TILE;
        mt_tensor dyt = mt_tensor_rows(dy, r0, n), ones = mt_tensor_2d(&L->ab->ones, n, 1);
        host->matmul(&L->grad, &ones, &dyt, 1, 0, 1.0f, 1.0f);
    }
}

static const mt_linear_impl impl = {
    MT_VTABLE_SIZE(mt_linear_impl),
    .forward = forward,
    .backward = backward,
};

static mt_status attach(void *state, mt_model_handle *model, mt_error *err) {
    added_bias *ab = state;
    if (ab->layers) return host->error(err, MT_ERR_INVALID_ARG, NAME ": already attached");
    ab->device = host->model_device(model);
    const int n = host->model_linear_count(model);
    ab->layers = host->alloc((size_t)(n > 0 ? n : 1) * sizeof *ab->layers);
    if (!ab->layers) return host->error(err, MT_ERR_NOMEM, NAME ": out of memory");
    const int64_t ones_shape[2] = {TILE, 1};
    mt_status st = host->tensor_alloc(ab->device, MT_F32, 2, ones_shape, &ab->ones, err);
    if (st) return st;
    host->fill(&ab->ones, 1.0f);
    for (int i = 0; i < n && !st; i++) {
        mt_linear_handle *lin = host->model_linear(model, i);
        mt_linear_info info = {.size = sizeof info}; /* the host fills what we know */
        host->linear_info(lin, &info);
        if (!targeted(ab, info.module)) continue;
        layer *L = &ab->layers[ab->n_layers++];
        L->ab = ab;
        L->lin = lin;
        L->out = info.out;
        const int64_t shape[2] = {1, info.out};
        if (snprintf(L->name, sizeof L->name, "%s.added_bias", info.name) >= (int)sizeof L->name)
            return host->error(err, MT_ERR_INVALID_ARG, NAME ": name too long: %s", info.name);
        st = host->tensor_alloc(ab->device, MT_F32, 2, shape, &L->bias, err); /* zeros */
        if (!st) st = host->tensor_alloc(ab->device, MT_F32, 2, shape, &L->grad, err);
        mt_param_view view = {.size = sizeof view, .name = L->name, .value = L->bias,
                              .grad = L->grad, .no_decay = 1 /* a bias, as the default */};
        if (!st) st = host->model_add_param(model, &view, err);
        if (!st) st = host->linear_wrap(lin, &impl, L, err);
    }
    if (st) return st;
    if (!ab->n_layers)
        return host->error(err, MT_ERR_INVALID_ARG,
                           NAME ": the model has no projection named in target_modules");
    host->log(MT_LOG_INFO, NAME, "a bias on %d projections", ab->n_layers);
    return host->check(err);
}

static void set_enabled(void *state, int enabled) { ((added_bias *)state)->enabled = enabled; }

static const mt_adapter_vtable vtable = {
    MT_VTABLE_SIZE(mt_adapter_vtable),
    .create = create,
    .destroy = destroy,
    .attach = attach,
    .set_enabled = set_enabled,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_ADAPTER,
                 .name = NAME,
                 .version = "0.1.0",
                 .description = "a trainable bias added to the output of chosen projections "
                                "(an example)",
                 .options = options,
                 .n_options = sizeof options / sizeof options[0],
                 .vtable = &vtable)
