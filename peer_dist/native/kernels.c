/* CPU kernels of peer_dist that torch has no fast path for; loaded through ctypes by __init__.py.
 *
 * Plain C99 on raw pointers (no torch headers), so it compiles in well under a second with any
 * C compiler and needs no build step at install time. Every function works on a range of rows
 * [row_begin, row_end) so the caller can split the rows over threads; rows are independent, so
 * the result does not depend on the split.
 */
#include <stdint.h>
#include <stdlib.h>

/* a ranks before b: the larger value first, NaN above every number (the order of torch.topk). */
static inline int ranks_before(float a, float b) {
    return a > b || (a != a && b == b);
}

/* Insert (a, j) into the descending list v/id holding n entries (capacity k; the last drops when
 * full). Equal values keep their column order (the earlier column first). */
static inline void insert_sorted(float a, int64_t j, float *v, int64_t *id, int64_t n, int64_t k) {
    int64_t pos = n < k ? n : k - 1;
    while (pos > 0 && ranks_before(a, v[pos - 1])) {
        v[pos] = v[pos - 1];
        id[pos] = id[pos - 1];
        --pos;
    }
    v[pos] = a;
    id[pos] = j;
}

/* Exact for any row (NaN, ties): one pass keeping the k best in a sorted list. */
static void row_topk_insertion(const float *p, int64_t cols, int64_t k, float *v, int64_t *id) {
    int64_t j = 0;
    for (; j < k; ++j) insert_sorted(p[j], j, v, id, j, k);
    for (; j < cols; ++j)
        if (ranks_before(p[j], v[k - 1])) insert_sorted(p[j], j, v, id, k, k);
}

#define MAX_LANES 64

/* Rows without NaN, 2k <= cols, k <= MAX_LANES. Three branch-free passes:
 *  1. lane maxima: column j belongs to lane j mod k; every lane holds a value >= the smallest lane
 *     maximum thr, so at least k values are >= thr and the top k are among them;
 *  2. copy the values >= thr (about 47 of 256 for k = 16) with their columns into bv / bi, and
 *     narrow the candidates the same way (lanes over the candidates) while that removes some
 *     (to about 27);
 *  3. rank each candidate by counting the candidates that rank before it (larger, or equal and
 *     earlier); ranks 0..k-1 are the output positions.
 * Pass 3 is quadratic in the candidates: with many ties at thr the insertion path takes over. */
static void row_topk_threshold(const float *p, int64_t cols, int64_t k, float *v, int64_t *id, float *bv,
                               int64_t *bi) {
    float m[MAX_LANES];
    int nan = 0;
    for (int64_t b = 0; b < k; ++b) {
        m[b] = p[b];
        nan |= p[b] != p[b];
    }
    int64_t j = k;
    for (; j + k <= cols; j += k)
        for (int64_t b = 0; b < k; ++b) {
            float a = p[j + b];
            m[b] = a > m[b] ? a : m[b];
            nan |= a != a;
        }
    for (; j < cols; ++j) nan |= p[j] != p[j];
    if (nan) {
        row_topk_insertion(p, cols, k, v, id);
        return;
    }
    float thr = m[0];
    for (int64_t b = 1; b < k; ++b) thr = m[b] < thr ? m[b] : thr;
    int64_t n = 0;
    for (j = 0; j < cols; ++j) {
        float a = p[j];
        bv[n] = a;
        bi[n] = j;
        n += a >= thr;
    }
    while (n >= 2 * k) {
        for (int64_t b = 0; b < k; ++b) m[b] = bv[b];
        for (j = k; j + k <= n; j += k)
            for (int64_t b = 0; b < k; ++b) m[b] = bv[j + b] > m[b] ? bv[j + b] : m[b];
        float thr2 = m[0];
        for (int64_t b = 1; b < k; ++b) thr2 = m[b] < thr2 ? m[b] : thr2;
        int64_t kept = 0;
        for (j = 0; j < n; ++j) {
            float a = bv[j];
            int64_t col = bi[j];
            bv[kept] = a;
            bi[kept] = col;
            kept += a >= thr2;
        }
        if (kept == n) break;
        n = kept;
    }
    if (n > 4 * k + 64) {
        int64_t held = 0;
        for (int64_t i = 0; i < n; ++i) {
            if (held < k) insert_sorted(bv[i], bi[i], v, id, held++, k);
            else if (bv[i] > v[k - 1]) insert_sorted(bv[i], bi[i], v, id, k, k);
        }
        return;
    }
    int count = (int)n;  /* int counters: the comparison loop vectorises without 64-bit compares */
    for (int i = 0; i < count; ++i) {
        float a = bv[i];
        int rank = 0;
        for (int c = 0; c < count; ++c) rank += (bv[c] > a) | ((bv[c] == a) & (c < i));
        if (rank < k) {
            v[rank] = a;
            id[rank] = bi[i];
        }
    }
}

/* Top-k of each row of x (float32, rows of `cols` values, `ld` apart), sorted descending: values
 * into out_v and column indices into out_i (k per row, contiguous). Returns 0, or -1 when the
 * scratch buffer could not be allocated (nothing written). */
int peer_topk_rows_f32(const float *x, int64_t cols, int64_t ld, int64_t k, float *out_v, int64_t *out_i,
                       int64_t row_begin, int64_t row_end) {
    int threshold = k <= MAX_LANES && cols >= 2 * k;
    float *bv = NULL;
    int64_t *bi = NULL;
    if (threshold) {
        bv = malloc((size_t)cols * sizeof(float));
        bi = malloc((size_t)cols * sizeof(int64_t));
        if (!bv || !bi) {
            free(bv);
            free(bi);
            return -1;
        }
    }
    for (int64_t r = row_begin; r < row_end; ++r) {
        if (threshold) row_topk_threshold(x + r * ld, cols, k, out_v + r * k, out_i + r * k, bv, bi);
        else row_topk_insertion(x + r * ld, cols, k, out_v + r * k, out_i + r * k);
    }
    free(bv);
    free(bi);
    return 0;
}
