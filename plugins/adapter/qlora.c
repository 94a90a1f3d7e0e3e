/* qlora.c — QLoRA (Dettmers et al., 2023): LoRA over a frozen base stored in NF4 with
 * double quantization, in bitsandbytes' layout.
 *
 * attach() quantizes the weight of every projection but lm_head (as loading a model
 * with bitsandbytes' load_in_4bit does), returns the fp32 weight's memory with
 * host->linear_release_weight, and adds a LoRA branch (lora.c, included below) to the
 * projections named in target_modules. The options are lora's.
 *
 * The storage of one (out,in) weight, flattened row-major to n = out·in elements,
 * exactly as bitsandbytes' quantize_4bit(w, blocksize=64, quant_type="nf4",
 * compress_statistics=True) lays it out:
 *
 *   codes     (n+1)/2 bytes: element 2i in the HIGH nibble of byte i, 2i+1 in the low
 *             one (an odd n pads the last low nibble with the code of 0.0, i.e. 7).
 *             Each code indexes the NF4 table nf4_code[16]: for a block of 64
 *             consecutive elements (the last may be shorter) with absmax a, the code
 *             of x is the number of thresholds t_k = (nf4_code[k] + nf4_code[k+1]) / 2
 *             (fp32) strictly below v = clamp(x · (1/max(a, 1e-38)), -1, 1): the
 *             nearest code, a tie going to the lower one. (bitsandbytes' CPU
 *             reference does exactly this; its CUDA kernel's hard-coded thresholds
 *             are the same fp32 numbers and also send ties down.)
 *   absmax_q  one byte per 64-block: double quantization. offset = mean of the fp32
 *             absmax values; each a - offset is quantized like above, in blocks of 256
 *             absmax values, with bitsandbytes' signed dynamic 8-bit map (dyn_code)
 *             and its 255 fp32 midpoints, ties to the lower code.
 *   absmax2   one fp32 per 256 absmax values: state2's absmax, max |a - offset|.
 *   offset    one fp32.
 *
 * Dequantization: a = dyn_code[absmax_q[b]] · absmax2[b/256] + offset, then
 * w = nf4_code[code] · a, in fp32 and in that order, as dequantize_4bit computes it.
 * That is 0.5 + 1/64 + 4/(64·256) bytes per parameter plus 4 bytes per tensor:
 * about 0.516 (logged at attach).
 *
 * Two places where this is bitsandbytes' algorithm but may not be its bytes:
 * - the offset: bitsandbytes takes torch's fp32 mean, whose summation order depends
 *   on the machine (vector width, threads); here it is the correctly rounded mean,
 *   so it may differ from bitsandbytes' by an ulp.
 * - the 8-bit stage: bitsandbytes' native CPU kernel (0.50) rounds through a
 *   65536-bin lookup table, which is not the nearest code for inputs within ~3e-5
 *   of a threshold (near zero in particular); this file follows bitsandbytes'
 *   PyTorch reference (nearest code), as its CUDA kernel approximates it.
 * tests/parity/make_lora_reference.py checks both against bitsandbytes.
 *
 * Forward and backward never hold more than QLORA_WTILE floats (4 MiB) of the fp32
 * weight: they dequantize that many rows at a time into scratch shared by all
 * projections and multiply with host->matmul; when a weight takes several bands of
 * rows, the slice of y (or dy) of a band is staged QLORA_NTILE rows of x at a time.
 *
 * merge() restores each fp32 weight (host->linear_restore_weight) and writes
 * dequant(W) + s·B·A into it; forward then runs the host's base layer on it and
 * skips the branch. unmerge() releases the fp32 weights again: the quantized base is
 * untouched by a merge, so unmerging restores it exactly. */
#define LORA_NO_ENTRY
#include "lora.c"

#include <stdlib.h>

/* QLORA_WTILE: floats of dequantized weight rows at a time (4 MiB), so the whole
 * weight of a small projection at once, a band of rows of a large one; QLORA_NTILE:
 * rows of x per product when a weight takes several bands. */
