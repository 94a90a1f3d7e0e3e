/* qlora.c — QLoRA (Dettmers et al., 2023): LoRA over a frozen base stored in NF4 with
 * double quantization, in bitsandbytes' layout.
 *
 * attach() quantizes the weight of every projection but lm_head (as loading a model
 * with bitsandbytes' load_in_4bit does), returns the fp32 weight's memory with
 * host->linear_release_weight, and adds a LoRA branch (lora.c, included below) to the
 * projections named in target_modules. The options are lora's. Quantization is a
 * one-time host computation: the fp32 weight is downloaded (host->tensor_download),
 * quantized here, and the three arrays below are uploaded into device tensors (U8,
 * U8, F32), with one F32 table tensor of the 16 NF4 values then the 256 of the
 * dynamic map; from then on the plugin reads no weight memory.
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
 * w = nf4_code[code] · a, in fp32 and in that order, as bitsandbytes' dequantize_4bit
 * computes it and as host->dequantize_4bit does on the device.
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
 * Forward and backward never hold more than QLORA_WTILE floats (256 MiB) of the fp32
 * weight: they dequantize that many rows at a time (host->dequantize_4bit) into a
 * device scratch tensor shared by all projections and multiply with host->matmul. A
 * weight that fits is one band: y = x W^T and dx += dy W directly, all N rows at once
 * (every projection of a model up to Llama-3 8B's 14336 x 4096: dequantize the whole
 * weight, then one product, as bitsandbytes does).
 * A weight of several bands produces a column slice of y (or consumes one of dy) per
 * band, and tensors have no strides, so for a tile of QLORA_NTILE rows of x the
 * product is formed transposed, y^T (out, NTILE), whose band rows are contiguous, and
 * turned back with one product by the first rows of an identity matrix; backward
 * transposes the dy tile the same way and accumulates the tile's dx over the bands.
 * The bands are dequantized again for each tile of x (about 1/QLORA_NTILE of the
 * product's cost) so that the scratch stays independent of N. The bias is added as
 * the product of a column of ones with it (the host has no broadcast add).
 *
 * merge() restores each fp32 weight (host->linear_restore_weight) and writes
 * dequant(W) + s·B·A into it (host->dequantize_4bit, then host->matmul); forward then
 * runs the host's base layer on it and skips the branch. unmerge() releases the fp32
 * weights again: the quantized base is untouched by a merge, so unmerging restores it
 * exactly. */
#define LORA_NO_ENTRY
#include "lora.c"

/* QLORA_WTILE: floats of dequantized weight rows at a time (256 MiB), so the whole
 * weight of any projection up to 8B models at once, a band of rows of a larger one (the
 * banded path costs an extra transposing product and a dequantization per tile of x);
 * QLORA_NTILE: rows of x per product when a weight takes several bands. */
enum { NF4_BLOCK = 64, DQ_BLOCK = 256, QLORA_WTILE = 1 << 26, QLORA_NTILE = 256 };

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

/* ---- NF4 with double quantization (on the host, at attach) ---- */

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

/* ---- the quantized weight on the device ---- */

typedef struct qlora_weight {
    int64_t n;          /* elements of the (out,in) weight */
    mt_tensor codes;    /* U8 ((n+1)/2) */
    mt_tensor absmax_q; /* U8 (n_blocks) */
    mt_tensor absmax2;  /* F32 (n_blocks2) */
    float offset;
} qlora_weight;

static void qlora_weight_free(qlora_weight *w) {
    if (!w) return;
    host->tensor_free(&w->codes);
    host->tensor_free(&w->absmax_q);
    host->tensor_free(&w->absmax2);
    host->free(w);
}

static mt_status qlora_tensor_1d(mt_device device, mt_dtype dtype, int64_t n, const void *src,
                                 mt_tensor *t, mt_error *err) {
    const int64_t shape[1] = {n};
    mt_status st = host->tensor_alloc(device, dtype, 1, shape, t, err);
    return st ? st : host->tensor_upload(t, src, err);
}

