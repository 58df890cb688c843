/* Top-k QK terms per (head, query, key) pair, selected while they are multiplied (float32).
 *
 * For pair p the terms are K[h,k,a,:] . Q[h,q,b,:] for every key part a and query part b. Both
 * sides' parts are sorted largest-norm first, and blocks of RB key parts x CB query parts are
 * visited in decreasing order of their bound |k_a|.|q_b| over the block's largest parts
 * (Cauchy-Schwarz, with a margin for float32 rounding). The pair is done at the first block whose
 * bound cannot beat its running k-th largest |term|: no later block can. A computed block lives
 * in registers (AVX-512 intrinsics where the compiler targets AVX-512, else GCC vector extensions
 * of the widest vector the target has); one compare per register gives a bit mask of its terms
 * that beat the threshold, and only those are appended to a small buffer which, when full, is
 * cut back to its top k by quickselect, raising the threshold. Terms never go to memory beyond
 * one block. Built and loaded by qk_lens/topk_terms.py.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define VW 16
#elif defined(__AVX__)
#include <immintrin.h>
#define VW 8
#elif defined(__SSE__)
#include <immintrin.h>
#define VW 4
#else
#define VW 4
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));
#define RB 4
#define CB (2 * VW)
/* |computed term| <= |k|.|q| (1 + d.eps) in float32, norms included; 1e-3 covers d up to ~8000 */
#define MARGIN 1.001f

/* The block shape, for the Python side: query parts are padded to a multiple of CB. */
int64_t qk_block_columns(void) { return CB; }
int64_t qk_block_rows(void) { return RB; }

/* The k-th largest of a[0..n) (0 < k <= n), using b[0..n) as scratch; a and b are clobbered.
 * Quickselect with branch-free three-way partitions (the candidates are few and random, so
 * branches on them would mostly mispredict). */
static float kth_largest(float *a, float *b, int64_t n, int64_t k) {
    while (n > 8) {
        float x = a[0], y = a[n / 2], z = a[n - 1];  /* pivot: median of three */
        float p = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t g = 0, l = n;  /* greater ones to b's front, smaller ones to its back */
        for (int64_t i = 0; i < n; i++) {
            float v = a[i];
            b[g] = v;
            b[l - 1] = v;
            g += v > p;
            l -= v < p;
        }
        int64_t e = l - g;  /* equal to the pivot (at least one) */
        if (k <= g) n = g;
        else if (k <= g + e) return p;
        else k -= g + e, b += l, n -= l;
        float *t = a; a = b; b = t;
    }
    for (int64_t i = 1; i < n; i++) {  /* insertion sort, descending */
        float v = a[i];
        int64_t j = i;
        for (; j > 0 && a[j - 1] < v; j--) a[j] = a[j - 1];
        a[j] = v;
    }
    return a[k - 1];
}

/* Keep the k entries of largest |value| among the n > k candidates (ties at the k-th value
 * resolved by order); returns the k-th largest |value|: no later term at or below it can enter.
 * scratch: 2n floats. */
static float compact(float *bv, int64_t *bi, int64_t n, int64_t k, float *scratch, float *tv,
                     int64_t *ti) {
    for (int64_t i = 0; i < n; i++) scratch[i] = fabsf(bv[i]);
    float kth = kth_largest(scratch, scratch + n, n, k);
    int64_t w = 0;
    for (int64_t i = 0; i < n; i++) {  /* branch-free: always write, advance on a keeper */
        tv[w] = bv[i];
        ti[w] = bi[i];
        w += fabsf(bv[i]) > kth;
    }
    for (int64_t i = 0; i < n && w < k; i++)
        if (fabsf(bv[i]) == kth) { tv[w] = bv[i]; ti[w] = bi[i]; w++; }
    memcpy(bv, tv, (size_t)w * sizeof(float));
    memcpy(bi, ti, (size_t)w * sizeof(int64_t));
    return kth;
}

#ifndef __AVX512F__
/* One bit per lane of a comparison result (lane i -> bit i). */
static inline uint64_t lane_bits(vi m) {
#if VW == 8
    return (uint64_t)_mm256_movemask_ps((__m256)m);
#elif VW == 4 && defined(__SSE__)
    return (uint64_t)_mm_movemask_ps((__m128)m);
#else
    int32_t lanes[VW];
    memcpy(lanes, &m, sizeof(vi));
    uint64_t bits = 0;
    for (int i = 0; i < VW; i++) bits |= (uint64_t)(lanes[i] & 1) << i;
    return bits;
#endif
}
#endif

/* The RB x CB block of terms k_r . q[j, 0:CB] (q: d rows of CB, contiguous) into blk, and in
 * masks[r] bit c set where |blk[r][c]| > thr; returns whether any bit is set (checked in
 * registers: a block that cannot enter is not stored). */
