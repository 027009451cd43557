/* Batched heterogeneous-rank LoRA for the CPU: one call per (layer, module group) applies every
 * short segment of the batch (shrink then expand), reading each adapter's weights in place from
 * the unified pool. Built and bound by kernels/lora_cpu.py; the torch reference is
 * kernels/lora.py (lora_apply_torch), and tests/test_lora_cpu.py checks one against the other.
 *
 * Contract (elements, not bytes; dtype 0 = float32, 1 = bfloat16 for x, y and the weights):
 *   x [T, in_dim] row stride ldx, y [T, *] row stride ldy, both unit column stride.
 *   segs [nseg, 3] int64: row_start, row_end, rank.   scales [nseg] float32.
 *   rec [nseg, REC] int64, one record per segment for this (layer, group):
 *     a_ptr      address of A_cat [nmod * rank, in_dim] (row-major)
 *     nmod       targeted modules of the group (0: the segment's adapter skips this group)
 *     b_ptr[3]   address of B_m^T [rank, hi_m - lo_m] (row-major) per targeted module
 *     lo[3], hi[3]  the module's columns [lo, hi) in y
 *   work: float32 scratch of at least sum_s rows_s * nmod_s * rank_s elements.
 *   amx_rows: bfloat16 segments of at least this many rows go to the AMX tile path
 *     (lora_amx.h) when it was compiled in and lora_amx_init() returned 1; 0 turns it off.
 * Effect: y[rows_s, lo_m:hi_m] += scale_s * (x[rows_s] @ A_m^T) @ B_m^T for every segment and
 * module; rows outside every segment are not touched. Segments must be disjoint.
 *
 * Arithmetic is float32 whatever the storage type (bf16 on AVX512-BF16 CPUs uses vdpbf16ps:
 * exact products, float32 sums, denormals flushed). bfloat16: v = scale * x A^T is rounded to
 * bfloat16 once before the expand (as torch's bf16 matmul rounds its output, and on every path
 * alike). A row's result does not depend on the other rows of its segment or batch (rows are
 * independent lanes of the same instructions).
 * Work is split into (segment, row block, A-row block) shrink items and (segment, module,
 * column block) expand items; each thread of one OpenMP region takes a contiguous run of them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define REC 11
#include "lora_vec.h"

#include "lora_amx.h"

#define BY_ROWS(nr, CALL)      \
    switch (nr) {              \
        case 1: CALL(1); break; \
        case 2: CALL(2); break; \
        case 3: CALL(3); break; \
        default: CALL(4); break; \
    }

/* The smallest i in [lo, hi) with p[i] >= target (p nondecreasing there), else hi. */
static int64_t first_at(const int64_t *p, int64_t lo, int64_t hi, int64_t target) {
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        if (p[mid] >= target)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

typedef struct {
    int32_t seg, a, b; /* shrink: row block, A-row block; expand: module, column block */
} item_t;

/* What every item of one call reads: the call's arguments and its per-segment offsets into
 * work (v of segment s starts at voff[s]). */
typedef struct {
    const void *x;
    int64_t ldx;
    void *y;
    int64_t ldy;
    int in_dim;
    const int64_t *segs, *rec, *voff;
    const float *scales;
    float *work;
} call_t;

/* Shrink item t: v[rows of block t.a, A rows of block t.b] = scale * x A^T. */
ALWAYS_INLINE void run_shrink(const call_t *c, item_t t, const int dt) {
    const int64_t *sg = c->segs + 3 * t.seg, *rc = c->rec + REC * t.seg;
    const int rank = (int)sg[2], cols = (int)(rc[1] * rank);
    const int64_t row0 = sg[0] + (int64_t)t.a * RB;
    const int nr = (int)((sg[1] - row0) < RB ? (sg[1] - row0) : RB);
    const int j0 = t.b * JB, j1 = j0 + JB < cols ? j0 + JB : cols;
    float *v = c->work + c->voff[t.seg] + (int64_t)t.a * RB * cols;
    const void *A = (const void *)(intptr_t)rc[0];
#define SHRINK(R) \
    shrink_block(c->x, c->ldx, row0, A, c->in_dim, j0, j1, c->scales[t.seg], v, cols, R, dt)
    BY_ROWS(nr, SHRINK)
#undef SHRINK
}

/* Expand item t: y[segment rows, module t.a's column block t.b] += v_m Bt_m. */
ALWAYS_INLINE void run_expand(const call_t *c, item_t t, const int dt) {
    const int64_t *sg = c->segs + 3 * t.seg, *rc = c->rec + REC * t.seg;
    const int rank = (int)sg[2], cols = (int)(rc[1] * rank);
    const int64_t lo = rc[5 + t.a], w = rc[8 + t.a] - lo, ldy = c->ldy;
    const int n0 = t.b * CW, width = (int)(n0 + CW < w ? CW : w - n0);
    const void *Bt = (const void *)(intptr_t)rc[2 + t.a];
    void *y = c->y;
    const float *v0 = c->work + c->voff[t.seg] + t.a * rank; /* v of the segment's first row */
    /* float32, many rows: 64-column strips in registers (compute-bound); the rest, and short
     * segments, through the L1-buffer path (memory-bound: Bt read front to back). bfloat16 on
     * AVX512-BF16 CPUs: two rows of Bt per vdpbf16ps (expand_pairs) at any row count, so a
     * row's result does not depend on the length of its segment. */
#if defined(__AVX512BF16__)
    const int pairs = dt == 1;
#else
    const int pairs = 0;
#endif
    const int strips = !pairs && sg[1] - sg[0] >= LONG_ROWS ? width / STRIP : 0;
    for (int st = 0; st < strips; st++) {
        for (int64_t row0 = sg[0]; row0 < sg[1]; row0 += RB) {
            const int nr = (int)((sg[1] - row0) < RB ? (sg[1] - row0) : RB);
            const float *v = v0 + (row0 - sg[0]) * cols;
            const int c0 = n0 + st * STRIP;
#define STRIPS(R) expand_strip(v, cols, rank, Bt, w, c0, y, ldy, row0, lo + c0, R, dt)
            BY_ROWS(nr, STRIPS)
#undef STRIPS
        }
    }
    const int done = strips * STRIP;
    if (done == width) return;
    for (int64_t row0 = sg[0]; row0 < sg[1]; row0 += RB) {
        const int nr = (int)((sg[1] - row0) < RB ? (sg[1] - row0) : RB);
        const float *v = v0 + (row0 - sg[0]) * cols;
#if defined(__AVX512BF16__)
        if (pairs) {
#define PAIRS(R)                                                                                 \
    expand_pairs(v, cols, rank, (const uint16_t *)Bt, w, n0 + done, width - done, (uint16_t *)y, \
                 ldy, row0, lo + n0 + done, R)
            BY_ROWS(nr, PAIRS)
#undef PAIRS
            continue;
        }
#endif
#define EXPAND(R) \
    expand_block(v, cols, rank, Bt, w, n0 + done, width - done, y, ldy, row0, lo + n0 + done, R, dt)
        BY_ROWS(nr, EXPAND)
#undef EXPAND
    }
}

static __thread kept_t seg_block, item_block; /* a call's segment and item lists */

ALWAYS_INLINE int lora_segments(const void *x, int64_t ldx, void *y, int64_t ldy, int32_t in_dim,
                                int32_t nseg, const int64_t *segs, const int64_t *rec,
                                const float *scales, float *work, int32_t nthreads,
                                int32_t amx_rows, const int dt) {
    /* per segment: voff (v of segment s is work + voff[s]), amx_done (applied by the AMX path) */
    char *seg_mem = kept(&seg_block, (size_t)(nseg + 1) * (sizeof(int64_t) + 1));
    if (!seg_mem) return -1;
    int64_t *voff = (int64_t *)seg_mem;
    char *amx_done = seg_mem + (size_t)(nseg + 1) * sizeof(int64_t);
    memset(amx_done, 0, (size_t)nseg + 1);
    int64_t n_shrink = 0, n_expand = 0;
#ifdef HAVE_AMX
    if (dt == 1 && amx_rows > 0 && amx_permitted && in_dim % 32 == 0 &&
        amx_segments(x, ldx, y, ldy, in_dim, nseg, segs, rec, scales, amx_rows, nthreads,
                     amx_done) != 0)
        return -1;
#else
    (void)amx_rows;
#endif
    voff[0] = 0;
    for (int s = 0; s < nseg; s++) {
        const int64_t rows = segs[3 * s + 1] - segs[3 * s], rank = segs[3 * s + 2];
        const int64_t nmod = amx_done[s] ? 0 : rec[REC * s + 1], cols = nmod * rank;
        voff[s + 1] = voff[s] + rows * cols;
        if (nmod == 0) continue;
        n_shrink += ((rows + RB - 1) / RB) * ((cols + JB - 1) / JB);
        for (int m = 0; m < nmod; m++)
            n_expand += (rec[REC * s + 8 + m] - rec[REC * s + 5 + m] + CW - 1) / CW;
    }
    /* the work items, and pos[i] = cost of the items before i within its phase, where an item's
     * cost = what it reads times (4 + its rows): memory for decode rows, FMAs for long
     * segments */
    const int64_t n_items = n_shrink + n_expand;
    char *item_mem = kept(&item_block, (size_t)(n_items + 2) * sizeof(int64_t) +
                                           (size_t)(n_items + 1) * sizeof(item_t));
    if (!item_mem) return -1;
    int64_t *pos = (int64_t *)item_mem;
    item_t *items = (item_t *)(item_mem + (size_t)(n_items + 2) * sizeof(int64_t));
    int64_t ns = 0, ne = n_shrink, cs = 0, ce = 0;
    for (int s = 0; s < nseg; s++) {
        const int64_t rows = segs[3 * s + 1] - segs[3 * s], rank = segs[3 * s + 2];
        const int64_t nmod = amx_done[s] ? 0 : rec[REC * s + 1], cols = nmod * rank;
        if (nmod == 0) continue;
        for (int r = 0; r < (rows + RB - 1) / RB; r++) {
            const int64_t nr = rows - (int64_t)r * RB < RB ? rows - (int64_t)r * RB : RB;
            for (int j = 0; j < (cols + JB - 1) / JB; j++) {
                const int64_t nj = cols - (int64_t)j * JB < JB ? cols - (int64_t)j * JB : JB;
                pos[ns] = cs;
                cs += nj * in_dim * (4 + nr);
                items[ns++] = (item_t){s, r, j};
            }
        }
        for (int m = 0; m < nmod; m++) {
            const int64_t w = rec[REC * s + 8 + m] - rec[REC * s + 5 + m];
            for (int c = 0; c < (w + CW - 1) / CW; c++) {
                const int64_t wc = w - (int64_t)c * CW < CW ? w - (int64_t)c * CW : CW;
                pos[ne + 1] = ce; /* shifted by one: pos[n_shrink] holds the shrink total */
                ce += rank * wc * (4 + rows);
                items[ne++] = (item_t){s, m, c};
            }
        }
    }
    pos[n_shrink] = cs;
    pos[n_shrink + n_expand + 1] = ce;
    const call_t call = {x, ldx, y, ldy, in_dim, segs, rec, voff, scales, work};

#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        /* Each thread takes a contiguous run of items of about equal cost: runs follow the
         * weights' memory order, so each thread reads long streams the prefetchers follow. */
        const int64_t s_begin = first_at(pos, 0, n_shrink, cs * tid / nt);
        const int64_t s_end =
            tid == nt - 1 ? n_shrink : first_at(pos, 0, n_shrink, cs * (tid + 1) / nt);
        for (int64_t it = s_begin; it < s_end; it++) run_shrink(&call, items[it], dt);
#pragma omp barrier
        /* expand item i (i >= n_shrink) starts at cost pos[i + 1] of its phase */
        const int64_t e_begin = first_at(pos + 1, n_shrink, n_shrink + n_expand, ce * tid / nt);
        const int64_t e_end = tid == nt - 1 ? n_shrink + n_expand
                                            : first_at(pos + 1, n_shrink, n_shrink + n_expand,
                                                       ce * (tid + 1) / nt);
        for (int64_t it = e_begin; it < e_end; it++) run_expand(&call, items[it], dt);
    }
    return 0;
}