/* Copies a host quantization into device tensors of w. */
static mt_status qlora_upload(const nf4_tensor *q, mt_device device, qlora_weight *w,
                              mt_error *err) {
    w->n = q->n;
    w->offset = q->offset;
    mt_status st = qlora_tensor_1d(device, MT_U8, (q->n + 1) / 2, q->codes, &w->codes, err);
    if (!st) st = qlora_tensor_1d(device, MT_U8, q->n_blocks, q->absmax_q, &w->absmax_q, err);
    if (!st) st = qlora_tensor_1d(device, MT_F32, q->n_blocks2, q->absmax2, &w->absmax2, err);
    return st;
}

/* ---- the quantized base layer ---- */

typedef struct qlora_extra {
    size_t wtile_floats; /* QLORA_WTILE (tests make it smaller) */
    mt_tensor table;     /* F32 (16 + 256): nf4_code, then dyn_code */
    mt_tensor wtile;     /* F32 dequantized rows of one weight: (rows, in) at most */
    /* banded weights only (data NULL when every weight is one band): */
    mt_tensor yt;        /* F32 (out_max, QLORA_NTILE): y^T or dy^T of a tile of rows */
    mt_tensor xs;        /* F32 (QLORA_NTILE, in_max): a padded x tile, or a dx tile */
    mt_tensor eye;       /* F32 (QLORA_NTILE, QLORA_NTILE) identity */
    mt_tensor ones;      /* F32 (LORA_TILE, 1) for the bias; NULL data when no bias */
    int64_t n_params;
    size_t n_bytes;
} qlora_extra;

/* Rows of an (out,in) weight dequantized at a time. */
static int qlora_rows(const qlora_extra *qx, int in, int out) {
    int rows = (int)(qx->wtile_floats / (size_t)in);
    if (rows < 1) rows = 1;
    return rows < out ? rows : out;
}

/* out = the elements [first, first + numel(out)) of w, dequantized on the device. */
static void qlora_dequantize(const qlora_extra *qx, const qlora_weight *w, mt_tensor *out,
                             int64_t first) {
    host->dequantize_4bit(out, &w->codes, &w->absmax_q, &w->absmax2, &qx->table, w->offset,
                          first, NF4_BLOCK, DQ_BLOCK);
}

/* Rows [r0, r0+nr) of L's weight, dequantized into the weight tile as (nr, in). */
static mt_tensor qlora_band(lora_layer *L, int r0, int nr) {
    const qlora_extra *qx = L->lo->extra;
    mt_tensor wt = mt_tensor_2d(&qx->wtile, nr, L->in);
    qlora_dequantize(qx, L->base, &wt, (int64_t)r0 * L->in);
    return wt;
}

/* y (N,out) += 1 (N,1) · bias (1,out), in tiles of the ones column. */
static void qlora_add_bias(lora_layer *L, mt_tensor *y) {
    const qlora_extra *qx = L->lo->extra;
    const int64_t N = y->shape[0], tile = qx->ones.shape[0];
    const mt_tensor b = mt_tensor_2d(&L->bias, 1, L->out);
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
        const int64_t nt = N - n0 < tile ? N - n0 : tile;
        mt_tensor yt = mt_tensor_rows(y, n0, nt), ones = mt_tensor_rows(&qx->ones, 0, nt);
        host->matmul(&yt, &ones, &b, 0, 0, 1.0f, 1.0f);
    }
}

