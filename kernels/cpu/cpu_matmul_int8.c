/* cpu_matmul_int8.c — products with 8-bit copies of frozen weights (AVX512-VNNI, or
 * AVX2 + FMA): generation, and the frozen base's products in training.
 *
 * Decoding reads every weight once per step and does little arithmetic per byte, and
 * fp32 FMAs do 16 multiply-adds per instruction where VNNI's vpdpbusd does 64 (unsigned
 * bytes times signed bytes, four at a time into 16 int32 lanes). So a frozen weight
 * gets an 8-bit copy and each input row is quantised on the fly, both in groups of
 * GROUP = 32 inputs:
 *   weight  w[n][k] ≈ d[n][g] · q[n][k] + mn[n][g],  q in [0, 255], mn the group's
 *           minimum and d its range / 255. A group whose weights lie on a grid of at
 *           most 16 values (a GGUF's Q4_0/Q4_1/Q4_K blocks are 32 weights of 16) is
 *           kept on that grid instead, d its step and q in [0, 15]: exact up to fp32
 *           rounding, so the model multiplies by the weights it was given.
 *   input   x[m][k] ≈ sa[m][g] · a[m][k],  a in [-127, 127], symmetric: a scale per
 *           group keeps the few large inputs some channels carry (the SwiGLU output
 *           before down_proj has them) from flattening the rest of the row.
 * Then, per group, Σ_k w x ≈ d sa Σ_k q a + mn sa Σ_k a, the first sum exact in int32
 * (vpdpbusd), the second known when the row is quantised; the groups add up in fp32.
 * Training's input gradients dy · W use a copy of Wᵀ (made from W as stored) and add
 * into dx; their rows are rounded stochastically (unbiased) rather than to nearest.
 *
 * The weight is packed for vpdpbusd: panels of 32 output rows, and in a panel, for each
 * 4 inputs, two vectors of 16 rows × 4 bytes, each group's d and mn beside. The
 * micro-kernel broadcasts 4 bytes of an input row and multiplies them into 16 outputs
 * at once, so no lane sums are needed at the end: MR input rows × 2 vectors of int32
 * sums for the group, and as many fp32 accumulators. Every output is one thread's sum
 * in a fixed order, so the result does not depend on the number of threads, nor on
 * how many rows a call has (batched decoding gives each sequence the bits it gets
 * alone).
 *
 * CPUs with AVX2 and FMA but no VNNI (Zen 1-3, Haswell to Comet Lake) run a second
 * micro-kernel on the same packed copy: each 16 bytes (4 rows × 4 inputs) widened to
 * 16-bit and multiplied by the input's 4 values with vpmaddwd, whose pair sums are
 * exact (255 · 127 · 2 < 2³¹). The group sums are the same integers, and the fp32
 * steps after them the same operations in the same order, so both kernels give the
 * same bits (checked by test_kernels_cpu where the CPU has both). Where every code of a
 * copy is at most 15 (a Q4 GGUF's projections), a third kernel multiplies 32 codes at a
 * time with vpmaddubsw and sums a group in 16 bits: the same integers again.
 *
 * The kernels are compiled for their instructions with target attributes whatever the
 * build targets, and used only where the CPU has them (checked once at run time);
 * elsewhere cpu_weight_int8_create returns NULL and the caller keeps its fp32 product. */
#include "cpu_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h" /* mt_mix64 */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define INT8_KERNEL 1
#include <immintrin.h>
/* what the kernel's functions are compiled for, whatever the build targets */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define AVX2 __attribute__((target("avx2,fma")))
/* rintf as one instruction (roundss) while packing */
#define PACK __attribute__((target("sse4.1")))
#else
#define INT8_KERNEL 0
#define VNNI
#define AVX2
#define PACK
#endif

#define PANEL 32 /* output rows per packed panel: two vectors of 16 int32 lanes */
#define GROUP 32 /* inputs per weight and input scale */
#define MR 5     /* input rows per micro-kernel call: 4 · MR + 7 vector registers */
#define SMALL_LEVELS 15 /* a group on a grid of at most 16 values keeps codes 0..15 */

struct cpu_weight_int8 {
    int N, K;    /* the weight is (N,K) */
    int Kp;      /* K rounded up to GROUP; the inputs there are 0 */
    int panels;  /* ceil(N / PANEL) */
    uint8_t *q;  /* panels × (Kp/4) × 2 vectors × 64 bytes */
    float *d, *mn; /* panels × (Kp/GROUP) × PANEL: each group's step and minimum */
    int small_codes; /* every code is at most SMALL_LEVELS (every group lay on a grid) */
};

