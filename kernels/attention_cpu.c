/* Paged decode attention for the CPU: one call per layer computes, for every decode sequence of
 * the step (one query token each), softmax(scale * q K^T) V over its whole context, reading K and
 * V in place from the unified pool's pages through the sequence's block table (the torch path
 * gathers a padded copy of every context first). Built into one library with the LoRA kernel
 * (kernels/cpu_build.py) and called by kernels/attention_cpu.py; the torch reference is
 * kernels/attention.py (paged_attention), and tests/test_attention_cpu.py checks one against
 * the other.
 *
 * Contract (elements, not bytes; dtype 0 = float32, 1 = bfloat16 for q, out and the caches):
 *   q, out: sequence s's query is row rows[s], its heads [H, D] contiguous; row strides ldq, ldo.
 *   k, v (one layer's caches): kv head j of slot t of page p starts at
 *     p * page_stride + t * slot_stride + j * D.
 *   tables [nseq, max_blocks] int32: the page of each block (block b holds positions
 *     b * block_size ...); ctx [nseq] int32 in [1, max_blocks * block_size]: context length
 *     (keys 0 .. ctx - 1, the query's own key included, already written).
 *   H % KH == 0 (query head h reads kv head h / (H / KH)), H / KH <= MAX_GROUP, D % 16 == 0,
 *   D <= 128.
 * Effect: out[rows[s], h] = sum_t p_t V[s, t], p = softmax over t < ctx[s] of
 * scale * q[rows[s], h] . K[s, t]. Arithmetic in float32 (bfloat16 inputs widen exactly, out is
 * rounded once); exp is a polynomial within a few ulp of expf. A sequence's result depends only
 * on its own inputs. Returns 0, or -1 when out of memory (scratch).
 * Work: items of one sequence's kv heads (all of them, up to MAX_ITEM_HEADS query heads; fewer
 * when there are fewer sequences than threads); each thread of one OpenMP region takes a
 * contiguous run of items of about equal cost (keys x kv heads).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_common.h"

#define MAX_GROUP 16      /* query heads per kv head */
#define MAX_ITEM_HEADS 32 /* query heads per work item (its queries and sums stay on the stack) */

typedef int32_t vi __attribute__((vector_size(VL * 4)));

/* exp(x) per lane for x <= 0 (scores minus their maximum): 2^n * e^r with n = round(x / ln 2),
 * |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (relative error < 2e-8 before rounding);
 * lanes below -87 give ~1e-38 (their weight next to the maximum's 1 is far below float32's). */
ALWAYS_INLINE vf exp_neg(vf x) {
    const vf lo = (vf){0} - 87.0f, big = (vf){0} + 12582912.0f; /* 1.5 * 2^23: rounds to int */
    const vi below = x < lo; /* lanewise: all ones where x < lo */
    vi xi, loi;
    memcpy(&xi, &x, sizeof xi);
    memcpy(&loi, &lo, sizeof loi);
    xi = (below & loi) | (~below & xi);
    memcpy(&x, &xi, sizeof x);
    const vf n = (x * 1.44269504088896341f + big) - big;
    const vf r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f; /* ln2 in 2 parts */
    vf p = (vf){0} + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi e = (__builtin_convertvector(n, vi) + 127) << 23; /* 2^n, n in [-126, 0] */
    vf two_n;
    memcpy(&two_n, &e, sizeof two_n);
    return p * two_n;
}

/* A head's D elements at p + i as D / 16 float vectors, in ld2's arrangement (a last 16 in
 * order), and back: dot products and sums do not care about the order, stores undo it. */
ALWAYS_INLINE void ld_head(const void *p, int64_t i, int D, vf *h, const int dt) {
    int c = 0;
    for (; c + 32 <= D; c += 32) ld2(p, i + c, &h[c / 16], &h[c / 16 + 1], dt);
    if (c < D) {
        if (dt == 0) {
            memcpy(&h[c / 16], (const float *)p + i + c, sizeof(vf));
        } else {
            typedef uint16_t vh __attribute__((vector_size(VL * 2)));
            vh b;
            memcpy(&b, (const uint16_t *)p + i + c, sizeof b);
            const vu u = __builtin_convertvector(b, vu) << 16;
            memcpy(&h[c / 16], &u, sizeof u);
        }
    }
}

ALWAYS_INLINE void st_head(void *p, int64_t i, int D, const vf *h, const int dt) {
    int c = 0;
    for (; c + 32 <= D; c += 32) st2(p, i + c, h[c / 16], h[c / 16 + 1], dt);
    for (int l = 0; c < D && l < VL; l++) sts(p, i + c + l, h[c / 16][l], dt);
}

