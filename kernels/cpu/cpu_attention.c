/* cpu_attention.c — causal grouped-query attention on the CPU, FlashAttention style.
 *
 * Nothing of size (T,T) is stored. Queries and keys are cut into blocks of 64;
 * the products of blocks go through one small register-tiled matrix kernel
 * (cpu_gemm_tile, cpu_matmul_small.c) and the softmax through a vectorisable exp
 * (cpu_exp_shifted).
 *
 * Forward: one task per (b, h, block of queries), walking the key blocks with an
 * online softmax; each task writes only its own rows of out and lse.
 * Backward: one task per (b, query head), which owns that head's dq and writes its
 * share of dk and dv: the group's first head into dk and dv, the others into scratch
 * that is added to them in head order after every task is done. So no two threads
 * write the same memory, every sum runs in a fixed order (the results do not depend
 * on the thread count), and one row of a grouped-query model still makes H tasks.
 *
 * In both, a block's queries go in chunks of ATT_QC rows, and a chunk multiplies only
 * the keys its rows may see: none after its last row (causal), none before the first
 * position of its rows' segments (packed examples) except the span of the row's shared
 * prompt prefix (MT_SHARED_SEGMENT), which every later query sees. The mask is still
 * applied to every product computed, so the clipping drops only products the mask
 * would zero; it is rounded outward to whole columns of the register tile (16 keys).
 *
 * Scratch comes from the caller's work buffer (cpu_attention_work_bytes): one slot
 * per thread, then the backward's dk and dv of the heads past each group's first (a
 * size that grows with B x T); the kernels never allocate. */
#include "cpu_kernels.h"
#include "moontune/plugin.h" /* MT_SHARED_SEGMENT */

#include <math.h>
#include <omp.h>
#include <string.h>

#define ATT_BQ 64 /* queries per block */
#define ATT_BK 64 /* keys per block */
/* Queries per chunk, which share one clipped key range: whole register tiles of 6 rows
 * (AVX2) or 8. */
#define ATT_QC 24
#define ATT_KC 16 /* clipped key ranges start and end on these (the tile's columns) */
/* Segment ids a row may hold before att_first_keys stops clipping at segments. */
#define ATT_MAX_SEGMENTS 64
/* Below about this many multiply-adds (B*H*T*T*D) a call runs on the calling thread. */
#define ATT_PAR_MIN ((size_t)1 << 20)

/* ---- scratch ------------------------------------------------------------- */

/* Floats of scratch one thread needs, rounded up to whole 64-byte lines. */
static size_t att_slot_floats(int T, int D) {
    size_t d = (size_t)D;
    // forward: kt (D,BK), s (BQ,BK), o (BQ,D), m, l (BQ), first (T, int32)
    size_t fwd = d * ATT_BK + (size_t)ATT_BQ * ATT_BK + (size_t)ATT_BQ * d + 2 * (size_t)ATT_BQ +
                 (size_t)T;
    // backward: kt, vt (D,BK), p, ds (BQ,BK), dk, dv (BK,D), delta (T), first (T, int32)
    size_t bwd = 2 * d * ATT_BK + 2 * (size_t)ATT_BQ * ATT_BK + 2 * (size_t)ATT_BK * d +
                 2 * (size_t)T;
    size_t n = fwd > bwd ? fwd : bwd;
    return (n + 15) / 16 * 16;
}

static int att_threads(int num_threads) {
    return num_threads > 0 ? num_threads : omp_get_max_threads();
}

size_t cpu_attention_work_bytes(int B, int T, int H, int KVH, int D, int num_threads) {
    if (B <= 0 || T <= 0 || H <= 0 || KVH <= 0 || D <= 0) return 0;
    /* the slots, then backward's dk and dv of the query heads past each group's first */
    const size_t part = 2 * (size_t)B * (size_t)(H - KVH) * (size_t)T * (size_t)D;
    return ((size_t)att_threads(num_threads) * att_slot_floats(T, D) + part) *
           sizeof(float);
}

