/* CPU kernels of peer_dist that torch has no fast path for; loaded through ctypes by __init__.py.
 *
 * Plain C99 on raw pointers (no torch headers), so it compiles in well under a second with any
 * C compiler and needs no build step at install time. Every parallel kernel splits its rows
 * [row_begin, row_end) over `threads` OpenMP threads; linked against the libgomp torch has
 * loaded, they are torch's own intra-op threads (a second runtime's threads would compete with
 * torch's spinning ones for the cores). Rows are independent: no result depends on the split.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Each exported kernel is compiled twice (AVX2 + FMA, and baseline x86-64) and the loader picks
 * the first this CPU runs: one library file serves every node of a cluster. (An AVX-512 clone
 * measured slower: 2.7x on the gather-dot at d = 512.) */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEER_KERNEL __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PEER_KERNEL
#endif

/* This thread's share [*begin, *end) of [row_begin, row_end) inside a parallel region. */
static inline void thread_share(int64_t row_begin, int64_t row_end, int64_t *begin, int64_t *end) {
#ifdef _OPENMP
    int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
#else
    int64_t t = 0, n = 1;
#endif
    *begin = row_begin + (row_end - row_begin) * t / n;
    *end = row_begin + (row_end - row_begin) * (t + 1) / n;
}

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

/* A thread's scratch: values and columns of up to `cols` candidates (the threshold path), and
 * one row of `cols` values a kernel builds before its top-k (scores, candidate sums). */
typedef struct {
    float *values;
    int64_t *columns;
    float *row;
} scratch_t;

static int scratch_alloc(scratch_t *c, int64_t cols) {
    c->values = malloc((size_t)cols * sizeof(float));
    c->columns = malloc((size_t)cols * sizeof(int64_t));
    c->row = malloc((size_t)cols * sizeof(float));
    return c->values && c->columns && c->row;
}

static void scratch_free(scratch_t *c) {
    free(c->values);
    free(c->columns);
    free(c->row);
}

static inline void row_topk(const float *p, int64_t cols, int64_t k, float *v, int64_t *id, scratch_t *c) {
    if (k <= MAX_LANES && cols >= 2 * k) row_topk_threshold(p, cols, k, v, id, c->values, c->columns);
    else row_topk_insertion(p, cols, k, v, id);
}

/* Top-k of each row of x (float32, rows of `cols` values, `ld` apart), sorted descending: values
 * into out_v and column indices into out_i (k per row, contiguous). Returns 0, or -1 when the
 * scratch buffer could not be allocated (nothing written). */
PEER_KERNEL int peer_topk_rows_f32(const float *x, int64_t cols, int64_t ld, int64_t k, float *out_v,
                                   int64_t *out_i, int64_t row_begin, int64_t row_end, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t begin, end;
        thread_share(row_begin, row_end, &begin, &end);
        scratch_t c;
        if (!scratch_alloc(&c, cols)) failed = 1;
        else
            for (int64_t r = begin; r < end; ++r) row_topk(x + r * ld, cols, k, out_v + r * k, out_i + r * k, &c);
        scratch_free(&c);
    }
    return failed ? -1 : 0;
}

/* Sub-key retrieval fused: for each query row q (dim values, `ldq` apart) the scores
 * q . key_s of all `cols` keys (keys_t: dim x cols, the keys transposed) into one cached row,
 * then its sorted top-k as peer_topk_rows_f32. Never writes the (rows x cols) score matrix.
 * Each score sums q[c] * key[c] for c ascending. Returns 0, or -1 without scratch memory. */
PEER_KERNEL int peer_scores_topk_f32(const float *q, int64_t ldq, const float *keys_t, int64_t dim, int64_t cols,
                                     int64_t k, float *out_v, int64_t *out_i, int64_t row_begin, int64_t row_end,
                                     int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t begin, end;
        thread_share(row_begin, row_end, &begin, &end);
        scratch_t c;
        if (!scratch_alloc(&c, cols)) failed = 1;
        else
            for (int64_t r = begin; r < end; ++r) {
                const float *qr = q + r * ldq;
                float *scores = c.row;
                for (int64_t s = 0; s < cols; ++s) scores[s] = 0.0f;
                for (int64_t d = 0; d < dim; ++d) {
                    float a = qr[d];
                    const float *kd = keys_t + d * cols;
                    for (int64_t s = 0; s < cols; ++s) scores[s] += a * kd[s];
                }
                row_topk(scores, cols, k, out_v + r * k, out_i + r * k, &c);
            }
        scratch_free(&c);
    }
    return failed ? -1 : 0;
}