enum { NF4_BLOCK = 64, DQ_BLOCK = 256, QLORA_WTILE = 1 << 20, QLORA_NTILE = 256 };

/* bitsandbytes' NF4 code values (functional.get_4bit_type("nf4")), ascending. */
static const float nf4_code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* The positive half of bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7,
 * total_bits=8): for i = 0..6, the 2^i midpoints of torch.linspace(0.1, 1, 2^i + 1) (fp32)
 * times 10^(i-6) (fp32), ascending. The map is these 127 values negated, 0, these,
 * and 1.0: 256 sorted entries. The numbers are torch's fp32 results (its vectorised
 * linspace rounds differently from a scalar loop), so they are tabulated, not computed. */
static const float dyn_positive[127] = {
    5.50000038e-07f, 3.25000019e-06f, 7.7499999e-06f, 2.12499981e-05f, 4.37499984e-05f,
    6.62500024e-05f, 8.87499991e-05f, 0.000156250011f, 0.000268750038f, 0.000381250022f,
    0.000493750034f, 0.000606250076f, 0.00071875006f, 0.000831249985f, 0.000943750085f,
    0.00128124992f, 0.00184375001f, 0.00240624999f, 0.00296874996f, 0.00353124971f,
    0.00409374991f, 0.00465624966f, 0.00521875033f, 0.00578125007f, 0.00634374982f,
    0.00690625003f, 0.00746874977f, 0.00803124998f, 0.00859375019f, 0.00915624946f,
    0.00971874967f, 0.0114062503f, 0.0142187504f, 0.0170312505f, 0.0198437516f, 0.0226562507f,
    0.0254687499f, 0.028281251f, 0.0310937501f, 0.0339062512f, 0.0367187522f, 0.0395312496f,
    0.0423437469f, 0.0451562516f, 0.047968749f, 0.05078125f, 0.053593751f, 0.0564062484f,
    0.0592187531f, 0.0620312504f, 0.0648437515f, 0.0676562563f, 0.0704687461f, 0.0732812509f,
    0.0760937482f, 0.078906253f, 0.0817187577f, 0.0845312476f, 0.0873437524f, 0.0901562497f,
    0.0929687545f, 0.0957812592f, 0.0985937491f, 0.107031256f, 0.12109375f, 0.135156244f,
    0.149218753f, 0.163281247f, 0.177343756f, 0.19140625f, 0.205468744f, 0.219531253f,
    0.233593747f, 0.247656241f, 0.26171875f, 0.275781274f, 0.289843738f, 0.303906262f,
    0.317968726f, 0.33203125f, 0.346093744f, 0.360156238f, 0.374218762f, 0.388281226f,
    0.40234375f, 0.416406244f, 0.430468738f, 0.444531262f, 0.458593726f, 0.47265625f,
    0.486718714f, 0.500781238f, 0.514843702f, 0.528906226f, 0.54296875f, 0.557031274f,
    0.571093798f, 0.585156262f, 0.599218726f, 0.61328125f, 0.627343774f, 0.641406298f,
    0.655468762f, 0.669531226f, 0.68359375f, 0.697656274f, 0.711718798f, 0.725781262f,
    0.739843726f, 0.75390625f, 0.767968774f, 0.782031238f, 0.796093762f, 0.810156226f,
    0.82421875f, 0.838281274f, 0.852343738f, 0.866406262f, 0.880468726f, 0.89453125f,
    0.908593774f, 0.922656238f, 0.936718762f, 0.950781226f, 0.96484375f, 0.978906274f,
    0.992968738f,
};

/* The full tables and their decision thresholds, built once (qlora_tables). */
static float nf4_mid[15];   /* fp32 (nf4_code[k] + nf4_code[k+1]) / 2 */
static float dyn_code[256]; /* the dynamic map, ascending */
static float dyn_mid[255];  /* fp32 (dyn_code[k] + dyn_code[k+1]) / 2 */

