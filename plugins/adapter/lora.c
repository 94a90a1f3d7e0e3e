/* lora.c — LoRA (Hu et al., 2021) as PEFT implements it.
 *
 * A targeted projection y = x W^T + b becomes
 *
 *     y = x W^T + b + s · dropout(x) A^T B^T        A (r,in), B (out,r), s = alpha / r
 *                                                   (alpha / sqrt(r) with use_rslora)
 *
 * with W and b frozen. Backward, with xd = dropout(x), u = xd A^T (N,r), g = dy B (N,r):
 *
 *     dx += dy W  +  s · (g A) ⊙ mask/(1-p)       (the base part from the host)
 *     dB += s · dy^T u,   dA += s · g^T xd
 *
 * Initialisation is PEFT's: A is Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in),
 * 1/sqrt(in)), drawn on the host from host->random_uniform(seed, ...) and uploaded; B is
 * zero, so the adapted model starts equal to the base. Parameters are registered as
 * PEFT names them in a saved adapter: "<projection>.lora_A.weight" (r,in) and
 * "<projection>.lora_B.weight" (out,r).
 *
 * Devices (plugin ABI 2). A, B, their gradients and the scratch live on the model's
 * device (host->tensor_alloc) and the plugin never reads them: every product is a
 * host->matmul on tensors, dropout is host->dropout, so the same code runs on the CPU
 * and on CUDA.
 *
 * Memory: A, B and their gradients per projection, plus scratch tensors shared by every
 * wrapped projection (the host never calls two of them at once), allocated in attach
 * and sized for tiles of LORA_TILE rows (LORA_DROPOUT_TILE with dropout, whose scratch
 * holds a tile of dropout(x)). Forward and backward walk the N rows in such tiles
 * (mt_tensor_rows views), so nothing is allocated after attach, whatever N is. u is not
 * kept from forward to backward: backward recomputes it per tile (N·in·r multiply-adds,
 * r/out of the base's own cost), which is what makes the scratch independent of N.
 *
 * Dropout (PEFT's nn.Dropout on the branch input: keep with probability 1-p, scale the
 * kept values by 1/(1-p)) draws its mask from the host's counter-based stream keyed by
 * (seed, the projection, the pass) with the element's index as counter, and backward
 * draws the same mask again (host->dropout accumulating into dx) instead of storing it.
 * The pass is a per-projection count of forward calls made with the branch active:
 * backward uses the mask of the latest forward, the one whose input the model hands
 * back. So a projection must be run by one forward call per pass, as the model does;
 * gradient checkpointing's second forward of a layer comes between set_replay(1) and
 * set_replay(0), and keeps the pass.
 * Dropout applies in training only: set_training(0) (evaluation, generation) turns it
 * off. The pass counters are the adapter's checkpoint state (state_get/state_set: one
 * I64 tensor "dropout_pass", one entry per wrapped projection), so a resumed run draws
 * the masks the uninterrupted run would have drawn.
 *
 * merge() folds W += s·B·A into the base weights (through linear_info) and unmerge()
 * subtracts it again; while merged, forward and backward are the base layer's only,
 * so no gradients reach A and B. set_enabled(0) turns the branch off (DPO's
 * reference model); the base still runs. merge() and unmerge() do nothing when the
 * adapter already is in that state (PEFT warns and does nothing).
 *
 * Saving and loading the adapter as a PEFT directory (the vtable's save,
 * import_options and load) are in lora_peft.h, included below for both plugins.
 *
 * The wrapped projections point into this adapter's state, and the ABI has no detach:
 * destroy the adapter only once the model is freed or will not run again.
 *
 * qlora.c includes this file (with LORA_NO_ENTRY defined) and replaces the base
 * computation through the hooks in struct lora: the LoRA part is written once. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <moontune/plugin.h>

static const mt_host *host;

/* Rows of x per step of the branch's loops: large, since the branch's products are
 * skinny (K or N = r) and lose speed on short tiles; shorter with dropout, whose
 * scratch holds a (tile, in) block of dropout(x). */
enum { LORA_TILE = 4096, LORA_DROPOUT_TILE = 256 };

/* ---- options ---- */

#define LORA_MODULE_CHOICES "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|all-linear"

static const mt_option_spec lora_options[] = {
    {"r", MT_OPT_INT, "8", 1, 65536, NULL, "rank of the update B·A"},
    {"alpha", MT_OPT_FLOAT, "16", 0, 1e30, NULL,
     "scaling numerator: the branch is scaled by alpha / r (alpha / sqrt(r) with use_rslora)"},
    {"dropout", MT_OPT_FLOAT, "0", 0, 1, NULL,
     "dropout probability on the branch input, in [0, 1); training passes only"},
    {"target_modules", MT_OPT_STRING_LIST, "q_proj,v_proj", 1, 0, LORA_MODULE_CHOICES,
     "projections that get a LoRA branch; all-linear = every projection but lm_head"},
    {"use_rslora", MT_OPT_BOOL, "false", 1, 0, NULL,
     "rank-stabilised scaling alpha / sqrt(r) instead of alpha / r"},
    {"seed", MT_OPT_INT, "0", 0, 9007199254740992.0, NULL,
     "seed of the initialisation of A and of the dropout masks"},
};