/* y (N,out) = x (N,in) · dequant(W)^T + b */
static void qlora_base_forward(lora_layer *L, mt_tensor *y, const mt_tensor *x) {
    lora *lo = L->lo;
    if (lo->merged) {
        host->linear_base_forward(L->lin, y, x);
        return;
    }
    const qlora_extra *qx = lo->extra;
    const int in = L->in, out = L->out, rows = qlora_rows(qx, in, out);
    const int64_t N = x->shape[0];
    if (rows == out) { /* one band: the whole weight */
        mt_tensor w = qlora_band(L, 0, out);
        host->matmul(y, x, &w, 0, 1, 1.0f, 0.0f);
    } else {
        mt_tensor yT = mt_tensor_2d(&qx->yt, out, QLORA_NTILE),
                  xs = mt_tensor_2d(&qx->xs, QLORA_NTILE, in);
        for (int64_t n0 = 0; n0 < N; n0 += QLORA_NTILE) {
            const int64_t nt = N - n0 < QLORA_NTILE ? N - n0 : QLORA_NTILE;
            mt_tensor xt = mt_tensor_rows(x, n0, nt), yrows = mt_tensor_rows(y, n0, nt),
                      eye = mt_tensor_rows(&qx->eye, 0, nt);
            const mt_tensor *src = &xt;
            if (nt < QLORA_NTILE) { /* the last tile: zero rows below it */
                mt_tensor head = mt_tensor_rows(&xs, 0, nt);
                host->fill(&xs, 0.0f);
                host->copy(&head, &xt);
                src = &xs;
            }
            for (int r0 = 0; r0 < out; r0 += rows) {
                const int nr = out - r0 < rows ? out - r0 : rows;
                mt_tensor w = qlora_band(L, r0, nr), band = mt_tensor_rows(&yT, r0, nr);
                host->matmul(&band, &w, src, 0, 1, 1.0f, 0.0f); /* y^T rows = W_band x^T */
            }
            host->matmul(&yrows, &eye, &yT, 0, 1, 1.0f, 0.0f); /* y = [I 0] (y^T)^T */
        }
    }
    if (L->bias.data) qlora_add_bias(L, y);
}

/* dx (N,in) += dy (N,out) · dequant(W): the frozen base computes input gradients only */
static void qlora_base_backward(lora_layer *L, mt_tensor *dx, const mt_tensor *dy,
                                const mt_tensor *x) {
    lora *lo = L->lo;
    if (lo->merged) {
        host->linear_base_backward(L->lin, dx, dy, x);
        return;
    }
    const qlora_extra *qx = lo->extra;
    const int in = L->in, out = L->out, rows = qlora_rows(qx, in, out);
    const int64_t N = dy->shape[0];
    if (rows == out) {
        mt_tensor w = qlora_band(L, 0, out);
        host->matmul(dx, dy, &w, 0, 0, 1.0f, 1.0f);
        return;
    }
    mt_tensor dyT = mt_tensor_2d(&qx->yt, out, QLORA_NTILE),
              acc = mt_tensor_2d(&qx->xs, QLORA_NTILE, in);
    for (int64_t n0 = 0; n0 < N; n0 += QLORA_NTILE) {
        const int64_t nt = N - n0 < QLORA_NTILE ? N - n0 : QLORA_NTILE;
        mt_tensor dyt = mt_tensor_rows(dy, n0, nt), dxt = mt_tensor_rows(dx, n0, nt),
                  eye = mt_tensor_rows(&qx->eye, 0, nt), head = mt_tensor_rows(&acc, 0, nt);
        host->matmul(&dyT, &dyt, &eye, 1, 0, 1.0f, 0.0f); /* dy^T [I 0]: (out, NTILE) */
        for (int r0 = 0; r0 < out; r0 += rows) {
            const int nr = out - r0 < rows ? out - r0 : rows;
            mt_tensor w = qlora_band(L, r0, nr), band = mt_tensor_rows(&dyT, r0, nr);
            /* acc (NTILE,in) (+)= dy_band (NTILE,nr) · W_band (nr,in) */
            host->matmul(&acc, &band, &w, 1, 0, 1.0f, r0 ? 1.0f : 0.0f);
        }
        host->axpby(&dxt, 1.0f, &head, 1.0f);
    }
}

