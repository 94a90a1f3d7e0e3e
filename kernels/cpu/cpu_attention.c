/* cpu_attention.c — causal grouped-query attention on the CPU, FlashAttention style.
 *
 * Nothing of size (T,T) is stored. Queries and keys are cut into blocks of 64;
 * the products of blocks go through one small register-tiled matrix kernel
 * (cpu_gemm_tile, cpu_matmul_small.c) and the softmax through a vectorisable exp
 * (cpu_exp_shifted).
 *
 * Forward: one task per (b, h, block of queries), walking the key blocks with an
 * online softmax; each task writes only its own rows of out and lse.
 * Backward: one task per (b, kv head). It owns dk and dv of that kv head and dq
 * of the query heads that read it, so no two threads write the same memory, and
 * every sum runs in a fixed order: the results do not depend on the thread count.
 *
 * Scratch comes from the caller's work buffer (cpu_attention_work_bytes), one
 * slot per thread; the kernels never allocate. */
#include "cpu_kernels.h"

#include <math.h>
#include <omp.h>
#include <string.h>

#define ATT_BQ 64 /* queries per block */
#define ATT_BK 64 /* keys per block */
/* Below about this many multiply-adds (B*H*T*T*D) a call runs on the calling thread. */
#define ATT_PAR_MIN ((size_t)1 << 20)

/* ---- scratch ------------------------------------------------------------- */

/* Floats of scratch one thread needs, rounded up to whole 64-byte lines. */
static size_t att_slot_floats(int T, int H, int KVH, int D) {
    size_t d = (size_t)D, G = (size_t)(H / KVH);
    // forward: kt (D,BK), s (BQ,BK), o (BQ,D), m, l (BQ)
    size_t fwd = d * ATT_BK + (size_t)ATT_BQ * ATT_BK + (size_t)ATT_BQ * d + 2 * (size_t)ATT_BQ;
    // backward: kt, vt (D,BK), p, ds (BQ,BK), dk, dv (BK,D), delta (G,T)
    size_t bwd =
        2 * d * ATT_BK + 2 * (size_t)ATT_BQ * ATT_BK + 2 * (size_t)ATT_BK * d + G * (size_t)T;
    size_t n = fwd > bwd ? fwd : bwd;
    return (n + 15) / 16 * 16;
}

static int att_threads(int num_threads) {
    return num_threads > 0 ? num_threads : omp_get_max_threads();
}

size_t cpu_attention_work_bytes(int B, int T, int H, int KVH, int D, int num_threads) {
    (void)B;
    if (T <= 0 || H <= 0 || KVH <= 0 || D <= 0) return 0;
    return (size_t)att_threads(num_threads) * att_slot_floats(T, H, KVH, D) * sizeof(float);
}

/* ---- building blocks ----------------------------------------------------- */

/* Scales the nk scores of query t (srow) and sets the keys t may not see to -INFINITY:
 * key s0 + j is visible iff s0 + j <= t and, with segments, segk[j] == seg_t. */
static void att_mask_row(float *srow, int nk, int s0, int t, float scale, const int32_t *segk,
                         int32_t seg_t) {
    int nvis = t - s0 + 1; // keys j < nvis are causally visible
    if (segk) {
        for (int j = 0; j < nk; j++)
            srow[j] = (j < nvis && segk[j] == seg_t) ? srow[j] * scale : -INFINITY;
    } else {
        for (int j = 0; j < nk; j++) srow[j] = j < nvis ? srow[j] * scale : -INFINITY;
    }
}

/* Whether any key in [s0,s1) may be visible to any query in [t0,t1): conservative,
 * used only to skip whole blocks (the mask itself is applied per element). */