/* ---- state ---- */

typedef struct lora lora;

/* Projections of one layer that read the same input (q, k, v; gate, up) and have a
 * branch: their A (and dA) are rows of one (n·r, in) tensor, so that forward_shared and
 * backward_shared multiply the input by all of them in one product. Every branch is in
 * a group, the others (o, down) alone in theirs. */
enum { LORA_GROUP_MAX = 3 };
typedef struct lora_group {
    mt_tensor A, dA;    /* (n·r, in): the members' A and dA stacked in the members' order */
    int n;
    int member[LORA_GROUP_MAX]; /* indices into lora.layers, in the model's order */
} lora_group;

typedef struct lora_layer {
    lora *lo;
    mt_linear_handle *lin;
    int index;          /* the projection's index in the model: keys init and dropout */
    int in, out;
    int layer;          /* the decoder layer (mt_linear_info.layer) */
    int module;         /* lora_modules index */
    int r;              /* 0: no branch (qlora's quantized projections without LoRA) */
    int group;          /* with a branch: its lora_group */
    mt_tensor A, B;     /* (r,in), (out,r) on the model's device; A a view into the group's */
    mt_tensor dA, dB;   /* gradients, same shapes; dA a view into the group's */
    uint64_t pass;      /* forward calls with the branch active: selects the dropout mask */
    void *base;         /* qlora: the quantized base weight */
    mt_tensor bias;     /* qlora: the base bias (out), data NULL when none */
    char name_A[112], name_B[112];
} lora_layer;

struct lora {
    const char *plugin; /* "lora" or "qlora", for messages */
    int r;
    float alpha, scaling, dropout;
    int use_rslora;
    uint64_t seed;
    unsigned targets;   /* bit m: module m gets a branch (see lora_modules) */
    int attached, enabled, merged;
    int training;       /* dropout only while training (set_training) */
    int replaying;      /* set_replay: forwards repeat the latest pass's masks */
    int tile;           /* rows per step: LORA_TILE, or LORA_DROPOUT_TILE with dropout */
    mt_device device;   /* the model's */
    lora_layer *layers;
    int n_layers;
    lora_group *groups;
    int n_groups;
    int group_max;      /* members of the largest group */
    int64_t n_trainable;
    /* scratch shared by every layer, allocated in attach on the model's device */
    mt_tensor xd;       /* (tile, in_max) dropout(x); data NULL without dropout */
    mt_tensor u, g;     /* tile·group_max·r floats: (tile, r), or a group's (n·r, tile) */
    int64_t *pass_state; /* (n_layers) host copy of the passes, for state_get */
    /* hooks: the base computation, and what attach does to every projection. lora
     * leaves prepare NULL (only targeted projections are wrapped) and calls the host's
     * base layer; qlora wraps every projection but lm_head and quantizes its weight. */
    mt_status (*prepare)(lora *lo, lora_layer *L, const mt_linear_info *info, mt_error *err);
    mt_status (*alloc_extra)(lora *lo, mt_error *err); /* after every prepare: scratch */
    void (*base_forward)(lora_layer *L, mt_tensor *y, const mt_tensor *x);
    void (*base_backward)(lora_layer *L, mt_tensor *dx, const mt_tensor *dy, const mt_tensor *x);
    void (*free_extra)(lora *lo);
    void *extra;        /* qlora's own state */
};

static const char *const lora_modules[] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"};
enum { LORA_N_MODULES = 7 };

static int lora_module_index(const char *module) {
    for (int m = 0; m < LORA_N_MODULES; m++)
        if (!strcmp(module, lora_modules[m])) return m;
    return -1; /* lm_head */
}

/* ---- random numbers ---- */

/* Stream keys: one for the initialisation of each projection, one per (projection,
 * pass) for dropout; the counter is the element's index. */
static uint64_t lora_init_key(const lora *lo, int index) {
    return mt_mix64(lo->seed ^ mt_mix64(0x4C6F5241496E6974ull ^ (uint64_t)index));
}

static uint64_t lora_dropout_key(const lora *lo, int index, uint64_t pass) {
    return mt_mix64(lo->seed ^ mt_mix64(0x4C6F524144726F70ull ^ ((uint64_t)index << 40) ^ pass));
}

/* ---- the wrapped projection ---- */