/* The best kernel this CPU has; tests may choose a lesser one (cpu_int8_use_kernel), and
 * turn the AVX2 kernel for small codes off (cpu_int8_use_small_codes). */
static int kernel_in_use = -1;
static int small_codes_on = 1;

int cpu_int8_best_kernel(void) {
#if INT8_KERNEL
    static int best = -1;
    if (best < 0) {
        __builtin_cpu_init();
        best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vnni")
                   ? CPU_INT8_VNNI
               : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? CPU_INT8_AVX2
                                                                                 : CPU_INT8_NONE;
    }
    return best;
#else
    return CPU_INT8_NONE;
#endif
}

int cpu_int8_kernel(void) {
    return kernel_in_use < 0 ? cpu_int8_best_kernel() : kernel_in_use;
}

int cpu_int8_use_kernel(int kernel) {
    if (kernel < CPU_INT8_NONE || kernel > cpu_int8_best_kernel()) return -1;
    kernel_in_use = kernel;
    return 0;
}

int cpu_int8_supported(void) { return cpu_int8_kernel() != CPU_INT8_NONE; }

void cpu_int8_use_small_codes(int on) { small_codes_on = on != 0; }

int cpu_weight_int8_small_codes(const cpu_weight_int8 *w) { return w->small_codes; }

void cpu_weight_int8_free(cpu_weight_int8 *w) {
    if (!w) return;
    free(w->q);
    free(w->d);
    free(w->mn);
    free(w);
}

/* The minimum and maximum of the n weights of a group; 0 for a NaN or an infinity. */
static int group_range(const float *vals, int n, float *lo_out, float *hi_out) {
    float lo = vals[0], hi = vals[0];
    for (int k = 0; k < n; k++) {
        if (!isfinite(vals[k])) return 0;
        lo = vals[k] < lo ? vals[k] : lo;
        hi = vals[k] > hi ? vals[k] : hi;
    }
    *lo_out = lo, *hi_out = hi;
    return 1;
}

/* The steps of the grid that the n weights of a group lie on, lo + j · (hi - lo) / steps
 * with j in 0..steps and steps <= SMALL_LEVELS (a GGUF's Q4_0/Q4_1/Q4_K blocks, whether
 * or not they use both ends of their 16 values), up to fp32 rounding (a thousandth of a
 * step), lo and hi their minimum and maximum; 0 when they lie on none. A group of
 * equal weights has one step (its codes are 0). Tried from the finest grid down, each try ending at its
 * first weight off the grid, so a group of ordinary weights costs a few comparisons. */
static PACK int grid_steps(const float *vals, int n, float lo, float hi) {
    if (!(hi > lo)) return 1;
    for (int steps = SMALL_LEVELS; steps >= 1; steps--) {
        const float step = (hi - lo) / (float)steps;
        if (!(step > 0.0f)) continue; /* underflowed: a range of a few denormals */
        int k = 0;
        while (k < n) {
            const float j = (vals[k] - lo) / step;
            if (!(fabsf(j - rintf(j)) <= 1e-3f)) break;
            k++;
        }
        if (k == n) return steps;
    }
    return 0;
}

/* The n weights of row r's group starting at input k0 (n <= GROUP; the rest of the
 * group past K is 0 in q), lo and hi their minimum and maximum, as codes on `steps`
 * steps from lo, into panel place. For SSE4.1, so that rintf is one instruction (this
 * runs for every weight). */
static PACK void pack_group(cpu_weight_int8 *q, const float *vals, int n, int r, int k0,
                            float lo, float hi, int steps) {
    const float step = (hi - lo) / (float)steps, top = (float)steps;
    const int groups = q->Kp / GROUP, panel = r / PANEL, lane_row = r % PANEL;
    const size_t at = ((size_t)panel * groups + k0 / GROUP) * PANEL + lane_row;
    q->d[at] = step;
    q->mn[at] = lo;
    uint8_t *codes = q->q + (size_t)panel * PANEL * q->Kp;
    const int vec = lane_row / 16, lane = lane_row % 16;
    for (int k = 0; k < n; k++) {
        /* (w - lo) / step, not · (1 / step), which rounds otherwise for some w */
        float c = step > 0.0f ? rintf((vals[k] - lo) / step) : 0.0f; /* as lrintf */
        const int at_k = k0 + k;
        codes[((size_t)(at_k / 4) * 2 + vec) * 64 + lane * 4 + at_k % 4] =
            (uint8_t)(c < 0.0f ? 0 : c > top ? (int)top : (int)c);
    }
}