static inline int block_terms(const float *restrict k0, const float *restrict k1,
                              const float *restrict k2, const float *restrict k3,
                              const float *restrict qr, int64_t d, float thr,
                              float blk[RB][CB], uint64_t masks[RB]) {
#ifdef __AVX512F__
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
    __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
    __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
    __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
    for (int64_t j = 0; j < d; j++, qr += CB) {
        __m512 q0 = _mm512_loadu_ps(qr), q1 = _mm512_loadu_ps(qr + 16), v;
        v = _mm512_set1_ps(k0[j]);
        c00 = _mm512_fmadd_ps(v, q0, c00); c01 = _mm512_fmadd_ps(v, q1, c01);
        v = _mm512_set1_ps(k1[j]);
        c10 = _mm512_fmadd_ps(v, q0, c10); c11 = _mm512_fmadd_ps(v, q1, c11);
        v = _mm512_set1_ps(k2[j]);
        c20 = _mm512_fmadd_ps(v, q0, c20); c21 = _mm512_fmadd_ps(v, q1, c21);
        v = _mm512_set1_ps(k3[j]);
        c30 = _mm512_fmadd_ps(v, q0, c30); c31 = _mm512_fmadd_ps(v, q1, c31);
    }
    __m512 t = _mm512_set1_ps(thr);
#define GT(c) ((uint64_t)_mm512_cmp_ps_mask(_mm512_abs_ps(c), t, _CMP_GT_OQ))
    masks[0] = GT(c00) | GT(c01) << 16;
    masks[1] = GT(c10) | GT(c11) << 16;
    masks[2] = GT(c20) | GT(c21) << 16;
    masks[3] = GT(c30) | GT(c31) << 16;
#undef GT
    if (!(masks[0] | masks[1] | masks[2] | masks[3])) return 0;
    _mm512_store_ps(blk[0], c00); _mm512_store_ps(blk[0] + 16, c01);
    _mm512_store_ps(blk[1], c10); _mm512_store_ps(blk[1] + 16, c11);
    _mm512_store_ps(blk[2], c20); _mm512_store_ps(blk[2] + 16, c21);
    _mm512_store_ps(blk[3], c30); _mm512_store_ps(blk[3] + 16, c31);
    return 1;
#else  /* GCC vector extensions: 8 accumulators + 2 query vectors + 1 broadcast fit 16 registers */
    vf c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0};
    vf c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
    for (int64_t j = 0; j < d; j++, qr += CB) {
        vf q0, q1;
        memcpy(&q0, qr, sizeof(vf));
        memcpy(&q1, qr + VW, sizeof(vf));
#ifdef __x86_64__
        /* keep q0, q1 in registers: folded into every FMA they would be loaded 4 times each */
        __asm__("" : "+x"(q0), "+x"(q1));
#endif
        c00 += k0[j] * q0; c01 += k0[j] * q1;
        c10 += k1[j] * q0; c11 += k1[j] * q1;
        c20 += k2[j] * q0; c21 += k2[j] * q1;
        c30 += k3[j] * q0; c31 += k3[j] * q1;
    }
    vf t = thr - (vf){0};
#define GT(c) lane_bits(((c) > t) | ((c) < -t))
    masks[0] = GT(c00) | GT(c01) << VW;
    masks[1] = GT(c10) | GT(c11) << VW;
    masks[2] = GT(c20) | GT(c21) << VW;
    masks[3] = GT(c30) | GT(c31) << VW;
#undef GT
    if (!(masks[0] | masks[1] | masks[2] | masks[3])) return 0;
    memcpy(blk[0], &c00, sizeof(vf)); memcpy(blk[0] + VW, &c01, sizeof(vf));
    memcpy(blk[1], &c10, sizeof(vf)); memcpy(blk[1] + VW, &c11, sizeof(vf));
    memcpy(blk[2], &c20, sizeof(vf)); memcpy(blk[2] + VW, &c21, sizeof(vf));
    memcpy(blk[3], &c30, sizeof(vf)); memcpy(blk[3] + VW, &c31, sizeof(vf));
    return 1;
#endif
}

/* Qt: [H, Tq, Pqp / CB, d, CB] query parts transposed in blocks of CB columns (each block's
 *     d x CB terms contiguous), each (h, q)'s columns in decreasing norm, padding columns zero;
 *     q_norm: [H, Tq, Pqp] their norms (padding 0);
 *     q_col: [H, Tq, Pqp] each column's original query part.
 * K:  [H, Tk, Pk, d] key parts; zero: d zeros (stands in for the rows past Pk).
 * row_order: [H, Tk, Pk] the key parts of each (head, key) by decreasing norm; k_norm: [H, Tk, Pk]
 *     the norms in that order.
 * Pairs [p0, p1) of hh/qq/kk; pair p's top_k terms go to row out_row[p] of out_vals/out_idx
 * ([n_pairs, top_k]), by |value| descending (ties by flat index).
 * Flat index of a term: a * Pq + b (unpadded). Returns the number of pairs done, -1 when out of
 * memory; *computed counts the blocks multiplied. */
