/* Top-k QK terms per (head, query, key) pair, selected while they are multiplied (float32).
 *
 * For pair p the terms are K[h,k,a,:] . Q[h,q,b,:] for every key part a and query part b. A
 * 4-row x 32-column block of terms is accumulated in registers (AVX-512 intrinsics where the
 * compiler targets AVX-512, else GCC vector extensions lowered to AVX2/SSE), then checked against
 * the pair's running k-th
 * largest |term| with one vector compare; the few terms above it are appended to a small buffer
 * which, when full, is cut back to its top k by quickselect (raising the threshold).
 * Key parts are visited largest-norm first (row_order), so the threshold rises early and
 * later blocks are mostly rejected by the vector compare. Terms never go to memory beyond one
 * block. Built and loaded by qk_lens/topk_terms.py.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));
#define RB 4
#define CB 32

/* The k-th largest of a[0..n) (0 < k <= n); reorders a. Quickselect, Hoare partition. */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1;
    while (lo < hi) {
        float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) { float t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[want];
}

/* Keep the k entries of largest |value| among the n > k candidates (ties at the k-th value
 * resolved by order); returns the k-th largest |value|: no later term at or below it can enter. */
static float compact(float *bv, int64_t *bi, int64_t n, int64_t k, float *scratch, float *tv,
                     int64_t *ti) {
    for (int64_t i = 0; i < n; i++) scratch[i] = fabsf(bv[i]);
    float kth = kth_largest(scratch, n, k);
    int64_t w = 0;
    for (int64_t i = 0; i < n; i++)
        if (fabsf(bv[i]) > kth) { tv[w] = bv[i]; ti[w] = bi[i]; w++; }
    for (int64_t i = 0; i < n && w < k; i++)
        if (fabsf(bv[i]) == kth) { tv[w] = bv[i]; ti[w] = bi[i]; w++; }
    memcpy(bv, tv, (size_t)w * sizeof(float));
    memcpy(bi, ti, (size_t)w * sizeof(int64_t));
    return kth;
}

/* Qt: [H, Tq, d, Pqp] query parts transposed, Pqp a multiple of CB, padding columns zero.
 * K:  [H, Tk, Pk, d] key parts; zero: d zeros (stands in for the rows past Pk).
 * row_order: [H, Tk, Pk] the key parts of each (head, key) by decreasing norm.
 * Pairs [p0, p1) of hh/qq/kk; out_vals/out_idx: [n_pairs, top_k] (unsorted within a pair).
 * Flat index of a term: a * Pq + b (unpadded). Returns the number of pairs done, -1 when out of
 * memory. */
int64_t qk_top_terms_f32(const float *Qt, const float *K, const float *zero,
                         const int64_t *row_order, const int64_t *hh,
                         const int64_t *qq, const int64_t *kk, int64_t p0, int64_t p1,
                         int64_t Tq, int64_t Tk, int64_t Pk, int64_t Pq, int64_t Pqp, int64_t d,
                         int64_t top_k, float *out_vals, int64_t *out_idx) {
    float blk[RB][CB] __attribute__((aligned(64)));
    int64_t cap = 4 * top_k + RB * CB + 1;  /* one more block after it fills, + 1 spare write */
    float *bv = malloc((size_t)cap * 3 * sizeof(float));
    int64_t *bi = malloc((size_t)cap * 2 * sizeof(int64_t));
    if (!bv || !bi) { free(bv); free(bi); return -1; }
    float *scratch = bv + cap, *tv = bv + 2 * cap;
    int64_t *ti = bi + cap;
    for (int64_t p = p0; p < p1; p++) {
        const float *Q = Qt + (hh[p] * Tq + qq[p]) * d * Pqp;
        const float *Kp = K + (hh[p] * Tk + kk[p]) * Pk * d;
        const int64_t *ro = row_order + (hh[p] * Tk + kk[p]) * Pk;
        int64_t n = 0;
        float thr = -1.0f;  /* terms with |value| > thr may be in the top k */
        for (int64_t a0 = 0; a0 < Pk; a0 += RB) {
            const float *k0 = Kp + ro[a0] * d;
            const float *k1 = a0 + 1 < Pk ? Kp + ro[a0 + 1] * d : zero;
            const float *k2 = a0 + 2 < Pk ? Kp + ro[a0 + 2] * d : zero;
            const float *k3 = a0 + 3 < Pk ? Kp + ro[a0 + 3] * d : zero;
            for (int64_t b0 = 0; b0 < Pqp; b0 += CB) {
                const float *qr = Q + b0;
#ifdef __AVX512F__
                __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
                __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
                __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
                __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
                for (int64_t j = 0; j < d; j++, qr += Pqp) {
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
                _mm512_store_ps(blk[0], c00); _mm512_store_ps(blk[0] + 16, c01);
                _mm512_store_ps(blk[1], c10); _mm512_store_ps(blk[1] + 16, c11);
                _mm512_store_ps(blk[2], c20); _mm512_store_ps(blk[2] + 16, c21);
                _mm512_store_ps(blk[3], c30); _mm512_store_ps(blk[3] + 16, c31);
#else  /* portable: GCC vector extensions, lowered to whatever the CPU has */
                v16 c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0};
                v16 c20 = {0}, c21 = {0}, c30 = {0}, c31 = {0};
                for (int64_t j = 0; j < d; j++, qr += Pqp) {
                    v16 q0, q1;
                    memcpy(&q0, qr, 64);
                    memcpy(&q1, qr + 16, 64);
                    c00 += k0[j] * q0; c01 += k0[j] * q1;
                    c10 += k1[j] * q0; c11 += k1[j] * q1;
                    c20 += k2[j] * q0; c21 += k2[j] * q1;
                    c30 += k3[j] * q0; c31 += k3[j] * q1;
                }
                memcpy(blk[0], &c00, 64); memcpy(blk[0] + 16, &c01, 64);
                memcpy(blk[1], &c10, 64); memcpy(blk[1] + 16, &c11, 64);
                memcpy(blk[2], &c20, 64); memcpy(blk[2] + 16, &c21, 64);
                memcpy(blk[3], &c30, 64); memcpy(blk[3] + 16, &c31, 64);
#endif
                int64_t rows = Pk - a0 < RB ? Pk - a0 : RB;
                int64_t cols = Pq - b0 < CB ? Pq - b0 : CB;
                for (int64_t r = 0; r < rows; r++) {
                    int hits = 0;
                    for (int c = 0; c < CB; c++) hits |= fabsf(blk[r][c]) > thr;
                    if (!hits) continue;
                    int64_t base = ro[a0 + r] * Pq + b0;
                    for (int64_t c = 0; c < cols; c++) {  /* branch-free: always write, */
                        bv[n] = blk[r][c];                  /* advance only on a keeper   */
                        bi[n] = base + c;
                        n += fabsf(blk[r][c]) > thr;
                    }
                }
                if (n > 4 * top_k) thr = compact(bv, bi, n, top_k, scratch, tv, ti), n = top_k;
            }
        }
        if (n > top_k) compact(bv, bi, n, top_k, scratch, tv, ti), n = top_k;
        for (int64_t i = 0; i < top_k; i++) {
            out_vals[p * top_k + i] = i < n ? bv[i] : 0.0f;
            out_idx[p * top_k + i] = i < n ? bi[i] : -1;
        }
    }
    free(bv);
    free(bi);
    return p1 - p0;
}