cpu_weight_int8 *cpu_weight_int8_create(const float *w, int N, int K, int transposed) {
    if (!cpu_int8_supported() || N <= 0 || K <= 0 || K > INT32_MAX - GROUP) return NULL;
    cpu_weight_int8 *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->N = N;
    q->K = K;
    q->Kp = (K + GROUP - 1) / GROUP * GROUP;
    q->panels = (N + PANEL - 1) / PANEL;
    const size_t rows = (size_t)q->panels * PANEL, scales = rows * (size_t)(q->Kp / GROUP);
    q->q = aligned_alloc(64, rows * (size_t)q->Kp); /* a multiple of 64: PANEL · Kp */
    q->d = aligned_alloc(64, scales * sizeof(float));
    q->mn = aligned_alloc(64, scales * sizeof(float));
    if (!q->q || !q->d || !q->mn) {
        cpu_weight_int8_free(q);
        return NULL;
    }
    /* rows past N and inputs past K: code 0, step 0, minimum 0 */
    memset(q->q, 0, rows * (size_t)q->Kp);
    memset(q->d, 0, scales * sizeof(float));
    memset(q->mn, 0, scales * sizeof(float));
    int finite = 1, small = 1;
    /* a panel's rows group by group: for a transposed source the group's inputs are a
     * column of 32 rows of w, which then stay in cache while the panel's rows pass */
#pragma omp parallel for schedule(static) reduction(&& : finite, small)
    for (int p = 0; p < q->panels; p++)
        for (int k0 = 0; k0 < K; k0 += GROUP) {
            const int n = K - k0 < GROUP ? K - k0 : GROUP;
            for (int r = p * PANEL; r < N && r < (p + 1) * PANEL && finite; r++) {
                float vals[GROUP];
                if (transposed)
                    for (int k = 0; k < n; k++) vals[k] = w[(size_t)(k0 + k) * N + r];
                else
                    memcpy(vals, w + (size_t)r * K + k0, sizeof(float) * n);
                float lo, hi;
                finite = group_range(vals, n, &lo, &hi);
                if (!finite) break;
                /* a group on a grid of 16 values or fewer is packed on that grid: exact,
                 * and its codes fit the AVX2 kernel for small codes */
                const int steps = grid_steps(vals, n, lo, hi);
                small = small && steps > 0;
                pack_group(q, vals, n, r, k0, lo, hi, steps > 0 ? steps : 255);
            }
        }
    q->small_codes = small;
    if (!finite) { /* the fp32 product keeps what a NaN or infinity in the weight does */
        cpu_weight_int8_free(q);
        return NULL;
    }
    return q;
}

#if INT8_KERNEL
/* 16 uniform numbers in [0, 1) for inputs k..k+15 of a row: a hash of (key, k) (the
 * finaliser of MurmurHash3), a pure function of its arguments, so any split of the rows
 * over threads draws the same. */
static inline __attribute__((always_inline)) VNNI __m512 uniform16(uint32_t key, int k) {
    __m512i h = _mm512_add_epi32(_mm512_set1_epi32((int)key),
                                 _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(k),
                                                                     _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
                                                    _mm512_set1_epi32((int)0x9E3779B1u)));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0x85EBCA6Bu));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 13));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32((int)0xC2B2AE35u));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    /* the top 24 bits: exact in fp32, below 1 */
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), _mm512_set1_ps(0x1p-24f));
}

/* x / s as an integer: to nearest even (as lrintf) when key is 0, otherwise
 * stochastically, floor(x / s + u) with u uniform in [0, 1) from key, which is x / s's
 * floor or ceiling with the probabilities that make its mean x / s. */