int64_t qk_top_terms_f32(const float *Qt, const float *q_norm, const int64_t *q_col,
                         const float *K, const float *zero, const int64_t *row_order,
                         const float *k_norm, const int64_t *hh, const int64_t *qq,
                         const int64_t *kk, int64_t p0, int64_t p1, int64_t Tq, int64_t Tk,
                         int64_t Pk, int64_t Pq, int64_t Pqp, int64_t d, int64_t top_k,
                         const int64_t *out_row, float *out_vals, int64_t *out_idx,
                         int64_t *computed) {
    float blk[RB][CB] __attribute__((aligned(64)));
    uint64_t masks[RB];
    int64_t full = top_k + top_k / 2;        /* cut the buffer back once it holds more */
    int64_t cap = full + RB * CB;            /* room for one more block after it fills */
    float *bv = malloc((size_t)cap * 4 * sizeof(float));
    int64_t *bi = malloc((size_t)cap * 2 * sizeof(int64_t));
    if (!bv || !bi) { free(bv); free(bi); return -1; }
    int64_t n_cb = Pqp / CB;
    int64_t *next_row = malloc((size_t)n_cb * sizeof(int64_t));
    if (!next_row) { free(bv); free(bi); return -1; }
    float *tv = bv + cap, *scratch = bv + 2 * cap;  /* scratch: 2 cap */
    int64_t *ti = bi + cap;
    int64_t blocks = 0;
    for (int64_t p = p0; p < p1; p++) {
        int64_t hq = hh[p] * Tq + qq[p], hk = hh[p] * Tk + kk[p];
        const float *Q = Qt + hq * d * Pqp;
        const float *qn = q_norm + hq * Pqp;
        const int64_t *qc = q_col + hq * Pqp;
        const float *Kp = K + hk * Pk * d;
        const int64_t *ro = row_order + hk * Pk;
        const float *kn = k_norm + hk * Pk;
        int64_t n = 0;
        float thr = -1.0f;  /* terms with |value| > thr may be in the top k */
        /* Blocks in decreasing order of their bound: a merge of the column blocks' runs of
         * rows (each run's bounds fall with the row); stop at the first bound thr excludes. */
        for (int64_t j = 0; j < n_cb; j++) next_row[j] = 0;
        for (;;) {
            float best = -1.0f;
            int64_t bj = -1;
            for (int64_t j = 0; j < n_cb; j++) {
                if (next_row[j] >= Pk) continue;
                float b = kn[next_row[j]] * qn[j * CB];
                if (b > best) best = b, bj = j;
            }
            if (bj < 0 || best * MARGIN <= thr) break;
            int64_t a0 = next_row[bj], b0 = bj * CB;
            next_row[bj] += RB;
            const float *k0 = Kp + ro[a0] * d;
            const float *k1 = a0 + 1 < Pk ? Kp + ro[a0 + 1] * d : zero;
            const float *k2 = a0 + 2 < Pk ? Kp + ro[a0 + 2] * d : zero;
            const float *k3 = a0 + 3 < Pk ? Kp + ro[a0 + 3] * d : zero;
            blocks++;
            if (!block_terms(k0, k1, k2, k3, Q + b0 * d, d, thr, blk, masks)) continue;
            int64_t rows = Pk - a0 < RB ? Pk - a0 : RB;
            int64_t cols = Pq - b0 < CB ? Pq - b0 : CB;
            uint64_t real = (1ull << cols) - 1;  /* not padding columns (cols <= CB <= 32) */
            for (int64_t r = 0; r < rows; r++) {
                int64_t base = ro[a0 + r] * Pq;
                for (uint64_t m = masks[r] & real; m; m &= m - 1) {  /* each term above thr */
                    int c = __builtin_ctzll(m);
                    bv[n] = blk[r][c];
                    bi[n] = base + qc[b0 + c];
                    n++;
                }
            }
            if (n > full)
                thr = compact(bv, bi, n, top_k, scratch, tv, ti), n = top_k;
        }
        if (n > top_k) compact(bv, bi, n, top_k, scratch, tv, ti), n = top_k;
        for (int64_t i = 1; i < n; i++) {  /* by |value| descending, ties by flat index */
            float v = bv[i], av = fabsf(v);
            int64_t x = bi[i], j = i;
            for (; j > 0 && (fabsf(bv[j - 1]) < av || (fabsf(bv[j - 1]) == av && bi[j - 1] > x));
                 j--)
                bv[j] = bv[j - 1], bi[j] = bi[j - 1];
            bv[j] = v, bi[j] = x;
        }
        float *ov = out_vals + out_row[p] * top_k;
        int64_t *oi = out_idx + out_row[p] * top_k;
        for (int64_t i = 0; i < top_k; i++) {
            ov[i] = i < n ? bv[i] : 0.0f;
            oi[i] = i < n ? bi[i] : -1;
        }
    }
    free(bv);
    free(bi);
    free(next_row);
    *computed = blocks;
    return p1 - p0;
}