/* AdamW on rows ids[row_begin:row_end] of an fp32 table, fused: each row's value, moments and
 * gradient are read once and written once (the torch path gathers, updates and scatters them in
 * seven passes). Per row r = ids[i], with its own step count t = ++row_step[r]:
 *     g = grad[i] * grad_scale
 *     m = m + (1 - beta1) (g - m)                   v = beta2 v + (1 - beta2) g^2
 *     p = p (1 - lr_i wd) - lr_i / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
 * with lr_i = lr * row_lr[i] (row_lr may be NULL: 1). Rows are distinct, so a split of the rows
 * over threads touches disjoint memory. */
PEER_KERNEL void peer_adamw_rows_f32(float *param, float *exp_avg, float *exp_avg_sq, int64_t *row_step, const int64_t *ids,
                         const float *grad, const float *row_lr, int64_t width, float lr, float beta1, float beta2,
                         float eps, float weight_decay, float grad_scale, int64_t row_begin, int64_t row_end,
                         int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = row_begin; i < row_end; ++i) {
        int64_t r = ids[i];
        int64_t t = ++row_step[r];
        float lr_i = row_lr ? lr * row_lr[i] : lr;
        float bias1 = 1.0f - powf(beta1, (float)t);
        float bias2_sqrt = sqrtf(1.0f - powf(beta2, (float)t));
        float step_size = lr_i / bias1, decay = 1.0f - lr_i * weight_decay;
        float *p = param + r * width, *m = exp_avg + r * width, *v = exp_avg_sq + r * width;
        const float *g = grad + i * width;
        for (int64_t d = 0; d < width; ++d) {
            float gd = g[d] * grad_scale;
            float md = m[d] + (1.0f - beta1) * (gd - m[d]);
            float vd = beta2 * v[d] + (1.0f - beta2) * gd * gd;
            m[d] = md;
            v[d] = vd;
            p[d] = p[d] * decay - step_size * md / (sqrtf(vd) / bias2_sqrt + eps);
        }
    }
}

/* Stable argsort of n ids in [0, 2^bits) (LSD radix sort, digits of at most 11 bits): order[j] is
 * the position of the j-th smallest id, equal ids in position order (torch.argsort(stable=True)).
 * O(n) per digit whatever the number of ids' values; `scratch` holds n int64. Returns -1 (order
 * undefined) when an id is out of range. */
PEER_KERNEL int peer_argsort_ids(const int64_t *ids, int64_t n, int64_t bits, int64_t *order, int64_t *scratch) {
    for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0 || (bits < 63 && ids[i] >> bits)) return -1;
    int64_t passes = bits <= 0 ? 1 : (bits + 10) / 11;
    int64_t width = (bits + passes - 1) / passes;
    if (width < 1) width = 1;
    int64_t buckets = (int64_t)1 << width, mask = buckets - 1;
    int64_t *count = calloc((size_t)buckets, sizeof(int64_t));
    if (!count) return -2;
    /* the passes alternate between order and scratch so that the last one writes order */
    int64_t *src = passes % 2 ? order : scratch, *dst = passes % 2 ? scratch : order;
    for (int64_t i = 0; i < n; ++i) dst[i] = i;
    for (int64_t pass = 0; pass < passes; ++pass) {
        int64_t shift = pass * width;
        int64_t *tmp = src;
        src = dst;
        dst = tmp;
        for (int64_t b = 0; b < buckets; ++b) count[b] = 0;
        for (int64_t i = 0; i < n; ++i) ++count[(ids[src[i]] >> shift) & mask];
        int64_t sum = 0;
        for (int64_t b = 0; b < buckets; ++b) {
            int64_t c = count[b];
            count[b] = sum;
            sum += c;
        }
        for (int64_t i = 0; i < n; ++i) dst[count[(ids[src[i]] >> shift) & mask]++] = src[i];
    }
    free(count);
    return 0;
}