static inline __attribute__((always_inline)) VNNI __m512i to_int(__m512 v, __m512 s, uint32_t key, int k) {
    /* x / s, not x · (1 / s), which rounds otherwise for some x */
    const __m512 r = _mm512_div_ps(v, s);
    if (!key) return _mm512_cvtps_epi32(r);
    return _mm512_cvt_roundps_epi32(_mm512_add_ps(r, uniform16(key, k)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
}

/* Row x (K) as a (Kp, 0 past K), and per group g its scale sa[g] = max |x| / 127 and
 * sa[g] · Σ a over the group in sb[g], a = x / sa[g] rounded as to_int does with key;
 * 0 when the row has a NaN or an infinity (its outputs become NaN). Two vectors per
 * group: this runs once per input row and projection, and called lrintf per input it
 * cost as much as the products of the small projections. */
static VNNI int quantize_row(const float *x, int K, int Kp, int8_t *a, float *sa, float *sb,
                             uint32_t key) {
    const __m512 zero = _mm512_setzero_ps();
    for (int g0 = 0; g0 < Kp; g0 += GROUP) {
        const int n = K - g0 < GROUP ? K - g0 : GROUP; /* >= 1: Kp is K rounded up */
        const __mmask16 m0 = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
        const __mmask16 m1 = n >= 32 ? (__mmask16)0xFFFF : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
        const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + g0), v1 = _mm512_maskz_loadu_ps(m1, x + g0 + 16);
        /* v - v is NaN exactly for a NaN or an infinity */
        if (_mm512_cmp_ps_mask(_mm512_sub_ps(v0, v0), zero, _CMP_NEQ_UQ) |
            _mm512_cmp_ps_mask(_mm512_sub_ps(v1, v1), zero, _CMP_NEQ_UQ))
            return 0;
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float scale = amax / 127.0f;
        __m512i q0 = _mm512_setzero_si512(), q1 = _mm512_setzero_si512();
        if (scale > 0.0f) {
            const __m512 s = _mm512_set1_ps(scale);
            const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
            /* the masks keep the inputs past K at 0; the clamps hold x / s = ±127
             * (·(1 ± 2⁻²⁴) after rounding, + u when stochastic) in range */
            q0 = _mm512_maskz_mov_epi32(m0, _mm512_min_epi32(_mm512_max_epi32(to_int(v0, s, key, g0), lo), hi));
            q1 = _mm512_maskz_mov_epi32(m1, _mm512_min_epi32(_mm512_max_epi32(to_int(v1, s, key, g0 + 16), lo), hi));
        }
        _mm_storeu_si128((__m128i *)(a + g0), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(a + g0 + 16), _mm512_cvtsepi32_epi8(q1));
        sa[g0 / GROUP] = scale;
        sb[g0 / GROUP] = scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
    return 1;
}

/* Outputs c[i][0..nvalid) (nvalid <= PANEL) for quantised input rows a[0..mr) (each Kp
 * bytes; sa, sb (mr, Kp / GROUP) as quantize_row makes them) against one packed panel:
 * codes q, and d, mn (Kp / GROUP, PANEL). Inlined into a copy per mr, so that the
 * accumulators stay in registers. */
static inline __attribute__((always_inline)) VNNI void
panel_rows(float *c, int ldc, const int8_t *a, int Kp, const uint8_t *q, const float *d,
           const float *mn, const float *sa, const float *sb, int nvalid, int accumulate,
           const int mr) {
    const int groups = Kp / GROUP;
    __m512 acc[MR][2];
#pragma GCC unroll 8
    for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512i sums[MR][2];
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) sums[i][0] = sums[i][1] = _mm512_setzero_si512();
        const uint8_t *qg = q + (size_t)g * GROUP * PANEL;
        const int8_t *ag = a + (size_t)g * GROUP;
#pragma GCC unroll 8
        for (int k4 = 0; k4 < GROUP / 4; k4++) {
            const __m512i w0 = _mm512_load_si512(qg + (size_t)k4 * 128);
            const __m512i w1 = _mm512_load_si512(qg + (size_t)k4 * 128 + 64);
#pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                int32_t four;
                memcpy(&four, ag + (size_t)i * Kp + (size_t)k4 * 4, 4);
                const __m512i x = _mm512_set1_epi32(four);
                sums[i][0] = _mm512_dpbusd_epi32(sums[i][0], w0, x);
                sums[i][1] = _mm512_dpbusd_epi32(sums[i][1], w1, x);
            }
        }
        const __m512 d0 = _mm512_load_ps(d + (size_t)g * PANEL), d1 = _mm512_load_ps(d + (size_t)g * PANEL + 16);
        const __m512 m0 = _mm512_load_ps(mn + (size_t)g * PANEL), m1 = _mm512_load_ps(mn + (size_t)g * PANEL + 16);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            const __m512 s = _mm512_set1_ps(sa[(size_t)i * groups + g]);
            const __m512 b = _mm512_set1_ps(sb[(size_t)i * groups + g]);
            acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[i][0]), _mm512_mul_ps(d0, s),
                                        _mm512_fmadd_ps(m0, b, acc[i][0]));
            acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[i][1]), _mm512_mul_ps(d1, s),
                                        _mm512_fmadd_ps(m1, b, acc[i][1]));
        }
    }
    for (int h = 0; h < 2; h++) {
        const int first = h * 16, count = nvalid - first;
        if (count <= 0) break;
        const __mmask16 mask = count >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << count) - 1);
#pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            float *out = c + (size_t)i * ldc + first;
            const __m512 v = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), acc[i][h]) : acc[i][h];
            _mm512_mask_storeu_ps(out, mask, v);
        }
    }
}