/* attach, per projection: quantize the weight on the host, upload the result, then
 * release the fp32 weight. */
static mt_status qlora_prepare(lora *lo, lora_layer *L, const mt_linear_info *info,
                               mt_error *err) {
    qlora_extra *qx = lo->extra;
    if (!info->weight.data)
        return host->error(err, MT_ERR_INVALID_ARG,
                           "%s: the base weight of %s was already released", lo->plugin,
                           info->name);
    qlora_weight *w = host->alloc(sizeof *w);
    if (!w) return host->error(err, MT_ERR_NOMEM, "%s: out of memory", lo->plugin);
    L->base = w;
    nf4_tensor q = {.n = (int64_t)info->in * info->out};
    q.n_blocks = (q.n + NF4_BLOCK - 1) / NF4_BLOCK;
    q.n_blocks2 = (q.n_blocks + DQ_BLOCK - 1) / DQ_BLOCK;
    q.codes = host->alloc((size_t)(q.n + 1) / 2);
    q.absmax_q = host->alloc((size_t)q.n_blocks);
    q.absmax2 = host->alloc((size_t)q.n_blocks2 * sizeof(float));
    float *absmax32 = host->alloc((size_t)q.n_blocks * sizeof(float));
    float *weight = host->alloc((size_t)q.n * sizeof(float));
    mt_status st = MT_OK;
    if (!q.codes || !q.absmax_q || !q.absmax2 || !absmax32 || !weight)
        st = host->error(err, MT_ERR_NOMEM, "%s: out of memory quantizing %s", lo->plugin,
                         info->name);
    if (!st) st = host->tensor_download(weight, &info->weight, err);
    if (!st) {
        nf4_quantize(weight, &q, absmax32);
        st = qlora_upload(&q, lo->device, w, err);
    }
    host->free(weight);
    host->free(absmax32);
    host->free(q.codes);
    host->free(q.absmax_q);
    host->free(q.absmax2);
    if (st) return st;
    L->bias = info->bias;
    host->linear_release_weight(L->lin);
    qx->n_params += q.n;
    qx->n_bytes += nf4_bytes(&q);
    return MT_OK;
}

/* The table tensor of host->dequantize_4bit: the NF4 values, then the dynamic map. */
static mt_status qlora_table_alloc(qlora_extra *qx, mt_device device, mt_error *err) {
    float table[16 + 256];
    memcpy(table, nf4_code, sizeof nf4_code);
    memcpy(table + 16, dyn_code, sizeof dyn_code);
    return qlora_tensor_1d(device, MT_F32, 16 + 256, table, &qx->table, err);
}