static int lora_branch_active(const lora_layer *L) {
    return L->r > 0 && L->lo->enabled && !L->lo->merged;
}

static void lora_host_base_forward(lora_layer *L, mt_tensor *y, const mt_tensor *x) {
    host->linear_base_forward(L->lin, y, x);
}

static void lora_host_base_backward(lora_layer *L, mt_tensor *dx, const mt_tensor *dy,
                                    const mt_tensor *x) {
    host->linear_base_backward(L->lin, dx, dy, x);
}

/* Dropout is drawn in training passes only. */
static int lora_drops(const lora *lo) { return lo->training && lo->dropout > 0; }

/* y (N,out) = base(x) + s · dropout(x) A^T B^T */
static void lora_forward(void *self, mt_tensor *y, const mt_tensor *x) {
    lora_layer *L = self;
    lora *lo = L->lo;
    lo->base_forward(L, y, x);
    if (!lora_branch_active(L)) return;
    const int64_t N = x->shape[0], in = L->in, r = L->r;
    const int drops = lora_drops(lo);
    if (drops && !lo->replaying) L->pass++;
    const uint64_t key = drops ? lora_dropout_key(lo, L->index, L->pass) : 0;
    for (int64_t n0 = 0; n0 < N; n0 += lo->tile) {
        const int64_t nt = N - n0 < lo->tile ? N - n0 : lo->tile;
        mt_tensor xt = mt_tensor_rows(x, n0, nt), yt = mt_tensor_rows(y, n0, nt);
        mt_tensor u = mt_tensor_2d(&lo->u, nt, r), xd = mt_tensor_2d(&lo->xd, nt, in);
        const mt_tensor *src = &xt;
        if (drops) { /* xd = dropout(x) of rows [n0, n0+nt): counters from element n0·in */
            host->dropout(&xd, &xt, lo->dropout, key, (uint64_t)(n0 * in), 0);
            src = &xd;
        }
        host->matmul(&u, src, &L->A, 0, 1, 1.0f, 0.0f);          /* u (nt,r) = xt A^T */
        host->matmul(&yt, &u, &L->B, 0, 1, lo->scaling, 1.0f);   /* y += s u B^T */
    }
}

/* dx (N,in) += base'(dy) + s · ((dy B) A) ⊙ mask/(1-p); dA, dB accumulate. */
static void lora_backward(void *self, mt_tensor *dx, const mt_tensor *dy, const mt_tensor *x) {
    lora_layer *L = self;
    lora *lo = L->lo;
    lo->base_backward(L, dx, dy, x);
    if (!lora_branch_active(L)) return;
    const int64_t N = x->shape[0], in = L->in, r = L->r;
    const float s = lo->scaling;
    const int drops = lora_drops(lo);
    const uint64_t key = drops ? lora_dropout_key(lo, L->index, L->pass) : 0;
    for (int64_t n0 = 0; n0 < N; n0 += lo->tile) {
        const int64_t nt = N - n0 < lo->tile ? N - n0 : lo->tile;
        mt_tensor xt = mt_tensor_rows(x, n0, nt), dyt = mt_tensor_rows(dy, n0, nt),
                  dxt = mt_tensor_rows(dx, n0, nt);
        mt_tensor u = mt_tensor_2d(&lo->u, nt, r), g = mt_tensor_2d(&lo->g, nt, r),
                  xd = mt_tensor_2d(&lo->xd, nt, in);
        const mt_tensor *src = &xt;
        if (drops) { /* the forward's mask again: same key, same counters */
            host->dropout(&xd, &xt, lo->dropout, key, (uint64_t)(n0 * in), 0);
            src = &xd;
        }
        host->matmul(&u, src, &L->A, 0, 1, 1.0f, 0.0f);  /* u (nt,r) = xt A^T */
        host->matmul(&g, &dyt, &L->B, 0, 0, 1.0f, 0.0f); /* g (nt,r) = dy B */
        host->matmul(&L->dB, &dyt, &u, 1, 0, s, 1.0f);   /* dB += s dy^T u */
        host->matmul(&L->dA, &g, src, 1, 0, s, 1.0f);    /* dA += s g^T xt */
        if (drops) {
            /* xd is free again: t (nt,in) = s g A, then dx += t ⊙ mask/(1-p) */
            host->matmul(&xd, &g, &L->A, 0, 0, s, 0.0f);
            host->dropout(&dxt, &xd, lo->dropout, key, (uint64_t)(n0 * in), 1);
        } else {
            host->matmul(&dxt, &g, &L->A, 0, 0, s, 1.0f); /* dx += s g A */
        }
    }
}

/* Which projections read the same input: 1 the attention's (q, k, v), 2 the MLP's
 * (gate, up), 0 neither. */