static VNNI void panel_block(float *c, int ldc, const int8_t *a, int Kp, const uint8_t *q,
                             const float *d, const float *mn, const float *sa, const float *sb,
                             int nvalid, int accumulate, int mr) {
    switch (mr) {
#define ROWS(r) \
    case r: panel_rows(c, ldc, a, Kp, q, d, mn, sa, sb, nvalid, accumulate, r); break;
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5)
#undef ROWS
    default: break;
    }
}
_Static_assert(MR == 5, "panel_block has a case for each row count up to MR");

/* ---- the AVX2 + FMA kernel: the same numbers without VNNI ---------------- */

#define MR2 3 /* input rows per AVX2 micro-kernel call: 4 · MR2 int32 sums + MR2 + 1 */

/* uniform16's numbers for inputs k..k+7 */
static inline __attribute__((always_inline)) AVX2 __m256 uniform8(uint32_t key, int k) {
    __m256i h = _mm256_add_epi32(_mm256_set1_epi32((int)key),
                                 _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32(k),
                                                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                                    _mm256_set1_epi32((int)0x9E3779B1u)));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0x85EBCA6Bu));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
    h = _mm256_mullo_epi32(h, _mm256_set1_epi32((int)0xC2B2AE35u));
    h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(h, 8)), _mm256_set1_ps(0x1p-24f));
}

/* to_int on 8 lanes: floor(r + u) converted exactly is what rounding toward -inf gives */
static inline __attribute__((always_inline)) AVX2 __m256i to_int8(__m256 v, __m256 s, uint32_t key, int k) {
    const __m256 r = _mm256_div_ps(v, s);
    if (!key) return _mm256_cvtps_epi32(r);
    return _mm256_cvttps_epi32(_mm256_floor_ps(_mm256_add_ps(r, uniform8(key, k))));
}

/* quantize_row with AVX2: the same codes and scales, to the bit */
static AVX2 int quantize_row_avx2(const float *x, int K, int Kp, int8_t *a, float *sa, float *sb,
                                  uint32_t key) {
    const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
    for (int g0 = 0; g0 < Kp; g0 += GROUP) {
        const int n = K - g0 < GROUP ? K - g0 : GROUP; /* >= 1: Kp is K rounded up */
        float tail[GROUP] = {0};
        const float *src = x + g0;
        if (n < GROUP) { /* the inputs past K are 0, as the AVX-512 masks make them */
            memcpy(tail, src, sizeof(float) * (size_t)n);
            src = tail;
        }
        __m256 v[4], bad = zero, amax = zero;
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(src + 8 * j);
            /* v - v is NaN exactly for a NaN or an infinity */
            bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v[j], v[j]), zero, _CMP_NEQ_UQ));
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
        }
        if (_mm256_movemask_ps(bad)) return 0;
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float scale = _mm_cvtss_f32(m4) / 127.0f;
        __m256i q[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                        _mm256_setzero_si256()};
        if (scale > 0.0f) {
            const __m256 s = _mm256_set1_ps(scale);
            const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
            const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            for (int j = 0; j < 4; j++) {
                const __m256i inside = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8 * j), lane);
                q[j] = _mm256_and_si256(inside, _mm256_min_epi32(_mm256_max_epi32(to_int8(v[j], s, key, g0 + 8 * j), lo), hi));
            }
        }
        /* 32 int32 in [-127, 127] to bytes: the packs interleave 128-bit halves, the
         * permute puts the 4-byte pieces back in order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(void *)(a + g0),
                            _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        __m256i t = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
        t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
        sa[g0 / GROUP] = scale;
        sb[g0 / GROUP] = scale * (float)_mm_cvtsi128_si32(t4);
    }
    return 1;
}

/* Eight rows' group sums in row order from vpmaddwd's pair sums: s0's lanes are rows
 * 0-3's sums of inputs (0,1) and (2,3) of each 4 (row 0, row 0, row 1, row 1 | row 2,
 * row 2, row 3, row 3), s1's rows 4-7's. hadd leaves rows 0 1 4 5 | 2 3 6 7. */
static inline __attribute__((always_inline)) AVX2 __m256i row_sums8(__m256i s0, __m256i s1) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(s0, s1), 0xD8);
}

/* The AVX2 kernels' fp32 step after group g: rows[i][0..1], the int32 sums of input row
 * i for the half-panel's outputs 0-7 and 8-15, scaled and added to acc as panel_rows
 * does, lane for lane. */