/* Gather-dot in expert order: out[slot[p]] = table[ids[p]] . rows[row[p]] for the pairs p of
 * [begin, end), both operands fp32 rows of `width` values. Pairs come sorted by expert id, so
 * consecutive pairs reuse the same table row from cache. Eight partial sums per dot product (the
 * compiler vectorises them; a single running sum could not be reordered), added in a fixed order:
 * the result does not depend on the thread split. Slots are distinct: threads write disjoint
 * entries. */
PEER_KERNEL void peer_gather_dot_f32(const float *rows, const float *table, const int64_t *ids, const int64_t *row,
                         const int64_t *slot, int64_t width, float *out, int64_t begin, int64_t end,
                                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = begin; p < end; ++p) {
        const float *a = table + ids[p] * width, *b = rows + row[p] * width;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t d = 0;
        for (; d + 8 <= width; d += 8)
            for (int j = 0; j < 8; ++j) acc[j] += a[d + j] * b[d + j];
        float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; d < width; ++d) sum += a[d] * b[d];
        out[slot[p]] = sum;
    }
}

/* The last step of product-key retrieval: per row, the m candidate pairs (rank_a[c], rank_b[c])
 * of the two sides' sorted top lists (side_k entries each) score sa[rank_a[c]] + sb[rank_b[c]];
 * their sorted top-k gives the scores (out_v), the global ids ida * num_sub + idb (out_id) and
 * each winner's side ranks (out_ra, out_rb: where the backward sends its gradient). Returns 0,
 * or -1 without scratch memory. */
PEER_KERNEL int peer_candidates_topk_f32(const float *sa, const float *sb, const int64_t *ida, const int64_t *idb,
                                         int64_t side_k, const int64_t *rank_a, const int64_t *rank_b, int64_t m,
                                         int64_t k, int64_t num_sub, float *out_v, int64_t *out_id, int64_t *out_ra,
                                         int64_t *out_rb, int64_t row_begin, int64_t row_end, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int64_t begin, end;
        thread_share(row_begin, row_end, &begin, &end);
        scratch_t c;
        if (!scratch_alloc(&c, m)) failed = 1;
        else
            for (int64_t r = begin; r < end; ++r) {
                const float *a = sa + r * side_k, *b = sb + r * side_k;
                float *sums = c.row;
                for (int64_t j = 0; j < m; ++j) sums[j] = a[rank_a[j]] + b[rank_b[j]];
                float *v = out_v + r * k;
                int64_t *pos = out_id + r * k;  /* candidate positions first, then overwritten by the ids */
                row_topk(sums, m, k, v, pos, &c);
                for (int64_t j = 0; j < k; ++j) {
                    int64_t i_a = rank_a[pos[j]], i_b = rank_b[pos[j]];
                    out_ra[r * k + j] = i_a;
                    out_rb[r * k + j] = i_b;
                    pos[j] = ida[r * side_k + i_a] * num_sub + idb[r * side_k + i_b];
                }
            }
        scratch_free(&c);
    }
    return failed ? -1 : 0;
}

/* Segment sums per expert: out[u] = sum over the pairs p of group u (positions
 * [start[u], start[u + 1]) of the expert-sorted pairs, the last group ending at num_pairs) of
 * w[slot[p]] * rows[row[p]], for the groups [group_begin, group_end). One output row per distinct
 * expert, accumulated in place and written once: no atomics, deterministic. */
PEER_KERNEL void peer_segment_sum_f32(const float *rows, const int64_t *row, const int64_t *slot, const float *w,
                                      const int64_t *start, int64_t num_groups, int64_t num_pairs, int64_t width,
                                      float *out, int64_t group_begin, int64_t group_end, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t u = group_begin; u < group_end; ++u) {
        float *o = out + u * width;
        for (int64_t d = 0; d < width; ++d) o[d] = 0.0f;
        int64_t end = u + 1 < num_groups ? start[u + 1] : num_pairs;
        for (int64_t p = start[u]; p < end; ++p) {
            float a = w[slot[p]];
            const float *r = rows + row[p] * width;
            for (int64_t d = 0; d < width; ++d) o[d] += a * r[d];
        }
    }
}