static int att_block_visible(const int32_t *seg, int t0, int t1, int s0, int s1) {
    if (s0 > t1 - 1) return 0;
    if (!seg) return 1;
    int32_t ids[ATT_BQ];
    int nids = 0;
    for (int t = t0; t < t1; t++) {
        int seen = 0;
        for (int i = 0; i < nids; i++) seen |= ids[i] == seg[t];
        if (seen) continue;
        if (nids == ATT_BQ) return 1; // too many to track: assume visible
        ids[nids++] = seg[t];
    }
    int send = s1 < t1 ? s1 : t1;
    for (int s = s0; s < send; s++)
        for (int i = 0; i < nids; i++)
            if (seg[s] == ids[i]) return 1;
    return 0;
}

/* dst (D,BK) = the transpose of nk rows (D) of src, one every `stride` floats. */
static void att_transpose(float *dst, const float *src, size_t stride, int nk, int D) {
    for (int j = 0; j < nk; j++) {
        const float *row = src + (size_t)j * stride;
        for (int d = 0; d < D; d++) dst[(size_t)d * ATT_BK + j] = row[d];
    }
}

/* ---- forward ------------------------------------------------------------- */

void cpu_attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                           const int32_t *segments, int B, int T, int H, int KVH, int D,
                           float scale, void *work, int num_threads) {
    // out is (B,T,H,D), lse is (B,H,T), q is (B,T,H,D), k, v are (B,T,KVH,D), segments is (B,T)
    if (B <= 0 || T <= 0 || H <= 0) return;
    int G = H / KVH;
    int nqb = (T + ATT_BQ - 1) / ATT_BQ;
    int ntasks = B * H * nqb;
    int nt = att_threads(num_threads);
    int par = (size_t)B * H * T * T * D >= ATT_PAR_MIN;
    size_t slot = att_slot_floats(T, H, KVH, D);
    size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D;

#pragma omp parallel num_threads(nt) if (par)
    {
        float *kt = (float *)work + (size_t)omp_get_thread_num() * slot; // (D,BK)
        float *s = kt + (size_t)D * ATT_BK;                              // (BQ,BK)
        float *o = s + (size_t)ATT_BQ * ATT_BK;                          // (BQ,D)
        float *m = o + (size_t)ATT_BQ * D;                               // (BQ)
        float *l = m + ATT_BQ;                                           // (BQ)

        // the costliest blocks (the last queries) first
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < ntasks; task++) {
            int qb = nqb - 1 - task % nqb;
            int h = (task / nqb) % H;
            int b = task / (nqb * H);
            int kvh = h / G;
            const int32_t *seg = segments ? segments + (size_t)b * T : NULL;
            int t0 = qb * ATT_BQ, t1 = t0 + ATT_BQ < T ? t0 + ATT_BQ : T, nq = t1 - t0;
            const float *qblk = q + ((size_t)b * T + t0) * qstride + (size_t)h * D; // (nq,D)
            const float *kbase = k + (size_t)b * T * kstride + (size_t)kvh * D;     // (T,D)
            const float *vbase = v + (size_t)b * T * kstride + (size_t)kvh * D;     // (T,D)

            for (int i = 0; i < nq; i++) m[i] = -INFINITY, l[i] = 0.0f;
            memset(o, 0, (size_t)nq * D * sizeof(float));

            for (int s0 = 0; s0 < t1; s0 += ATT_BK) {
                int s1 = s0 + ATT_BK < t1 ? s0 + ATT_BK : t1, nk = s1 - s0;
                if (!att_block_visible(seg, t0, t1, s0, s1)) continue;
                // s (nq,nk) = q block · k block^T
                att_transpose(kt, kbase + (size_t)s0 * kstride, kstride, nk, D);
                cpu_gemm_tile(s, ATT_BK, qblk, qstride, 1, kt, ATT_BK, nq, nk, D, 1.0f, 0.0f);
                // online softmax: p = exp(s - new max); o and l rescaled to the new max
                for (int i = 0; i < nq; i++) {
                    int t = t0 + i;
                    float *srow = s + (size_t)i * ATT_BK;
                    att_mask_row(srow, nk, s0, t, scale, seg ? seg + s0 : NULL, seg ? seg[t] : 0);
                    float mx = cpu_max(srow, nk);
                    if (mx == -INFINITY) { // nothing visible to this row here: p = 0
                        memset(srow, 0, (size_t)nk * sizeof(float));
                        continue;
                    }
                    float mnew = m[i] > mx ? m[i] : mx;
                    float alpha = m[i] == -INFINITY ? 0.0f : expf(m[i] - mnew);
                    l[i] = l[i] * alpha + cpu_exp_shifted(srow, srow, mnew, nk);
                    m[i] = mnew;
                    float *orow = o + (size_t)i * D;
                    for (int d = 0; d < D; d++) orow[d] *= alpha;
                }
                // o (nq,D) += p (nq,nk) · v block (nk,D)
                cpu_gemm_tile(o, (size_t)D, s, ATT_BK, 1, vbase + (size_t)s0 * kstride, kstride, nq,
                              D, nk, 1.0f, 1.0f);
            }

            float *lrow = lse + ((size_t)b * H + h) * T;
            for (int i = 0; i < nq; i++) {
                int t = t0 + i;
                float *dst = out + ((size_t)b * T + t) * qstride + (size_t)h * D;
                if (l[i] > 0.0f) {
                    float inv = 1.0f / l[i];
                    for (int d = 0; d < D; d++) dst[d] = o[(size_t)i * D + d] * inv;
                    lrow[t] = m[i] + logf(l[i]);
                } else { // no visible key (impossible with the causal rule): zeros
                    memset(dst, 0, (size_t)D * sizeof(float));
                    lrow[t] = -INFINITY;
                }
            }
        }
    }
}