static inline __attribute__((always_inline)) AVX2 void
add_group_avx2(__m256 acc[][2], __m256i rows[][2], const float *d, const float *mn,
               const float *sa, const float *sb, int g, int groups, int half, int mr) {
    const float *dg = d + (size_t)g * PANEL + half * 16, *mg = mn + (size_t)g * PANEL + half * 16;
    const __m256 d0 = _mm256_loadu_ps(dg), d1 = _mm256_loadu_ps(dg + 8);
    const __m256 m0 = _mm256_loadu_ps(mg), m1 = _mm256_loadu_ps(mg + 8);
#pragma GCC unroll 4
    for (int i = 0; i < mr; i++) {
        const __m256 s = _mm256_set1_ps(sa[(size_t)i * groups + g]);
        const __m256 b = _mm256_set1_ps(sb[(size_t)i * groups + g]);
        acc[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows[i][0]), _mm256_mul_ps(d0, s),
                                    _mm256_fmadd_ps(m0, b, acc[i][0]));
        acc[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows[i][1]), _mm256_mul_ps(d1, s),
                                    _mm256_fmadd_ps(m1, b, acc[i][1]));
    }
}

/* The AVX2 kernels' last step: rows i < mr of the half-panel's sums acc[i][0..1] (8
 * outputs each) into c, or added to it, up to output nvalid of the panel. */
static inline __attribute__((always_inline)) AVX2 void
store_rows_avx2(float *c, int ldc, __m256 acc[][2], int half, int nvalid, int accumulate, int mr) {
    for (int e = 0; e < 2; e++) {
        const int first = half * 16 + e * 8, count = nvalid - first;
        if (count <= 0) break;
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) {
            float *out = c + (size_t)i * ldc + first;
            if (count >= 8) {
                const __m256 v = accumulate ? _mm256_add_ps(_mm256_loadu_ps(out), acc[i][e]) : acc[i][e];
                _mm256_storeu_ps(out, v);
            } else {
                float lanes[8];
                _mm256_storeu_ps(lanes, acc[i][e]);
                for (int l = 0; l < count; l++) out[l] = accumulate ? out[l] + lanes[l] : lanes[l];
            }
        }
    }
}

/* panel_rows for AVX2 + FMA, on the VNNI layout: half a panel (16 rows) at a time,
 * each 16 bytes of a 4-input step (4 rows × 4 inputs) widened to 16 bits and
 * multiplied with the input's 4 values by vpmaddwd. Its pair sums are exact, and so
 * is every group sum; the fp32 steps are panel_rows', lane for lane. */
static inline __attribute__((always_inline)) AVX2 void
panel_rows_avx2(float *c, int ldc, const int8_t *a, int Kp, const uint8_t *q, const float *d,
                const float *mn, const float *sa, const float *sb, int nvalid, int accumulate,
                const int mr) {
    const int groups = Kp / GROUP;
    for (int half = 0; half < 2 && half * 16 < nvalid; half++) {
        __m256 acc[MR2][2];
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            __m256i sums[MR2][4];
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++)
                sums[i][0] = sums[i][1] = sums[i][2] = sums[i][3] = _mm256_setzero_si256();
            const uint8_t *qg = q + (size_t)g * GROUP * PANEL + (size_t)half * 64;
            const int8_t *ag = a + (size_t)g * GROUP;
#pragma GCC unroll 8
            for (int k4 = 0; k4 < GROUP / 4; k4++) {
                __m256i x[MR2];
#pragma GCC unroll 4
                for (int i = 0; i < mr; i++) {
                    int32_t four;
                    memcpy(&four, ag + (size_t)i * Kp + (size_t)k4 * 4, 4);
                    x[i] = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(four)));
                }
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    const __m256i w = _mm256_cvtepu8_epi16(
                        _mm_load_si128((const __m128i *)(const void *)(qg + (size_t)k4 * 128 + (size_t)j * 16)));
#pragma GCC unroll 4
                    for (int i = 0; i < mr; i++)
                        sums[i][j] = _mm256_add_epi32(sums[i][j], _mm256_madd_epi16(w, x[i]));
                }
            }
            __m256i rows[MR2][2];
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) {
                rows[i][0] = row_sums8(sums[i][0], sums[i][1]);
                rows[i][1] = row_sums8(sums[i][2], sums[i][3]);
            }
            add_group_avx2(acc, rows, d, mn, sa, sb, g, groups, half, mr);
        }
        store_rows_avx2(c, ldc, acc, half, nvalid, accumulate, mr);
    }
}

/* panel_rows_avx2 for a copy whose codes are all at most 15 (small_codes: the base of a
 * Q4 GGUF): vpmaddubsw multiplies 32 codes (unsigned) by the input's bytes (signed) at
 * once, and its pair sums, at most 2 · 15 · 127 = 3810, are exact. A group's 8 steps of
 * 4 inputs then add up to at most 30480, so they are summed in 16 bits (vpaddw) and
 * widened once per group (vpmaddwd by ones), where the 8-bit kernel widens every code
 * and multiplies 16 at a time. Both lanes of a row are its two pairs, so the widening
 * leaves the 8 rows of a vector in order. The group sums are the same integers as the
 * other kernels', and the fp32 steps are panel_rows', lane for lane: the same bits. */