static int lora_input_class(int module) {
    return module <= 2 ? 1 : module == 4 || module == 5 ? 2 : 0;
}

/* The group whose members are exactly the branches among selves, in their order, when
 * one product can serve them all; else NULL (then each projection runs alone). Not with
 * dropout in training: each projection draws its own mask, so their inputs differ. */
static lora_group *lora_shared_group(void *const *selves, int n) {
    const lora_layer *L0 = selves[0];
    const lora *lo = L0->lo;
    if (lora_drops(lo)) return NULL;
    lora_group *G = NULL;
    int k = 0;
    for (int i = 0; i < n; i++) {
        const lora_layer *L = selves[i];
        if (L->lo != lo) return NULL; /* another instance of this plugin */
        if (!lora_branch_active(L)) continue;
        if (!G) G = &lo->groups[L->group];
        if (k >= G->n || &lo->layers[G->member[k]] != L) return NULL;
        k++;
    }
    return G && k == G->n && k > 1 ? G : NULL;
}

/* forward of each projection, with the branches' u = x Aᵀ as one product:
 * uᵀ (n·r, N) = A_G xᵀ, whose rows k·r .. k·r + r-1 are member k's uᵀ. */
static void lora_forward_shared(void *const *selves, int n, mt_tensor *const *ys,
                                const mt_tensor *x) {
    const lora_group *G = lora_shared_group(selves, n);
    if (!G) {
        for (int i = 0; i < n; i++) lora_forward(selves[i], ys[i], x);
        return;
    }
    lora *lo = ((lora_layer *)selves[0])->lo;
    for (int i = 0; i < n; i++) lo->base_forward(selves[i], ys[i], x);
    const int64_t N = x->shape[0], r = lo->r;
    for (int64_t n0 = 0; n0 < N; n0 += lo->tile) {
        const int64_t nt = N - n0 < lo->tile ? N - n0 : lo->tile;
        mt_tensor xt = mt_tensor_rows(x, n0, nt), ut = mt_tensor_2d(&lo->u, G->n * r, nt);
        host->matmul(&ut, &G->A, &xt, 0, 1, 1.0f, 0.0f); /* uᵀ (n·r,nt) = A_G xtᵀ */
        for (int i = 0, k = 0; i < n; i++) {
            lora_layer *L = selves[i];
            if (!lora_branch_active(L)) continue;
            mt_tensor uk = mt_tensor_rows(&ut, k++ * r, r), yt = mt_tensor_rows(ys[i], n0, nt);
            host->matmul(&yt, &uk, &L->B, 1, 1, lo->scaling, 1.0f); /* y += s u Bᵀ */
        }
    }
}

/* backward of each projection: the bases' terms of dx, then the branches' with u
 * recomputed for all members in one product, dA_G += s gᵀ x as one and dx += s g A_G
 * as one (g (N, n·r): the members' g side by side, held as gᵀ). */
static void lora_backward_shared(void *const *selves, int n, mt_tensor *dx,
                                 const mt_tensor *const *dys, const mt_tensor *x) {
    lora_group *G = lora_shared_group(selves, n);
    if (!G) {
        for (int i = 0; i < n; i++) lora_backward(selves[i], dx, dys[i], x);
        return;
    }
    lora *lo = ((lora_layer *)selves[0])->lo;
    for (int i = 0; i < n; i++) lo->base_backward(selves[i], dx, dys[i], x);
    const int64_t N = x->shape[0], r = lo->r;
    const float s = lo->scaling;
    for (int64_t n0 = 0; n0 < N; n0 += lo->tile) {
        const int64_t nt = N - n0 < lo->tile ? N - n0 : lo->tile;
        mt_tensor xt = mt_tensor_rows(x, n0, nt), dxt = mt_tensor_rows(dx, n0, nt);
        mt_tensor ut = mt_tensor_2d(&lo->u, G->n * r, nt), gt = mt_tensor_2d(&lo->g, G->n * r, nt);
        host->matmul(&ut, &G->A, &xt, 0, 1, 1.0f, 0.0f); /* uᵀ (n·r,nt) = A_G xtᵀ */
        for (int i = 0, k = 0; i < n; i++) {
            lora_layer *L = selves[i];
            if (!lora_branch_active(L)) continue;
            mt_tensor uk = mt_tensor_rows(&ut, k * r, r), gk = mt_tensor_rows(&gt, k * r, r);
            k++;
            mt_tensor dyt = mt_tensor_rows(dys[i], n0, nt);
            host->matmul(&gk, &L->B, &dyt, 1, 1, 1.0f, 0.0f); /* gᵀ (r,nt) = Bᵀ dytᵀ */
            host->matmul(&L->dB, &dyt, &uk, 1, 1, s, 1.0f);   /* dB += s dyᵀ u */
        }
        host->matmul(&G->dA, &gt, &xt, 0, 0, s, 1.0f);  /* dA_G += s gᵀ xt */
        host->matmul(&dxt, &gt, &G->A, 1, 0, s, 1.0f);  /* dx += s g A_G */
    }
}