static void qlora_tables(void) {
    for (int k = 0; k < 127; k++) {
        dyn_code[128 + k] = dyn_positive[k];
        dyn_code[126 - k] = -dyn_positive[k];
    }
    dyn_code[127] = 0.0f;
    dyn_code[255] = 1.0f;
    for (int k = 0; k < 15; k++) nf4_mid[k] = (nf4_code[k] + nf4_code[k + 1]) / 2.0f;
    for (int k = 0; k < 255; k++) dyn_mid[k] = (dyn_code[k] + dyn_code[k + 1]) / 2.0f;
}

/* ---- NF4 with double quantization ---- */

typedef struct nf4_tensor {
    int64_t n;              /* elements */
    int64_t n_blocks;       /* ceil(n / 64) */
    int64_t n_blocks2;      /* ceil(n_blocks / 256) */
    uint8_t *codes;         /* (n+1)/2 bytes, first element of a pair in the high nibble */
    uint8_t *absmax_q;      /* (n_blocks) */
    float *absmax2;         /* (n_blocks2) */
    float offset;
} nf4_tensor;

static size_t nf4_bytes(const nf4_tensor *q) {
    return (size_t)(q->n + 1) / 2 + (size_t)q->n_blocks + (size_t)q->n_blocks2 * sizeof(float) +
           sizeof(float);
}