static inline __attribute__((always_inline)) AVX2 void
panel_rows_avx2_small(float *c, int ldc, const int8_t *a, int Kp, const uint8_t *q, const float *d,
                      const float *mn, const float *sa, const float *sb, int nvalid, int accumulate,
                      const int mr) {
    const int groups = Kp / GROUP;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2 && half * 16 < nvalid; half++) {
        __m256 acc[MR2][2];
#pragma GCC unroll 4
        for (int i = 0; i < mr; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int g = 0; g < groups; g++) {
            __m256i sums[MR2][2];
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) sums[i][0] = sums[i][1] = _mm256_setzero_si256();
            const uint8_t *qg = q + (size_t)g * GROUP * PANEL + (size_t)half * 64;
            const int8_t *ag = a + (size_t)g * GROUP;
            /* not 8: fully unrolled, gcc reassociates the integer sums, computes all
             * 48 vpmaddubsw first and spills them (0.83x the speed; docs/speed.md) */
#pragma GCC unroll 2
            for (int k4 = 0; k4 < GROUP / 4; k4++) {
                const __m256i w0 = _mm256_load_si256((const __m256i *)(const void *)(qg + (size_t)k4 * 128));
                const __m256i w1 = _mm256_load_si256((const __m256i *)(const void *)(qg + (size_t)k4 * 128 + 32));
#pragma GCC unroll 4
                for (int i = 0; i < mr; i++) {
                    int32_t four;
                    memcpy(&four, ag + (size_t)i * Kp + (size_t)k4 * 4, 4);
                    const __m256i x = _mm256_set1_epi32(four);
                    sums[i][0] = _mm256_add_epi16(sums[i][0], _mm256_maddubs_epi16(w0, x));
                    sums[i][1] = _mm256_add_epi16(sums[i][1], _mm256_maddubs_epi16(w1, x));
                }
            }
            __m256i rows[MR2][2];
#pragma GCC unroll 4
            for (int i = 0; i < mr; i++) {
                rows[i][0] = _mm256_madd_epi16(sums[i][0], ones);
                rows[i][1] = _mm256_madd_epi16(sums[i][1], ones);
            }
            add_group_avx2(acc, rows, d, mn, sa, sb, g, groups, half, mr);
        }
        store_rows_avx2(c, ldc, acc, half, nvalid, accumulate, mr);
    }
}

/* The AVX2 kernel for mr input rows (at most MR2), the one for small codes when small */
static AVX2 void panel_block_avx2(float *c, int ldc, const int8_t *a, int Kp, const uint8_t *q,
                                  const float *d, const float *mn, const float *sa,
                                  const float *sb, int nvalid, int accumulate, int mr, int small) {
    switch (mr) {
#define ROWS(r)                                                                                 \
    case r:                                                                                     \
        if (small) panel_rows_avx2_small(c, ldc, a, Kp, q, d, mn, sa, sb, nvalid, accumulate, r); \
        else panel_rows_avx2(c, ldc, a, Kp, q, d, mn, sa, sb, nvalid, accumulate, r);             \
        break;
        ROWS(1) ROWS(2) ROWS(3)
#undef ROWS
    default: break;
    }
}
_Static_assert(MR2 == 3, "panel_block_avx2 has a case for each row count up to MR2");
#endif

/* A key per row and seed, never 0 (0 means rounding to nearest): the seed and the row
 * mixed as mt_random_uniform mixes its seed and counter. */
static uint32_t row_key(uint64_t seed, int m) {
    return (uint32_t)mt_mix64(mt_mix64(seed) ^ (uint64_t)m) | 1u;
}

/* Input rows quantised once, for any copies whose K they share: their codes (M, Kp;
 * Kp is K rounded up to GROUP), their scales sa and sb (M, Kp / GROUP) each, and a flag
 * per row (0: the row had a NaN or an infinity), in one block. */
struct cpu_int8_rows {
    int M, K, Kp;
    int8_t *a;
    float *sa, *sb;
    unsigned char *ok;
};

void cpu_int8_rows_free(cpu_int8_rows *rows) {
    if (!rows) return;
    free(rows->a); /* the block */
    free(rows);
}