/* One step's constant inputs, built once per step by kernels/lora_cpu.py (StepArgs there mirrors
 * it): a call then passes only what changes, x and y, and which (layer, group) it is. */
#define MAX_GROUPS 8
typedef struct {
    const int64_t *segs;    /* [nseg, 3] */
    const int64_t *records; /* [num_layers, ngroups, nseg, REC] */
    const float *scales;    /* [nseg] */
    float *work;
    int32_t nseg, ngroups, nthreads, amx_rows;
    int32_t in_dims[MAX_GROUPS]; /* each group's input width: x's columns */
} lora_step_t;

ALWAYS_INLINE int lora_step(const void *x, int64_t ldx, void *y, int64_t ldy,
                            const lora_step_t *st, int32_t layer_group, const int dt) {
    const int64_t *rec = st->records + (int64_t)layer_group * st->nseg * REC;
    return lora_segments(x, ldx, y, ldy, st->in_dims[layer_group % st->ngroups], st->nseg,
                         st->segs, rec, st->scales, st->work, st->nthreads, st->amx_rows, dt);
}

/* layer_group = layer * ngroups + group; x [*, in_dims[group]] and y as in the contract above
 * (the caller has checked their shapes against the step). */
int lora_step_f32(const void *x, int64_t ldx, void *y, int64_t ldy, const lora_step_t *st,
                  int32_t layer_group) {
    return lora_step(x, ldx, y, ldy, st, layer_group, 0);
}

int lora_step_bf16(const void *x, int64_t ldx, void *y, int64_t ldy, const lora_step_t *st,
                   int32_t layer_group) {
    return lora_step(x, ldx, y, ldy, st, layer_group, 1);
}