static const mt_linear_impl lora_impl = {
    MT_VTABLE_SIZE(mt_linear_impl),
    .forward = lora_forward,
    .backward = lora_backward,
    .forward_shared = lora_forward_shared,
    .backward_shared = lora_backward_shared,
};

/* ---- create / destroy ---- */

static void lora_destroy(void *state) {
    lora *lo = state;
    if (!lo) return;
    if (lo->free_extra) lo->free_extra(lo);
    for (int i = 0; i < lo->n_layers; i++) { /* A and dA are views into their group's */
        host->tensor_free(&lo->layers[i].B);
        host->tensor_free(&lo->layers[i].dB);
    }
    for (int i = 0; i < lo->n_groups; i++) {
        host->tensor_free(&lo->groups[i].A);
        host->tensor_free(&lo->groups[i].dA);
    }
    host->free(lo->groups);
    host->tensor_free(&lo->xd);
    host->tensor_free(&lo->u);
    host->tensor_free(&lo->g);
    host->free(lo->pass_state);
    host->free(lo->layers);
    host->free(lo);
}

static mt_status lora_create_named(const char *plugin, const mt_host *h, const mt_options *opts,
                                   void **state, mt_error *err) {
    lora *lo = h->alloc(sizeof *lo);
    if (!lo) return h->error(err, MT_ERR_NOMEM, "%s: out of memory", plugin);
    lo->plugin = plugin;
    lo->r = (int)h->opt_int(opts, "r");
    lo->alpha = (float)h->opt_float(opts, "alpha");
    lo->dropout = (float)h->opt_float(opts, "dropout");
    lo->use_rslora = h->opt_bool(opts, "use_rslora");
    lo->seed = (uint64_t)h->opt_int(opts, "seed");
    lo->enabled = 1;
    lo->training = 1;
    lo->base_forward = lora_host_base_forward;
    lo->base_backward = lora_host_base_backward;
    mt_status st = MT_OK;
    if (lo->r < 1)
        st = h->error(err, MT_ERR_INVALID_ARG, "%s: option r must be at least 1, got %d", plugin,
                      lo->r);
    else if (!(lo->dropout >= 0.0f && lo->dropout < 1.0f))
        st = h->error(err, MT_ERR_INVALID_ARG, "%s: option dropout must be in [0, 1), got %g",
                      plugin, (double)lo->dropout);
    /* PEFT: lora_alpha / r, or lora_alpha / math.sqrt(r), in double, then used as fp32 */
    lo->scaling = (float)(lo->use_rslora ? lo->alpha / sqrt((double)lo->r)
                                         : (double)lo->alpha / lo->r);
    int n = h->opt_list_len(opts, "target_modules");
    for (int i = 0; !st && i < n; i++) {
        const char *t = h->opt_list_item(opts, "target_modules", i);
        int m = lora_module_index(t);
        if (!strcmp(t, "all-linear"))
            lo->targets |= (1u << LORA_N_MODULES) - 1;
        else if (m >= 0)
            lo->targets |= 1u << m;
        else
            st = h->error(err, MT_ERR_INVALID_ARG,
                          "%s: target_modules: unknown module '%s' (expected one of %s)", plugin,
                          t, LORA_MODULE_CHOICES);
    }
    if (!st && !lo->targets)
        st = h->error(err, MT_ERR_INVALID_ARG, "%s: target_modules is empty", plugin);
    if (st) {
        h->free(lo);
        return st;
    }
    *state = lo;
    return MT_OK;
}

/* ---- attach ---- */

static mt_status lora_tensor(const lora *lo, mt_dtype dtype, int64_t rows, int64_t cols,
                             mt_tensor *t, mt_error *err) {
    const int64_t shape[2] = {rows, cols};
    return host->tensor_alloc(lo->device, dtype, 2, shape, t, err);
}

/* Every branch into a group: it joins the open group when it reads the same input as
 * its members (same layer, same input class, same width) and the group has room. Then
 * each group's A and dA, and its members' views into them. */