/* ---- building blocks ----------------------------------------------------- */

/* Scales the nk scores of query t (srow) and sets the keys t may not see to -INFINITY:
 * key s0 + j is visible iff s0 + j <= t and, with segments, segk[j] is seg_t or the
 * shared prefix's. */
static void att_mask_row(float *srow, int nk, int s0, int t, float scale, const int32_t *segk,
                         int32_t seg_t) {
    int nvis = t - s0 + 1; // keys j < nvis are causally visible
    if (segk) {
        for (int j = 0; j < nk; j++)
            srow[j] = (j < nvis && (segk[j] == seg_t || segk[j] == MT_SHARED_SEGMENT))
                          ? srow[j] * scale
                          : -INFINITY;
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
    for (int s = s0; s < send; s++) {
        if (seg[s] == MT_SHARED_SEGMENT) return 1; // every query after it sees it
        for (int i = 0; i < nids; i++)
            if (seg[s] == ids[i]) return 1;
    }
    return 0;
}

/* first[t] for t in [0,T): the first position of the row whose segment is t's, before
 * which t sees no key of its own segment. Without segments, or with more than
 * ATT_MAX_SEGMENTS ids in the row, 0 for every t (no clipping; the mask decides). An id
 * may come back after other ids, so this is its first occurrence, not the start of t's
 * run. shared[0..1]: the keys from the row's first to its last MT_SHARED_SEGMENT token,
 * which every query after them may see as well ([0, 0) when there are none). */
static void att_first_keys(int32_t *first, int shared[2], const int32_t *seg, int T) {
    int32_t ids[ATT_MAX_SEGMENTS], at[ATT_MAX_SEGMENTS];
    int nids = 0, last = -1; /* last: the index in ids of seg[t - 1] */
    shared[0] = shared[1] = 0;
    if (!seg) {
        memset(first, 0, (size_t)T * sizeof *first);
        return;
    }
    for (int t = T - 1; t >= 0 && !shared[1]; t--)
        if (seg[t] == MT_SHARED_SEGMENT) shared[1] = t + 1;
    for (int t = 0; t < shared[1]; t++)
        if (seg[t] == MT_SHARED_SEGMENT) {
            shared[0] = t;
            break;
        }
    for (int t = 0; t < T; t++) {
        if (last < 0 || ids[last] != seg[t]) {
            last = -1;
            for (int i = 0; i < nids && last < 0; i++)
                if (ids[i] == seg[t]) last = i;
            if (last < 0) {
                if (nids == ATT_MAX_SEGMENTS) { /* too many to track: clip nothing */
                    memset(first, 0, (size_t)T * sizeof *first);
                    return;
                }
                ids[nids] = seg[t], at[nids] = t;
                last = nids++;
            }
        }
        first[t] = at[last];
    }
}

/* The keys of block [s0,s1) that queries [c0,c1) may see, as [*lo,*hi) rounded outward
 * to ATT_KC columns from s0 (and at most s1); 0 when there are none. first and shared
 * hold the row's att_first_keys: the range covers the chunk's own segments and the
 * shared prefix's keys in this block, and what lies between them. */
static int att_chunk_keys(const int32_t *first, const int shared[2], int c0, int c1, int s0,
                          int s1, int *lo, int *hi) {
    int from = c0;
    for (int t = c0; t < c1; t++)
        if (first[t] < from) from = first[t];
    const int end = c1 < s1 ? c1 : s1; /* keys after c1 - 1: causal */
    int a = from > s0 ? from : s0, b = end;
    const int sa = shared[0] > s0 ? shared[0] : s0, sb = shared[1] < end ? shared[1] : end;
    if (sa < sb) { /* the shared prefix's keys in this block */
        if (a >= b) a = sa, b = sb;
        else if (sa < a) a = sa; /* b is already the causal end, at or past sb */
    }
    if (a >= b) return 0;
    a = s0 + (a - s0) / ATT_KC * ATT_KC;
    b = s0 + (b - s0 + ATT_KC - 1) / ATT_KC * ATT_KC;
    *lo = a, *hi = b < s1 ? b : s1;
    return 1;
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
    size_t slot = att_slot_floats(T, D);
    size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D;

#pragma omp parallel num_threads(nt) if (par)
    {
        float *kt = (float *)work + (size_t)omp_get_thread_num() * slot; // (D,BK)
        float *s = kt + (size_t)D * ATT_BK;                              // (BQ,BK)
        float *o = s + (size_t)ATT_BQ * ATT_BK;                          // (BQ,D)
        float *m = o + (size_t)ATT_BQ * D;                               // (BQ)
        float *l = m + ATT_BQ;                                           // (BQ)
        int32_t *first = (int32_t *)(l + ATT_BQ);                        // (T)
        int shared[2];

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
            att_first_keys(first, shared, seg, T);

            for (int i = 0; i < nq; i++) m[i] = -INFINITY, l[i] = 0.0f;
            memset(o, 0, (size_t)nq * D * sizeof(float));

            for (int s0 = 0; s0 < t1; s0 += ATT_BK) {
                int s1 = s0 + ATT_BK < t1 ? s0 + ATT_BK : t1, nk = s1 - s0;
                if (!att_block_visible(seg, t0, t1, s0, s1)) continue;
                att_transpose(kt, kbase + (size_t)s0 * kstride, kstride, nk, D);
                for (int c0 = t0; c0 < t1; c0 += ATT_QC) {
                    const int c1 = c0 + ATT_QC < t1 ? c0 + ATT_QC : t1, nc = c1 - c0;
                    int lo, hi;
                    if (!att_chunk_keys(first, shared, c0, c1, s0, s1, &lo, &hi)) continue;
                    const int nkc = hi - lo;
                    float *sc = s + (size_t)(c0 - t0) * ATT_BK; // (nc,nkc)
                    // sc = the chunk's queries · keys [lo,hi)^T
                    cpu_gemm_tile(sc, ATT_BK, qblk + (size_t)(c0 - t0) * qstride, qstride, 1,
                                  kt + (lo - s0), ATT_BK, nc, nkc, D, 1.0f, 0.0f);
                    // online softmax: p = exp(s - new max); o and l rescaled to the new max
                    for (int t = c0; t < c1; t++) {
                        const int i = t - t0;
                        float *srow = s + (size_t)i * ATT_BK;
                        att_mask_row(srow, nkc, lo, t, scale, seg ? seg + lo : NULL,
                                     seg ? seg[t] : 0);
                        float mx = cpu_max(srow, nkc);
                        if (mx == -INFINITY) { // nothing visible to this row here: p = 0
                            memset(srow, 0, (size_t)nkc * sizeof(float));
                            continue;
                        }
                        float mnew = m[i] > mx ? m[i] : mx;
                        float alpha = m[i] == -INFINITY ? 0.0f : expf(m[i] - mnew);
                        l[i] = l[i] * alpha + cpu_exp_shifted(srow, srow, mnew, nkc);
                        m[i] = mnew;
                        float *orow = o + (size_t)i * D;
                        for (int d = 0; d < D; d++) orow[d] *= alpha;
                    }
                    // o (nc,D) += p (nc,nkc) · v [lo,hi) (nkc,D)
                    cpu_gemm_tile(o + (size_t)(c0 - t0) * D, (size_t)D, sc, ATT_BK, 1,
                                  vbase + (size_t)lo * kstride, kstride, nc, D, nkc, 1.0f, 1.0f);
                }
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

/* Query head g >= 1 of key/value head kvh, row b: its dk (T,D) in the backward's scratch
 * (B,KVH,G-1,2,T,D), its dv `head` floats after. */
static float *att_head_part(float *part, int b, int kvh, int g, int KVH, int G, size_t head) {
    return part + ((((size_t)b * KVH + kvh) * (size_t)(G - 1) + (size_t)(g - 1)) * 2) * head;
}

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
    int ntasks = B * H;
    int nt = att_threads(num_threads);
    int par = (size_t)B * H * T * T * D >= ATT_PAR_MIN;
    size_t slot = att_slot_floats(T, D);
    size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D, head = (size_t)T * D;
    // dk, dv (T,D) of each group's query heads 1..G-1, (B,KVH,G-1,2,T,D): head 0 writes
    // the group's own, and the others are added to it in order once every task is done
    float *part = (float *)work + (size_t)nt * slot;

#pragma omp parallel num_threads(nt) if (par)
    {
        float *kt = (float *)work + (size_t)omp_get_thread_num() * slot; // (D,BK)
        float *vt = kt + (size_t)D * ATT_BK;                             // (D,BK)
        float *p = vt + (size_t)D * ATT_BK;                              // (BQ,BK)
        float *ds = p + (size_t)ATT_BQ * ATT_BK;                         // (BQ,BK)
        float *dkacc = ds + (size_t)ATT_BQ * ATT_BK;                     // (BK,D)
        float *dvacc = dkacc + (size_t)ATT_BK * D;                       // (BK,D)
        float *delta = dvacc + (size_t)ATT_BK * D;                       // (T)
        int32_t *first = (int32_t *)(delta + (size_t)T);                 // (T)
        int shared[2];

#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < ntasks; task++) {
            const int b = task / H, h = task % H, kvh = h / G, g = h % G;
            const int32_t *seg = segments ? segments + (size_t)b * T : NULL;
            const float *kbase = k + (size_t)b * T * kstride + (size_t)kvh * D; // (T,D)
            const float *vbase = v + (size_t)b * T * kstride + (size_t)kvh * D; // (T,D)
            const float *lrow = lse + ((size_t)b * H + h) * T;
            // where this head's share of dk and dv goes: the group's own, or scratch
            float *dk_to, *dv_to;
            size_t to_stride;
            if (g == 0) {
                const size_t own = (size_t)b * T * kstride + (size_t)kvh * D;
                dk_to = dk + own, dv_to = dv + own, to_stride = kstride;
            } else {
                dk_to = att_head_part(part, b, kvh, g, KVH, G, head);
                dv_to = dk_to + head, to_stride = (size_t)D;
            }
            att_first_keys(first, shared, seg, T);

            // delta (T) = rowsum(dout * out) of this head; its dq = 0
            for (int t = 0; t < T; t++) {
                size_t off = ((size_t)b * T + t) * qstride + (size_t)h * D;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int d = 0; d < D; d++) acc += dout[off + d] * out[off + d];
                delta[t] = acc;
                memset(dq + off, 0, (size_t)D * sizeof(float));
            }

            for (int kb = 0; kb < nkb; kb++) {
                int s0 = kb * ATT_BK, s1 = s0 + ATT_BK < T ? s0 + ATT_BK : T, nk = s1 - s0;
                const float *kblk = kbase + (size_t)s0 * kstride; // (nk,D)
                const float *vblk = vbase + (size_t)s0 * kstride; // (nk,D)
                att_transpose(kt, kblk, kstride, nk, D);
                att_transpose(vt, vblk, kstride, nk, D);
                memset(dkacc, 0, (size_t)nk * D * sizeof(float));
                memset(dvacc, 0, (size_t)nk * D * sizeof(float));

                // queries before s0 see none of these keys
                for (int t0 = s0 / ATT_BQ * ATT_BQ; t0 < T; t0 += ATT_BQ) {
                    int t1 = t0 + ATT_BQ < T ? t0 + ATT_BQ : T;
                    if (!att_block_visible(seg, t0, t1, s0, s1)) continue;
                    for (int c0 = t0; c0 < t1; c0 += ATT_QC) {
                        const int c1 = c0 + ATT_QC < t1 ? c0 + ATT_QC : t1, nc = c1 - c0;
                        int lo, hi;
                        if (!att_chunk_keys(first, shared, c0, c1, s0, s1, &lo, &hi)) continue;
                        const int j0 = lo - s0, nkc = hi - lo;
                        size_t off = ((size_t)b * T + c0) * qstride + (size_t)h * D;
                        const float *qc = q + off, *doc = dout + off; // (nc,D)
                        // p (nc,nkc) = q·k^T, ds (nc,nkc) = dout·v^T over keys [lo,hi)
                        cpu_gemm_tile(p, ATT_BK, qc, qstride, 1, kt + j0, ATT_BK, nc, nkc, D, 1.0f,
                                      0.0f);
                        cpu_gemm_tile(ds, ATT_BK, doc, qstride, 1, vt + j0, ATT_BK, nc, nkc, D, 1.0f,
                                      0.0f);
                        for (int i = 0; i < nc; i++) {
                            int t = c0 + i;
                            float *prow = p + (size_t)i * ATT_BK, *dsrow = ds + (size_t)i * ATT_BK;
                            att_mask_row(prow, nkc, lo, t, scale, seg ? seg + lo : NULL,
                                         seg ? seg[t] : 0);
                            if (lrow[t] == -INFINITY) { // no visible key at all: p = 0
                                memset(prow, 0, (size_t)nkc * sizeof(float));
                            } else {
                                cpu_exp_shifted(prow, prow, lrow[t], nkc);
                            }
                            float dt = delta[t];
                            for (int j = 0; j < nkc; j++) dsrow[j] = scale * (prow[j] * (dsrow[j] - dt));
                        }
                        // dv [lo,hi) += p^T · dout, dk [lo,hi) += ds^T · q, dq (nc,D) += ds · k
                        cpu_gemm_tile(dvacc + (size_t)j0 * D, (size_t)D, p, 1, ATT_BK, doc, qstride,
                                      nkc, D, nc, 1.0f, 1.0f);
                        cpu_gemm_tile(dkacc + (size_t)j0 * D, (size_t)D, ds, 1, ATT_BK, qc, qstride,
                                      nkc, D, nc, 1.0f, 1.0f);
                        cpu_gemm_tile(dq + off, qstride, ds, ATT_BK, 1, kblk + (size_t)j0 * kstride,
                                      kstride, nc, D, nkc, 1.0f, 1.0f);
                    }
                }

                for (int j = 0; j < nk; j++) {
                    memcpy(dk_to + (size_t)(s0 + j) * to_stride, dkacc + (size_t)j * D,
                           (size_t)D * sizeof(float));
                    memcpy(dv_to + (size_t)(s0 + j) * to_stride, dvacc + (size_t)j * D,
                           (size_t)D * sizeof(float));
                }
            }
        }

        // every group's dk, dv: head 0's, then heads 1..G-1 added in order (the implicit
        // barrier above has every head's written)
        if (G > 1) {
#pragma omp for schedule(static)
            for (int bt = 0; bt < B * T; bt++) {
                const int b = bt / T, t = bt % T;
                for (int kvh = 0; kvh < KVH; kvh++) {
                    float *dkrow = dk + (size_t)bt * kstride + (size_t)kvh * D;
                    float *dvrow = dv + (size_t)bt * kstride + (size_t)kvh * D;
                    for (int g = 1; g < G; g++) {
                        const float *pk = att_head_part(part, b, kvh, g, KVH, G, head) + (size_t)t * D;
                        const float *pv = pk + head;
                        for (int d = 0; d < D; d++) dkrow[d] += pk[d];
                        for (int d = 0; d < D; d++) dvrow[d] += pv[d];
                    }
                }
            }
        }
    }
}