cpu_int8_rows *cpu_int8_rows_quantize(const float *x, int M, int K, uint64_t round_seed) {
#if INT8_KERNEL
    const int kernel = cpu_int8_kernel();
    if (kernel == CPU_INT8_NONE || M <= 0 || K <= 0) return NULL;
    const int Kp = (K + GROUP - 1) / GROUP * GROUP, groups = Kp / GROUP;
    cpu_int8_rows *rows = malloc(sizeof *rows);
    if (!rows) return NULL;
    const size_t codes = (size_t)M * Kp, row_scales = (size_t)M * groups * sizeof(float);
    /* aligned_alloc's size is a multiple of the alignment; codes (M · Kp, Kp a multiple of
     * 32) keep the scales after them aligned for floats */
    char *block = aligned_alloc(64, (codes + 2 * row_scales + (size_t)M + 63) & ~(size_t)63);
    if (!block) {
        free(rows);
        return NULL;
    }
    *rows = (cpu_int8_rows){.M = M, .K = K, .Kp = Kp, .a = (int8_t *)block,
                            .sa = (float *)(void *)(block + codes),
                            .sb = (float *)(void *)(block + codes + row_scales),
                            .ok = (unsigned char *)block + codes + 2 * row_scales};
#pragma omp parallel for schedule(static) if ((int64_t)M * K >= 32768)
    for (int m = 0; m < M; m++) {
        const uint32_t key = round_seed ? row_key(round_seed, m) : 0;
        rows->ok[m] = (unsigned char)(kernel == CPU_INT8_VNNI
                                          ? quantize_row(x + (size_t)m * K, K, Kp, rows->a + (size_t)m * Kp,
                                                         rows->sa + (size_t)m * groups, rows->sb + (size_t)m * groups, key)
                                          : quantize_row_avx2(x + (size_t)m * K, K, Kp, rows->a + (size_t)m * Kp,
                                                              rows->sa + (size_t)m * groups, rows->sb + (size_t)m * groups, key));
    }
    return rows;
#else
    (void)x, (void)M, (void)K, (void)round_seed;
    return NULL;
#endif
}

int cpu_matmul_int8_rows(float *c, const cpu_int8_rows *rows, const cpu_weight_int8 *w,
                         int accumulate) {
#if INT8_KERNEL
    const int kernel = cpu_int8_kernel();
    if (kernel == CPU_INT8_NONE || !rows || rows->K != w->K) return -1;
    const int N = w->N, K = w->K, Kp = w->Kp, groups = Kp / GROUP, M = rows->M;
    /* the AVX2 kernel for small codes where every code of the copy is one */
    const int small = kernel == CPU_INT8_AVX2 && w->small_codes && small_codes_on;
    const int mr = kernel == CPU_INT8_VNNI ? MR : MR2;
    const int8_t *a = rows->a;
    const float *sa = rows->sa, *sb = rows->sb;
#pragma omp parallel for schedule(static) if ((int64_t)M * N * K >= 262144)
    for (int p = 0; p < w->panels; p++) {
        const int n0 = p * PANEL, nvalid = N - n0 < PANEL ? N - n0 : PANEL;
        const size_t scales = (size_t)p * groups * PANEL;
        for (int m0 = 0; m0 < M; m0 += mr) {
            float *cb = c + (size_t)m0 * N + n0;
            const int8_t *ab = a + (size_t)m0 * Kp;
            const uint8_t *qp = w->q + (size_t)p * PANEL * Kp;
            const int nrows = M - m0 < mr ? M - m0 : mr;
            if (kernel == CPU_INT8_VNNI)
                panel_block(cb, N, ab, Kp, qp, w->d + scales, w->mn + scales,
                            sa + (size_t)m0 * groups, sb + (size_t)m0 * groups, nvalid, accumulate,
                            nrows);
            else
                panel_block_avx2(cb, N, ab, Kp, qp, w->d + scales, w->mn + scales,
                                 sa + (size_t)m0 * groups, sb + (size_t)m0 * groups, nvalid,
                                 accumulate, nrows, small);
        }
    }
    for (int m = 0; m < M; m++)
        if (!rows->ok[m])
            for (int n = 0; n < N; n++) c[(size_t)m * N + n] = NAN;
    return 0;
#else
    (void)c, (void)rows, (void)w, (void)accumulate;
    return -1;
#endif
}

int cpu_matmul_int8(float *c, const float *x, const cpu_weight_int8 *w, int M, int accumulate,
                    uint64_t round_seed) {
    if (cpu_int8_kernel() == CPU_INT8_NONE) return -1;
    if (M <= 0) return 0;
    cpu_int8_rows *rows = cpu_int8_rows_quantize(x, M, w->K, round_seed);
    if (!rows) return -1;
    const int st = cpu_matmul_int8_rows(c, rows, w, accumulate);
    cpu_int8_rows_free(rows);
    return st;
}