static mt_status lora_make_groups(lora *lo, mt_error *err) {
    lo->groups = host->alloc((size_t)(lo->n_layers > 0 ? lo->n_layers : 1) * sizeof *lo->groups);
    if (!lo->groups) return host->error(err, MT_ERR_NOMEM, "%s: out of memory", lo->plugin);
    lora_group *open = NULL;
    for (int i = 0; i < lo->n_layers; i++) {
        lora_layer *L = &lo->layers[i];
        if (!L->r) continue;
        const lora_layer *last = open ? &lo->layers[open->member[open->n - 1]] : NULL;
        if (!last || open->n == LORA_GROUP_MAX || last->layer != L->layer ||
            !lora_input_class(L->module) ||
            lora_input_class(last->module) != lora_input_class(L->module) || last->in != L->in)
            open = &lo->groups[lo->n_groups++];
        L->group = (int)(open - lo->groups);
        open->member[open->n++] = i;
        if (open->n > lo->group_max) lo->group_max = open->n;
    }
    for (int gi = 0; gi < lo->n_groups; gi++) {
        lora_group *G = &lo->groups[gi];
        const int in = lo->layers[G->member[0]].in;
        mt_status st = lora_tensor(lo, MT_F32, (int64_t)G->n * lo->r, in, &G->A, err);
        if (!st) st = lora_tensor(lo, MT_F32, (int64_t)G->n * lo->r, in, &G->dA, err);
        if (st) return st;
        for (int k = 0; k < G->n; k++) {
            lora_layer *L = &lo->layers[G->member[k]];
            L->A = mt_tensor_rows(&G->A, (int64_t)k * lo->r, lo->r);
            L->dA = mt_tensor_rows(&G->dA, (int64_t)k * lo->r, lo->r);
        }
    }
    return MT_OK;
}

/* B, its gradient, A's initial values and the registration of one targeted projection
 * (its A and dA are its group's rows: lora_make_groups). */
static mt_status lora_add_branch(lora *lo, mt_model_handle *model, lora_layer *L,
                                 const char *name, mt_error *err) {
    const int r = lo->r, in = L->in, out = L->out;
    const size_t na = (size_t)r * in, nb = (size_t)out * r;
    mt_status st = lora_tensor(lo, MT_F32, out, r, &L->B, err); /* B stays zero */
    if (!st) st = lora_tensor(lo, MT_F32, out, r, &L->dB, err);
    if (st) return st;
    /* PEFT: kaiming_uniform_(A, a=sqrt(5)): bound = sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(in),
     * drawn here on the host (a pure function of seed and element) and uploaded */
    float *a = host->alloc(na * sizeof(float));
    if (!a)
        return host->error(err, MT_ERR_NOMEM, "%s: out of memory initialising the LoRA A of %s",
                           lo->plugin, name);
    const float bound = (float)(1.0 / sqrt((double)in));
    const uint64_t key = lora_init_key(lo, L->index);
    for (size_t i = 0; i < na; i++) a[i] = (2.0f * host->random_uniform(key, i) - 1.0f) * bound;
    st = host->tensor_upload(&L->A, a, err);
    host->free(a);
    if (st) return st;
    int na_len = snprintf(L->name_A, sizeof L->name_A, "%s.lora_A.weight", name);
    int nb_len = snprintf(L->name_B, sizeof L->name_B, "%s.lora_B.weight", name);
    if (na_len < 0 || (size_t)na_len >= sizeof L->name_A || nb_len < 0 ||
        (size_t)nb_len >= sizeof L->name_B)
        return host->error(err, MT_ERR_INVALID_ARG, "%s: projection name too long: %s",
                           lo->plugin, name);
    mt_param_view pa = {.size = sizeof(mt_param_view), .name = L->name_A, .value = L->A,
                        .grad = L->dA, .no_decay = 0};
    mt_param_view pb = {.size = sizeof(mt_param_view), .name = L->name_B, .value = L->B,
                        .grad = L->dB, .no_decay = 0};
    st = host->model_add_param(model, &pa, err);
    if (!st) st = host->model_add_param(model, &pb, err);
    if (!st) lo->n_trainable += (int64_t)(na + nb);
    return st;
}

/* The branch's scratch for projections of at most in_max inputs: u and g (for a tile
 * of one projection, or of the largest group), and xd with dropout. */
static mt_status lora_alloc_scratch(lora *lo, int in_max, mt_error *err) {
    lo->tile = lo->dropout > 0 ? LORA_DROPOUT_TILE : LORA_TILE;
    const int64_t cols = (int64_t)(lo->group_max > 1 ? lo->group_max : 1) * lo->r;
    mt_status st = lora_tensor(lo, MT_F32, lo->tile, cols, &lo->u, err);
    if (!st) st = lora_tensor(lo, MT_F32, lo->tile, cols, &lo->g, err);
    if (!st && lo->dropout > 0) st = lora_tensor(lo, MT_F32, lo->tile, in_max, &lo->xd, err);
    return st;
}