ALWAYS_INLINE const void *at(const void *base, int64_t i, const int dt) {
    return dt == 0 ? (const void *)((const float *)base + i)
                   : (const void *)((const uint16_t *)base + i);
}

/* Ask for the cache lines of `bytes` at p (the next page's part of a key or value row: pages
 * are scattered, so the hardware prefetchers cannot know where the next one is). */
ALWAYS_INLINE void prefetch_row(const char *p, int bytes) {
    for (int b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

/* Where an item's rows are: one sequence's block table, the cache strides, and the item's part
 * of a slot row (kv heads from j0, row_bytes long). */
typedef struct {
    const int32_t *table;
    int64_t page_stride, slot_stride;
    int block_size, nblocks, j0, D, row_bytes;
} rows_t;

/* Offset of key t's row part in k or v; asks first for the same row part of the next page. */
ALWAYS_INLINE int64_t row_at(const rows_t *r, const void *cache, int t, const int dt) {
    const int b = t / r->block_size;
    const int64_t row = (t % r->block_size) * r->slot_stride + (int64_t)r->j0 * r->D;
    if (b + 1 < r->nblocks)
        prefetch_row((const char *)at(cache, r->table[b + 1] * r->page_stride + row, dt),
                     r->row_bytes);
    return r->table[b] * r->page_stride + row;
}

/* s[h * ctx + t] = scale * q_h . k_t for the item's nh = nkv * G query heads (a key's load serves
 * its G query heads); lmax[h] = the largest. */
ALWAYS_INLINE void scores(const rows_t *r, const void *k, int ctx, int nkv, int G, float scale,
                          vf qv[][8], float *s, float *lmax, const int dt) {
    const int nv = r->D / VL;
    for (int h = 0; h < nkv * G; h++) lmax[h] = -INFINITY;
    for (int t = 0; t < ctx; t++) {
        const int64_t off = row_at(r, k, t, dt);
        for (int jj = 0; jj < nkv; jj++) {
            vf kv[8];
            ld_head(k, off + (int64_t)jj * r->D, r->D, kv, dt);
            for (int g = 0; g < G; g++) {
                const int h = jj * G + g;
                vf d = qv[h][0] * kv[0];
                for (int c = 1; c < nv; c++) d += qv[h][c] * kv[c];
                const float sc = hsum(d) * scale;
                s[(int64_t)h * ctx + t] = sc;
                lmax[h] = sc > lmax[h] ? sc : lmax[h];
            }
        }
    }
}

/* s[t] := exp(s[t] - max) for t < ctx; returns their sum. */
ALWAYS_INLINE float exp_row(float *s, int ctx, float max) {
    vf tot = (vf){0};
    int t = 0;
    for (; t + VL <= ctx; t += VL) {
        vf x;
        memcpy(&x, s + t, sizeof x);
        x = exp_neg(x - max);
        memcpy(s + t, &x, sizeof x);
        tot += x;
    }
    if (t < ctx) { /* the tail; lanes past ctx are zeroed */
        vf x = (vf){0} + max;
        memcpy(&x, s + t, (size_t)(ctx - t) * 4);
        x = exp_neg(x - max);
        for (int i = ctx - t; i < VL; i++) x[i] = 0.f;
        memcpy(s + t, &x, (size_t)(ctx - t) * 4);
        tot += x;
    }
    return hsum(tot);
}

/* acc[h] = sum_t p[h * ctx + t] v_t for the item's query heads. */
ALWAYS_INLINE void weigh_values(const rows_t *r, const void *v, int ctx, int nkv, int G,
                                const float *p, vf acc[][8], const int dt) {
    const int nv = r->D / VL;
    for (int h = 0; h < nkv * G; h++)
        for (int c = 0; c < nv; c++) acc[h][c] = (vf){0};
    for (int t = 0; t < ctx; t++) {
        const int64_t off = row_at(r, v, t, dt);
        for (int jj = 0; jj < nkv; jj++) {
            vf vv[8];
            ld_head(v, off + (int64_t)jj * r->D, r->D, vv, dt);
            for (int g = 0; g < G; g++) {
                const int h = jj * G + g;
                const float w = p[(int64_t)h * ctx + t];
                for (int c = 0; c < nv; c++) acc[h][c] += w * vv[c];
            }
        }
    }
}

/* One item: a sequence's kv heads [j0, j1) and their (j1 - j0) * G query heads (item head h is
 * head j0 * G + h of the query and output rows). s: scratch for (j1 - j0) * G * ctx floats. */
ALWAYS_INLINE void attend(const void *q, void *out, const void *k, const void *v,
                          int64_t page_stride, int64_t slot_stride, const int32_t *table,
                          int ctx, int j0, int j1, int G, int D, int block_size, float scale,
                          float *s, const int dt) {
    const int nkv = j1 - j0, nh = nkv * G;
    const rows_t r = {table, page_stride, slot_stride, block_size,
                      (ctx + block_size - 1) / block_size, j0, D, nkv * D * (dt == 0 ? 4 : 2)};
    vf qv[MAX_ITEM_HEADS][8], acc[MAX_ITEM_HEADS][8];
    float lmax[MAX_ITEM_HEADS], sum[MAX_ITEM_HEADS];
    for (int h = 0; h < nh; h++) ld_head(q, (int64_t)(j0 * G + h) * D, D, qv[h], dt);
    scores(&r, k, ctx, nkv, G, scale, qv, s, lmax, dt);
    for (int h = 0; h < nh; h++) sum[h] = exp_row(s + (int64_t)h * ctx, ctx, lmax[h]);
    weigh_values(&r, v, ctx, nkv, G, s, acc, dt);
    for (int h = 0; h < nh; h++) {
        const float inv = 1.0f / sum[h];
        for (int c = 0; c < D / VL; c++) acc[h][c] *= inv;
        st_head(out, (int64_t)(j0 * G + h) * D, D, acc[h], dt);
    }
}

static __thread kept_t score_block; /* a thread's scores: an item's query heads x ctx floats */

ALWAYS_INLINE int decode_attention(const void *q, int64_t ldq, void *out, int64_t ldo,
                                   const void *k, const void *v, int64_t page_stride,
                                   int64_t slot_stride, const int32_t *tables, int32_t max_blocks,
                                   const int32_t *ctx, const int32_t *rows, int32_t nseq,
                                   int32_t H, int32_t KH, int32_t D, int32_t block_size,
                                   float scale, int32_t nthreads, const int dt) {
    const int G = H / KH;
    /* kv heads per item: at most MAX_ITEM_HEADS query heads, and split further when there are
     * fewer sequences than threads (a single long decode still uses every thread) */
    int per = MAX_ITEM_HEADS / G < KH ? MAX_ITEM_HEADS / G : KH;
    if (nseq < nthreads) {
        const int split = (KH + nthreads - 1) / nthreads;
        per = split < per ? split : per;
    }
    int64_t total = 0; /* cost: keys times kv heads */
    for (int s = 0; s < nseq; s++) total += (int64_t)ctx[s] * KH;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && total > 0) reduction(| : failed)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        /* items (s, j0) in order: this thread takes those whose cost prefix starts in
         * [total * tid / nt, total * (tid + 1) / nt) */
        const int64_t lo = total * tid / nt, hi = total * (tid + 1) / nt;
        int64_t before = 0;
        for (int s = 0; s < nseq && before < hi; s++) {
            for (int j0 = 0; j0 < KH; j0 += per) {
                const int j1 = j0 + per < KH ? j0 + per : KH;
                const int64_t cost = (int64_t)ctx[s] * (j1 - j0);
                before += cost;
                if (before - cost < lo || before - cost >= hi) continue;
                float *sc = kept(&score_block, (size_t)(j1 - j0) * G * ctx[s] * sizeof(float));
                if (!sc) {
                    failed = 1;
                    continue;
                }
                attend(at(q, rows[s] * ldq, dt), (void *)at(out, rows[s] * ldo, dt), k, v,
                       page_stride, slot_stride, tables + (int64_t)s * max_blocks, ctx[s], j0, j1,
                       G, D, block_size, scale, sc, dt);
            }
        }
    }
    return failed ? -1 : 0;
}

int decode_attention_f32(const void *q, int64_t ldq, void *out, int64_t ldo, const void *k,
                         const void *v, int64_t page_stride, int64_t slot_stride,
                         const int32_t *tables, int32_t max_blocks, const int32_t *ctx,
                         const int32_t *rows, int32_t nseq, int32_t H, int32_t KH, int32_t D,
                         int32_t block_size, float scale, int32_t nthreads) {
    return decode_attention(q, ldq, out, ldo, k, v, page_stride, slot_stride, tables, max_blocks,
                            ctx, rows, nseq, H, KH, D, block_size, scale, nthreads, 0);
}

int decode_attention_bf16(const void *q, int64_t ldq, void *out, int64_t ldo, const void *k,
                          const void *v, int64_t page_stride, int64_t slot_stride,
                          const int32_t *tables, int32_t max_blocks, const int32_t *ctx,
                          const int32_t *rows, int32_t nseq, int32_t H, int32_t KH, int32_t D,
                          int32_t block_size, float scale, int32_t nthreads) {
    return decode_attention(q, ldq, out, ldo, k, v, page_stride, slot_stride, tables, max_blocks,
                            ctx, rows, nseq, H, KH, D, block_size, scale, nthreads, 1);
}