/* Number of thresholds t[k] (ascending, n_t of them) strictly below v. */
static int count_below(const float *t, int n_t, float v) {
    int lo = 0, hi = n_t;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (t[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* v = clamp(x · (1/max(absmax, 1e-38)), -1, 1), with bitsandbytes' operation order */
static float dq_scale(float absmax) {
    const float tiny = 1e-38f;
    return 1.0f / (absmax < tiny ? tiny : absmax);
}

static float clamp1(float v) { return v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v; }

/* The 8-bit stage: x (n) in blocks of 256, codes (n) and absmax2 (ceil(n/256)). */
static void dq8_quantize(const float *x, int64_t n, uint8_t *codes, float *absmax2) {
    for (int64_t b0 = 0, b = 0; b0 < n; b0 += DQ_BLOCK, b++) {
        const int64_t b1 = b0 + DQ_BLOCK < n ? b0 + DQ_BLOCK : n;
        float am = 0.0f;
        for (int64_t i = b0; i < b1; i++) {
            float a = fabsf(x[i]);
            if (a > am) am = a;
        }
        absmax2[b] = am;
        const float inv = dq_scale(am);
        for (int64_t i = b0; i < b1; i++)
            codes[i] = (uint8_t)count_below(dyn_mid, 255, clamp1(x[i] * inv));
    }
}

/* Quantizes w (n) into q, whose buffers the caller sized; absmax32 (n_blocks) is scratch
 * that receives the fp32 absmax of every 64-block. */
static void nf4_quantize(const float *w, nf4_tensor *q, float *absmax32) {
    const int64_t n = q->n;
    memset(q->codes, 0, (size_t)(n + 1) / 2);
    for (int64_t b = 0; b < q->n_blocks; b++) {
        const int64_t e0 = b * NF4_BLOCK, e1 = e0 + NF4_BLOCK < n ? e0 + NF4_BLOCK : n;
        float am = 0.0f;
        for (int64_t e = e0; e < e1; e++) {
            float a = fabsf(w[e]);
            if (a > am) am = a;
        }
        absmax32[b] = am;
        const float inv = dq_scale(am);
        for (int64_t e = e0; e < e1; e++) {
            unsigned c = (unsigned)count_below(nf4_mid, 15, clamp1(w[e] * inv));
            q->codes[e >> 1] |= (uint8_t)((e & 1) ? c : c << 4);
        }
    }
    if (n & 1) q->codes[n >> 1] |= (uint8_t)count_below(nf4_mid, 15, 0.0f); /* the pad */
    /* double quantization: offset, then the 8-bit stage over absmax - offset */
    double sum = 0.0;
    for (int64_t b = 0; b < q->n_blocks; b++) sum += absmax32[b];
    q->offset = (float)(sum / (double)q->n_blocks);
    for (int64_t b = 0; b < q->n_blocks; b++) absmax32[b] -= q->offset;
    dq8_quantize(absmax32, q->n_blocks, q->absmax_q, q->absmax2);
}

/* The dequantized absmax of 64-block b. */
static float nf4_block_scale(const nf4_tensor *q, int64_t b) {
    float a = dyn_code[q->absmax_q[b]] * q->absmax2[b / DQ_BLOCK];
    return a + q->offset;
}

/* dst (e1 - e0) = the dequantized elements [e0, e1) of the flattened weight. */
static void nf4_dequantize(const nf4_tensor *q, int64_t e0, int64_t e1, float *dst) {
    if (e1 <= e0) return;
    const int64_t b_first = e0 / NF4_BLOCK, b_last = (e1 - 1) / NF4_BLOCK;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (b_last - b_first > 64)
#endif
    for (int64_t b = b_first; b <= b_last; b++) {
        const float a = nf4_block_scale(q, b);
        const int64_t lo = b * NF4_BLOCK > e0 ? b * NF4_BLOCK : e0;
        const int64_t hi = b * NF4_BLOCK + NF4_BLOCK < e1 ? b * NF4_BLOCK + NF4_BLOCK : e1;
        for (int64_t e = lo; e < hi; e++) {
            const uint8_t byte = q->codes[e >> 1];
            dst[e - e0] = nf4_code[(e & 1) ? byte & 15 : byte >> 4] * a;
        }
    }
}

static void nf4_free(nf4_tensor *q) {
    if (!q) return;
    host->free(q->codes);
    host->free(q->absmax_q);
    host->free(q->absmax2);
    host->free(q);
}

/* ---- the quantized base layer ---- */

typedef struct qlora_extra {
    size_t wtile_floats; /* QLORA_WTILE (tests make it smaller) */
    float *wtile; /* (rows, in) dequantized rows of one weight: wtile_floats, or one row */
    float *ytile; /* (QLORA_NTILE, rows) a slice of y or dy */
    int64_t n_params;
    size_t n_bytes;
} qlora_extra;

/* Rows of an (out,in) weight dequantized at a time. */
static int qlora_rows(const qlora_extra *qx, int in, int out) {
    int rows = (int)(qx->wtile_floats / (size_t)in);
    if (rows < 1) rows = 1;
    return rows < out ? rows : out;
}

/* y (N,out) = x (N,in) · dequant(W)^T + b */
static void qlora_base_forward(lora_layer *L, float *y, const float *x, int N) {
    lora *lo = L->lo;
    if (lo->merged) {
        host->linear_base_forward(L->lin, y, x, N);
        return;
    }
    const qlora_extra *qx = lo->extra;
    const int in = L->in, out = L->out, rows = qlora_rows(qx, in, out);
    for (int r0 = 0; r0 < out; r0 += rows) {
        const int nr = out - r0 < rows ? out - r0 : rows;
        nf4_dequantize(L->base, (int64_t)r0 * in, (int64_t)(r0 + nr) * in, qx->wtile);
        if (nr == out) {
            host->matmul(y, x, qx->wtile, N, out, in, 0, 1, 1.0f, 0.0f);
            break;
        }
        for (int n0 = 0; n0 < N; n0 += QLORA_NTILE) {
            const int nt = N - n0 < QLORA_NTILE ? N - n0 : QLORA_NTILE;
            host->matmul(qx->ytile, x + (size_t)n0 * in, qx->wtile, nt, nr, in, 0, 1, 1.0f, 0.0f);
            for (int i = 0; i < nt; i++)
                memcpy(y + (size_t)(n0 + i) * out + r0, qx->ytile + (size_t)i * nr,
                       (size_t)nr * sizeof(float));
        }
    }
    if (L->bias)
        for (int i = 0; i < N; i++)
            for (int o = 0; o < out; o++) y[(size_t)i * out + o] += L->bias[o];
}

/* dx (N,in) += dy (N,out) · dequant(W): the frozen base computes input gradients only */
static void qlora_base_backward(lora_layer *L, float *dx, const float *dy, const float *x,
                                int N) {
    lora *lo = L->lo;
    if (lo->merged) {
        host->linear_base_backward(L->lin, dx, dy, x, N);
        return;
    }
    const qlora_extra *qx = lo->extra;
    const int in = L->in, out = L->out, rows = qlora_rows(qx, in, out);
    for (int r0 = 0; r0 < out; r0 += rows) {
        const int nr = out - r0 < rows ? out - r0 : rows;
        nf4_dequantize(L->base, (int64_t)r0 * in, (int64_t)(r0 + nr) * in, qx->wtile);
        if (nr == out) {
            host->matmul(dx, dy, qx->wtile, N, in, out, 0, 0, 1.0f, 1.0f);
            break;
        }
        for (int n0 = 0; n0 < N; n0 += QLORA_NTILE) {
            const int nt = N - n0 < QLORA_NTILE ? N - n0 : QLORA_NTILE;
            for (int i = 0; i < nt; i++)
                memcpy(qx->ytile + (size_t)i * nr, dy + (size_t)(n0 + i) * out + r0,
                       (size_t)nr * sizeof(float));
            host->matmul(dx + (size_t)n0 * in, qx->ytile, qx->wtile, nt, in, nr, 0, 0, 1.0f, 1.0f);
        }
    }
}

/* attach, per projection: quantize the weight, then release the fp32 copy. */
static mt_status qlora_prepare(lora *lo, lora_layer *L, const mt_linear_info *info,
                               mt_error *err) {
    qlora_extra *qx = lo->extra;
    if (!info->weight.data)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "%s: the base weight of %s was already released", lo->plugin,
                           info->name);
    nf4_tensor *q = host->alloc(sizeof *q);
    if (!q) return host->error(err, MT_ERR_NOMEM, "%s: out of memory", lo->plugin);
    L->base = q;
    q->n = (int64_t)info->in * info->out;
    q->n_blocks = (q->n + NF4_BLOCK - 1) / NF4_BLOCK;
    q->n_blocks2 = (q->n_blocks + DQ_BLOCK - 1) / DQ_BLOCK;
    q->codes = host->alloc((size_t)(q->n + 1) / 2);
    q->absmax_q = host->alloc((size_t)q->n_blocks);
    q->absmax2 = host->alloc((size_t)q->n_blocks2 * sizeof(float));
    float *absmax32 = host->alloc((size_t)q->n_blocks * sizeof(float));
    if (!q->codes || !q->absmax_q || !q->absmax2 || !absmax32) {
        host->free(absmax32);
        return host->error(err, MT_ERR_NOMEM, "%s: out of memory quantizing %s", lo->plugin,
                           info->name);
    }
    nf4_quantize(info->weight.data, q, absmax32);
    host->free(absmax32);
    L->bias = info->bias.data;
    host->linear_release_weight(L->lin);
    qx->n_params += q->n;
    qx->n_bytes += nf4_bytes(q);
    return MT_OK;
}

/* attach, after every projection: the shared tiles. */
static mt_status qlora_alloc_extra(lora *lo, mt_error *err) {
    qlora_extra *qx = lo->extra;
    size_t w = 0, y = 0;
    for (int i = 0; i < lo->n_layers; i++) {
        const lora_layer *L = &lo->layers[i];
        const int rows = qlora_rows(qx, L->in, L->out);
        if ((size_t)rows * L->in > w) w = (size_t)rows * L->in;
        if (rows < L->out && (size_t)QLORA_NTILE * rows > y) y = (size_t)QLORA_NTILE * rows;
    }
    qx->wtile = host->alloc((w ? w : 1) * sizeof(float));
    qx->ytile = host->alloc((y ? y : 1) * sizeof(float));
    if (!qx->wtile || !qx->ytile) return host->error(err, MT_ERR_NOMEM, "%s: out of memory", lo->plugin);
    host->log(MT_LOG_INFO, lo->plugin,
              "%d projections in NF4 with double quantization: %lld parameters in %zu bytes "
              "(%.4f bytes per parameter; fp32 would take %lld)",
              lo->n_layers, (long long)qx->n_params, qx->n_bytes,
              qx->n_params ? (double)qx->n_bytes / (double)qx->n_params : 0.0,
              (long long)qx->n_params * 4);
    return MT_OK;
}

static void qlora_free_extra(lora *lo) {
    qlora_extra *qx = lo->extra;
    for (int i = 0; i < lo->n_layers; i++) nf4_free(lo->layers[i].base);
    if (qx) {
        host->free(qx->wtile);
        host->free(qx->ytile);
    }
    host->free(qx);
}

/* ---- create, merge, unmerge ---- */

static mt_status qlora_create(const mt_host *h, const mt_options *opts, void **state,
                              mt_error *err) {
    qlora_tables();
    mt_status st = lora_create_named("qlora", h, opts, state, err);
    if (st) return st;
    lora *lo = *state;
    lo->extra = h->alloc(sizeof(qlora_extra));
    if (!lo->extra) {
        h->free(lo);
        return h->error(err, MT_ERR_NOMEM, "qlora: out of memory");
    }
    ((qlora_extra *)lo->extra)->wtile_floats = QLORA_WTILE;
    lo->prepare = qlora_prepare;
    lo->alloc_extra = qlora_alloc_extra;
    lo->base_forward = qlora_base_forward;
    lo->base_backward = qlora_base_backward;
    lo->free_extra = qlora_free_extra;
    return MT_OK;
}

/* W = dequant(W_nf4) + s·B·A in restored fp32 weights; the NF4 copies stay. */
static mt_status qlora_merge(void *state, mt_error *err) {
    lora *lo = state;
    if (!lo->attached)
        return host->error(err, MT_ERR_INVALID_ARG, "%s: merge before attach", lo->plugin);
    if (lo->merged) return MT_OK;
    for (int i = 0; i < lo->n_layers; i++) {
        lora_layer *L = &lo->layers[i];
        float *W = host->linear_restore_weight(L->lin, err);
        if (!W) {
            for (int j = 0; j < i; j++) host->linear_release_weight(lo->layers[j].lin);
            mt_linear_info info;
            host->linear_info(L->lin, &info);
            return host->error(err, MT_ERR_NOMEM,
                               "%s: cannot restore the fp32 weight of %s to merge; nothing "
                               "was merged", lo->plugin, info.name);
        }
        nf4_dequantize(L->base, 0, (int64_t)L->in * L->out, W);
        if (L->r) lora_fold(L, W, 1.0f);
    }
    lo->merged = 1;
    return MT_OK;
}

static mt_status qlora_unmerge(void *state, mt_error *err) {
    (void)err;
    lora *lo = state;
    if (!lo->merged) return MT_OK;
    for (int i = 0; i < lo->n_layers; i++) host->linear_release_weight(lo->layers[i].lin);
    lo->merged = 0;
    return MT_OK;
}

static const mt_adapter_vtable qlora_vtable = {
    .create = qlora_create,
    .destroy = lora_destroy,
    .attach = lora_attach,
    .merge = qlora_merge,
    .unmerge = qlora_unmerge,
    .set_enabled = lora_set_enabled,
    .set_training = lora_set_training,
};

static const mt_plugin_descriptor qlora_descriptor = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .kind = MT_PLUGIN_ADAPTER,
    .name = "qlora",
    .version = "1.0.0",
    .description = "QLoRA: LoRA over a frozen NF4 base with double quantization "
                   "(bitsandbytes' layout, ~0.52 bytes per base parameter)",
    .options = lora_options,
    .n_options = sizeof lora_options / sizeof lora_options[0],
    .vtable = &qlora_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *h) {
    host = h;
    qlora_tables();
    return &qlora_descriptor;
}