static mt_status lora_attach(void *state, mt_model_handle *model, mt_error *err) {
    lora *lo = state;
    if (lo->attached)
        return host->error(err, MT_ERR_INVALID_ARG, "%s: already attached to a model", lo->plugin);
    lo->attached = 1;
    lo->device = host->model_device(model);
    const int n_linear = host->model_linear_count(model);
    lo->layers = host->alloc((size_t)(n_linear > 0 ? n_linear : 1) * sizeof *lo->layers);
    lo->pass_state = host->alloc((size_t)(n_linear > 0 ? n_linear : 1) * sizeof(int64_t));
    if (!lo->layers || !lo->pass_state)
        return host->error(err, MT_ERR_NOMEM, "%s: out of memory", lo->plugin);
    int in_max = 0, n_branches = 0;
    /* the wrapped projections and which get a branch, then the groups, then each
     * projection's branch, preparation and wrapper in the model's order */
    for (int i = 0; i < n_linear; i++) {
        mt_linear_handle *lin = host->model_linear(model, i);
        mt_linear_info info = {.size = sizeof info};
        host->linear_info(lin, &info);
        const int m = lora_module_index(info.module);
        if (m < 0) continue; /* lm_head: never adapted, never quantized */
        const int targeted = (lo->targets >> m) & 1;
        if (!targeted && !lo->prepare) continue;
        lora_layer *L = &lo->layers[lo->n_layers++];
        L->lo = lo;
        L->lin = lin;
        L->index = i;
        L->in = info.in;
        L->out = info.out;
        L->layer = info.layer;
        L->module = m;
        L->r = targeted ? lo->r : 0;
        if (targeted && info.in > in_max) in_max = info.in;
        n_branches += targeted;
    }
    if (!n_branches)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "%s: the model has no projection named in target_modules", lo->plugin);
    mt_status st = lora_make_groups(lo, err);
    for (int i = 0; !st && i < lo->n_layers; i++) {
        lora_layer *L = &lo->layers[i];
        mt_linear_info info = {.size = sizeof info};
        host->linear_info(L->lin, &info);
        if (L->r && (st = lora_add_branch(lo, model, L, info.name, err))) break;
        if (lo->prepare && (st = lo->prepare(lo, L, &info, err))) break;
        st = host->linear_wrap(L->lin, &lora_impl, L, err);
    }
    if (st) return st;
    if ((st = lora_alloc_scratch(lo, in_max, err))) return st;
    if (lo->alloc_extra && (st = lo->alloc_extra(lo, err))) return st;
    host->log(MT_LOG_INFO, lo->plugin,
              "r=%d alpha=%g scaling=%g dropout=%g on %d projections: %lld trainable parameters",
              lo->r, (double)lo->alpha, (double)lo->scaling, (double)lo->dropout, n_branches,
              (long long)lo->n_trainable);
    return host->check(err);
}

/* ---- merge, unmerge, enable ---- */

/* W (out,in) += sign · s · B (out,r) · A (r,in) */
static void lora_fold(const lora_layer *L, mt_tensor *W, float sign) {
    host->matmul(W, &L->B, &L->A, 0, 0, sign * L->lo->scaling, 1.0f);
}

static void lora_set_enabled(void *state, int enabled) {
    lora *lo = state;
    lo->enabled = enabled != 0;
}

static void lora_set_training(void *state, int training) {
    lora *lo = state;
    lo->training = training != 0;
}

/* A replayed forward keeps its projection's pass, so it draws that pass's masks again
 * (gradient checkpointing recomputes a layer in backward). */
static void lora_set_replay(void *state, int replaying) {
    lora *lo = state;
    lo->replaying = replaying != 0;
}

/* ---- checkpoint state: the dropout passes ---- */

/* One tensor, the pass of every wrapped projection in attach order: with them a resumed
 * run draws the masks the uninterrupted one would have. The host copy is plugin
 * bookkeeping, not parameter memory, so it is handed over in host memory. */
static const char lora_state_name[] = "dropout_pass";

static size_t lora_state_count(void *state) {
    const lora *lo = state;
    return lo->attached && lo->n_layers > 0 ? 1 : 0;
}

static mt_status lora_state_get(void *state, size_t index, const char **name, mt_tensor *tensor,
                                mt_error *err) {
    lora *lo = state;
    if (index >= lora_state_count(lo))
        return host->error(err, MT_ERR_INVALID_ARG, "%s: no state tensor %zu (it has %zu)",
                           lo->plugin, index, lora_state_count(lo));
    for (int i = 0; i < lo->n_layers; i++) lo->pass_state[i] = (int64_t)lo->layers[i].pass;
    *name = lora_state_name;
    memset(tensor, 0, sizeof *tensor);
    tensor->dtype = MT_I64;
    tensor->device = MT_DEVICE_CPU;
    tensor->ndim = 1;
    tensor->shape[0] = lo->n_layers;
    tensor->data = lo->pass_state;
    return MT_OK;
}