/* ---- backward ------------------------------------------------------------ */

void cpu_attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *out,
                            const float *lse, const float *q, const float *k, const float *v,
                            const int32_t *segments, int B, int T, int H, int KVH, int D,
                            float scale, void *work, int num_threads) {
    // dq is (B,T,H,D) =, dk, dv are (B,T,KVH,D) =, dout, out, q are (B,T,H,D),
    // lse is (B,H,T), k, v are (B,T,KVH,D), segments is (B,T) or NULL
    //   P = exp(scale q·k - lse), dP = dout·v, delta_t = sum_d dout·out,
    //   dS = P * (dP - delta), dq = scale dS·k, dk = scale dS^T·q, dv = P^T·dout
    if (B <= 0 || T <= 0 || H <= 0) return;
    int G = H / KVH;
    int nkb = (T + ATT_BK - 1) / ATT_BK;
    int ntasks = B * KVH;
    int nt = att_threads(num_threads);
    int par = (size_t)B * H * T * T * D >= ATT_PAR_MIN;
    size_t slot = att_slot_floats(T, H, KVH, D);
    size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D;

#pragma omp parallel num_threads(nt) if (par)
    {
        float *kt = (float *)work + (size_t)omp_get_thread_num() * slot; // (D,BK)
        float *vt = kt + (size_t)D * ATT_BK;                             // (D,BK)
        float *p = vt + (size_t)D * ATT_BK;                              // (BQ,BK)
        float *ds = p + (size_t)ATT_BQ * ATT_BK;                         // (BQ,BK)
        float *dkacc = ds + (size_t)ATT_BQ * ATT_BK;                     // (BK,D)
        float *dvacc = dkacc + (size_t)ATT_BK * D;                       // (BK,D)
        float *delta = dvacc + (size_t)ATT_BK * D;                       // (G,T)

#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < ntasks; task++) {
            int b = task / KVH, kvh = task % KVH;
            const int32_t *seg = segments ? segments + (size_t)b * T : NULL;
            const float *kbase = k + (size_t)b * T * kstride + (size_t)kvh * D; // (T,D)
            const float *vbase = v + (size_t)b * T * kstride + (size_t)kvh * D; // (T,D)

            // delta (G,T) = rowsum(dout * out) for this group's heads; their dq = 0
            for (int g = 0; g < G; g++) {
                int h = kvh * G + g;
                for (int t = 0; t < T; t++) {
                    size_t off = ((size_t)b * T + t) * qstride + (size_t)h * D;
                    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                    for (int d = 0; d < D; d++) acc += dout[off + d] * out[off + d];
                    delta[(size_t)g * T + t] = acc;
                    memset(dq + off, 0, (size_t)D * sizeof(float));
                }
            }

            for (int kb = 0; kb < nkb; kb++) {
                int s0 = kb * ATT_BK, s1 = s0 + ATT_BK < T ? s0 + ATT_BK : T, nk = s1 - s0;
                const float *kblk = kbase + (size_t)s0 * kstride; // (nk,D)
                const float *vblk = vbase + (size_t)s0 * kstride; // (nk,D)
                att_transpose(kt, kblk, kstride, nk, D);
                att_transpose(vt, vblk, kstride, nk, D);
                memset(dkacc, 0, (size_t)nk * D * sizeof(float));
                memset(dvacc, 0, (size_t)nk * D * sizeof(float));

                for (int g = 0; g < G; g++) {
                    int h = kvh * G + g;
                    const float *lrow = lse + ((size_t)b * H + h) * T;
                    // queries before s0 see none of these keys
                    for (int t0 = s0 / ATT_BQ * ATT_BQ; t0 < T; t0 += ATT_BQ) {
                        int t1 = t0 + ATT_BQ < T ? t0 + ATT_BQ : T, nq = t1 - t0;
                        if (!att_block_visible(seg, t0, t1, s0, s1)) continue;
                        size_t off = ((size_t)b * T + t0) * qstride + (size_t)h * D;
                        const float *qblk = q + off, *doblk = dout + off; // (nq,D)
                        // p (nq,nk) = q·k^T, ds (nq,nk) = dout·v^T
                        cpu_gemm_tile(p, ATT_BK, qblk, qstride, 1, kt, ATT_BK, nq, nk, D, 1.0f, 0.0f);
                        cpu_gemm_tile(ds, ATT_BK, doblk, qstride, 1, vt, ATT_BK, nq, nk, D, 1.0f, 0.0f);
                        for (int i = 0; i < nq; i++) {
                            int t = t0 + i;
                            float *prow = p + (size_t)i * ATT_BK, *dsrow = ds + (size_t)i * ATT_BK;
                            att_mask_row(prow, nk, s0, t, scale, seg ? seg + s0 : NULL,
                                         seg ? seg[t] : 0);
                            if (lrow[t] == -INFINITY) { // no visible key at all: p = 0
                                memset(prow, 0, (size_t)nk * sizeof(float));
                            } else {
                                cpu_exp_shifted(prow, prow, lrow[t], nk);
                            }
                            float dt = delta[(size_t)g * T + t];
                            for (int j = 0; j < nk; j++)
                                dsrow[j] = scale * (prow[j] * (dsrow[j] - dt));
                        }
                        // dv (nk,D) += p^T · dout, dk (nk,D) += ds^T · q, dq (nq,D) += ds · k
                        cpu_gemm_tile(dvacc, (size_t)D, p, 1, ATT_BK, doblk, qstride, nk, D, nq, 1.0f, 1.0f);
                        cpu_gemm_tile(dkacc, (size_t)D, ds, 1, ATT_BK, qblk, qstride, nk, D, nq, 1.0f, 1.0f);
                        cpu_gemm_tile(dq + off, qstride, ds, ATT_BK, 1, kblk, kstride, nq, D, nk, 1.0f, 1.0f);
                    }
                }

                for (int j = 0; j < nk; j++) {
                    size_t off = ((size_t)b * T + s0 + j) * kstride + (size_t)kvh * D;
                    memcpy(dk + off, dkacc + (size_t)j * D, (size_t)D * sizeof(float));
                    memcpy(dv + off, dvacc + (size_t)j * D, (size_t)D * sizeof(float));
                }
            }
        }
    }
}