/* attach, after every projection: the table and the shared tiles. */
static mt_status qlora_alloc_extra(lora *lo, mt_error *err) {
    qlora_extra *qx = lo->extra;
    size_t w = 1;
    int64_t out_max = 0, in_max = 0;
    int any_bias = 0;
    for (int i = 0; i < lo->n_layers; i++) {
        const lora_layer *L = &lo->layers[i];
        const int rows = qlora_rows(qx, L->in, L->out);
        if ((size_t)rows * L->in > w) w = (size_t)rows * L->in;
        if (rows < L->out) { /* banded */
            if (L->out > out_max) out_max = L->out;
            if (L->in > in_max) in_max = L->in;
        }
        any_bias |= L->bias.data != NULL;
    }
    const int64_t shape_w[1] = {(int64_t)w};
    mt_status st = qlora_table_alloc(qx, lo->device, err);
    if (!st) st = host->tensor_alloc(lo->device, MT_F32, 1, shape_w, &qx->wtile, err);
    if (!st && out_max) {
        const int64_t shape_yt[2] = {out_max, QLORA_NTILE}, shape_xs[2] = {QLORA_NTILE, in_max},
                      shape_eye[2] = {QLORA_NTILE, QLORA_NTILE};
        st = host->tensor_alloc(lo->device, MT_F32, 2, shape_yt, &qx->yt, err);
        if (!st) st = host->tensor_alloc(lo->device, MT_F32, 2, shape_xs, &qx->xs, err);
        if (!st) st = host->tensor_alloc(lo->device, MT_F32, 2, shape_eye, &qx->eye, err);
        float *eye = st ? NULL : host->alloc((size_t)QLORA_NTILE * QLORA_NTILE * sizeof(float));
        if (!st && !eye) st = host->error(err, MT_ERR_NOMEM, "%s: out of memory", lo->plugin);
        if (!st) {
            for (int i = 0; i < QLORA_NTILE; i++) eye[(size_t)i * QLORA_NTILE + i] = 1.0f;
            st = host->tensor_upload(&qx->eye, eye, err);
        }
        host->free(eye);
    }
    if (!st && any_bias) {
        const int64_t shape_ones[2] = {LORA_TILE, 1};
        st = host->tensor_alloc(lo->device, MT_F32, 2, shape_ones, &qx->ones, err);
        if (!st) host->fill(&qx->ones, 1.0f);
    }
    if (st) return st;
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
    for (int i = 0; i < lo->n_layers; i++) qlora_weight_free(lo->layers[i].base);
    if (qx) {
        host->tensor_free(&qx->table);
        host->tensor_free(&qx->wtile);
        host->tensor_free(&qx->yt);
        host->tensor_free(&qx->xs);
        host->tensor_free(&qx->eye);
        host->tensor_free(&qx->ones);
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
    const qlora_extra *qx = lo->extra;
    mt_status st = MT_OK;
    int restored = 0;
    for (; restored < lo->n_layers; restored++) {
        lora_layer *L = &lo->layers[restored];
        mt_tensor W;
        if ((st = host->linear_restore_weight(L->lin, &W, err))) break;
        qlora_dequantize(qx, L->base, &W, 0);
        if (L->r) lora_fold(L, &W, 1.0f);
    }
    if (!st) st = host->check(err);
    if (st) { /* nothing stays merged: the quantized base is still the truth */
        char why[MT_ERROR_MSG_MAX];
        snprintf(why, sizeof why, "%s", err->msg);
        for (int j = 0; j < restored; j++) host->linear_release_weight(lo->layers[j].lin);
        return host->error(err, st, "%s: merge failed, nothing was merged: %s", lo->plugin, why);
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
    MT_VTABLE_SIZE(mt_adapter_vtable),
    .create = qlora_create,
    .destroy = lora_destroy,
    .attach = lora_attach,
    .merge = qlora_merge,
    .unmerge = qlora_unmerge,
    .set_enabled = lora_set_enabled,
    .set_training = lora_set_training,
    .set_replay = lora_set_replay,
    .state_count = lora_state_count,
    .state_get = lora_state_get,
    .state_set = lora_state_set,
    .format = "peft",
    .save = lora_save,
    .import_options = lora_import_options,
    .load = lora_load,
};

/* Written by hand (not MT_PLUGIN_DEFINE): loading also builds the tables. */
static const mt_plugin_descriptor qlora_descriptor = {
    .abi_version = MT_PLUGIN_ABI_VERSION,
    .size = sizeof(mt_plugin_descriptor),
    .kind = MT_PLUGIN_ADAPTER,
    .name = "qlora",
    .version = "2.0.0",
    .description = "QLoRA: LoRA over a frozen NF4 base with double quantization "
                   "(bitsandbytes' layout, ~0.52 bytes per base parameter)",
    .options = lora_options,
    .n_options = sizeof lora_options / sizeof lora_options[0],
    .option_size = sizeof(mt_option_spec),
    .vtable = &qlora_vtable,
};

MT_PLUGIN_EXPORT const mt_plugin_descriptor *moontune_plugin_entry(const mt_host *h) {
    host = h;
    qlora_tables();
    return &qlora_descriptor;
}