static mt_status lora_state_set(void *state, const char *name, const mt_tensor *tensor,
                                mt_error *err) {
    lora *lo = state;
    if (strcmp(name, lora_state_name) != 0)
        return host->error(err, MT_ERR_INVALID_ARG, "%s: unknown state tensor '%s' (expected %s)",
                           lo->plugin, name, lora_state_name);
    if (!lo->attached)
        return host->error(err, MT_ERR_INVALID_ARG, "%s: state %s set before attach", lo->plugin,
                           name);
    char shape[64];
    if (tensor->dtype != MT_I64 || tensor->device != MT_DEVICE_CPU || tensor->ndim != 1 ||
        tensor->shape[0] != lo->n_layers || !tensor->data)
        return host->error(err, MT_ERR_FORMAT,
                           "%s: state %s must be I64 of shape [%d] in host memory, got %s %s "
                           "(saved by another adapter configuration?)",
                           lo->plugin, name, lo->n_layers,
                           tensor->dtype == MT_I64 ? "I64" : "another dtype",
                           mt_shape_format(shape, sizeof shape, tensor->ndim, tensor->shape));
    /* copied element by element: a view into a file need not be 8-byte aligned */
    const unsigned char *bytes = tensor->data;
    for (int apply = 0; apply < 2; apply++) /* check every value, then set them */
        for (int i = 0; i < lo->n_layers; i++) {
            int64_t v;
            memcpy(&v, bytes + (size_t)i * sizeof v, sizeof v);
            if (v < 0)
                return host->error(err, MT_ERR_FORMAT,
                                   "%s: state %s: pass %lld of projection %d is negative",
                                   lo->plugin, name, (long long)v, i);
            if (apply) lo->layers[i].pass = (uint64_t)v;
        }
    return MT_OK;
}

/* save, import_options and load of a PEFT directory: lora_save, lora_import_options,
 * lora_load */
#include "lora_peft.h"

#ifndef LORA_NO_ENTRY

/* ---- lora's merge, unmerge and descriptor (qlora has its own) ---- */

/* The base weights of every branch, or an error naming one that was released. */
static mt_status lora_fold_all(lora *lo, float sign, mt_error *err) {
    for (int i = 0; i < lo->n_layers; i++) {
        lora_layer *L = &lo->layers[i];
        mt_linear_info info = {.size = sizeof info};
        host->linear_info(L->lin, &info);
        if (L->r && !info.weight.data)
            return host->error(err, MT_ERR_UNSUPPORTED,
                               "%s: cannot merge into %s: its base weight was released "
                               "(quantized); nothing was changed", lo->plugin, info.name);
    }
    for (int i = 0; i < lo->n_layers; i++) {
        lora_layer *L = &lo->layers[i];
        if (!L->r) continue;
        mt_linear_info info = {.size = sizeof info};
        host->linear_info(L->lin, &info);
        lora_fold(L, &info.weight, sign);
    }
    return host->check(err);
}

static mt_status lora_merge(void *state, mt_error *err) {
    lora *lo = state;
    if (!lo->attached)
        return host->error(err, MT_ERR_INVALID_ARG, "%s: merge before attach", lo->plugin);
    if (lo->merged) return MT_OK;
    mt_status st = lora_fold_all(lo, 1.0f, err);
    if (!st) lo->merged = 1;
    return st;
}

static mt_status lora_unmerge(void *state, mt_error *err) {
    lora *lo = state;
    if (!lo->merged) return MT_OK;
    mt_status st = lora_fold_all(lo, -1.0f, err);
    if (!st) lo->merged = 0;
    return st;
}

static mt_status lora_create(const mt_host *h, const mt_options *opts, void **state,
                             mt_error *err) {
    return lora_create_named("lora", h, opts, state, err);
}

static const mt_adapter_vtable lora_vtable = {
    MT_VTABLE_SIZE(mt_adapter_vtable),
    .create = lora_create,
    .destroy = lora_destroy,
    .attach = lora_attach,
    .merge = lora_merge,
    .unmerge = lora_unmerge,
    .set_enabled = lora_set_enabled,
    .set_training = lora_set_training,
    .state_count = lora_state_count,
    .state_get = lora_state_get,
    .state_set = lora_state_set,
    .format = "peft",
    .save = lora_save,
    .import_options = lora_import_options,
    .load = lora_load,
    .set_replay = lora_set_replay,
};

MT_PLUGIN_DEFINE(host,
                 .kind = MT_PLUGIN_ADAPTER,
                 .name = "lora",
                 .version = "2.0.0",
                 .description = "LoRA: frozen base plus a trainable low-rank update s·B·A (PEFT-compatible)",
                 .options = lora_options,
                 .n_options = sizeof lora_options / sizeof lora_options[0],
                 .vtable = &lora_vtable)

#endif /* LORA_NO_ENTRY */
