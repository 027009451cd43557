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
 * Arithmetic is float32 whatever the storage type (bf16 shrinks on AVX512-BF16 CPUs use
 * vdpbf16ps: exact products, float32 sums, denormals flushed); a row's result does not depend on
 * the other rows of its segment or batch (rows are independent lanes of the same instructions).
 * Work is split into (segment, row block, A-row block) shrink items and (segment, module,
 * column block) expand items; each thread of one OpenMP region takes a contiguous run of them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define REC 11
#define VL 16      /* floats per vector */
#define STEP 32    /* elements per step: two vectors */
#define RB 4       /* rows per register block */
#define JB 16      /* A rows per shrink item */
#define CW 512     /* output columns per expand item (a multiple of STEP) */
#define PF 2       /* expand: prefetch the chunk this many rows of Bt ahead */
#define STRIP 64   /* expand of long segments: output columns held in registers */
#define LONG_ROWS 8 /* segments of at least this many rows use the register strips */

typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* STEP elements from p + i as two float vectors. float32: elements [0, 16) and [16, 32).
 * bfloat16: the even and the odd elements; a 32-bit load holds a pair, and a bf16 is the top
 * half of its float32, so the split is a shift and a mask (no shuffles). Stores use the same
 * arrangement, and a dot product does not care about the order of its terms. */
ALWAYS_INLINE void ld2(const void *p, int64_t i, vf *lo, vf *hi, const int dt) {
    if (dt == 0) {
        memcpy(lo, (const float *)p + i, sizeof *lo);
        memcpy(hi, (const float *)p + i + VL, sizeof *hi);
    } else {
        vu u, e, o;
        memcpy(&u, (const uint16_t *)p + i, sizeof u);
        e = u << 16;
        o = u & 0xFFFF0000u;
        memcpy(lo, &e, sizeof e);
        memcpy(hi, &o, sizeof o);
    }
}

/* float32 -> bfloat16 bits in the top half, round to nearest even; NaN stays a quiet NaN. */
ALWAYS_INLINE vu round_bf16(vf f) {
    vu u, nan = (vu)(f != f);
    memcpy(&u, &f, sizeof u);
    vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    return (r & ~nan) | ((u | 0x400000u) & 0xFFFF0000u & nan);
}

ALWAYS_INLINE void st2(void *p, int64_t i, vf lo, vf hi, const int dt) {
    if (dt == 0) {
        memcpy((float *)p + i, &lo, sizeof lo);
        memcpy((float *)p + i + VL, &hi, sizeof hi);
    } else {
        vu u = (round_bf16(lo) >> 16) | round_bf16(hi);
        memcpy((uint16_t *)p + i, &u, sizeof u);
    }
}

ALWAYS_INLINE float lds(const void *p, int64_t i, const int dt) {
    if (dt == 0) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

ALWAYS_INLINE void sts(void *p, int64_t i, float f, const int dt) {
    if (dt == 0) {
        ((float *)p)[i] = f;
    } else {
        vf v = (vf){0} + f;
        ((uint16_t *)p)[i] = (uint16_t)(round_bf16(v)[0] >> 16);
    }
}

/* Ask for the cache lines of STEP elements at p + i (rows of Bt are strided chunks, which the
 * hardware prefetchers follow late). */
ALWAYS_INLINE void prefetch(const void *p, int64_t i, const int dt) {
    const char *c = dt == 0 ? (const char *)((const float *)p + i) : (const char *)((const uint16_t *)p + i);
    __builtin_prefetch(c);
    if (dt == 0) __builtin_prefetch(c + 64);
}

/* Sum of the 16 lanes as a fixed tree (a serial chain would cost 16 dependent adds). */
ALWAYS_INLINE float hsum(vf v) {
    typedef float v8 __attribute__((vector_size(32)));
    typedef float v4 __attribute__((vector_size(16)));
    v8 lo8, hi8;
    memcpy(&lo8, &v, sizeof lo8);
    memcpy(&hi8, (const char *)&v + sizeof lo8, sizeof hi8);
    v8 s8 = lo8 + hi8;
    v4 lo4, hi4;
    memcpy(&lo4, &s8, sizeof lo4);
    memcpy(&hi4, (const char *)&s8 + sizeof lo4, sizeof hi4);
    v4 s4 = lo4 + hi4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* acc[jj][i] += A[j + jj, k:k+STEP] . x[row0 + i, k:k+STEP] for jj < JJ, i < ROWS: each A chunk is
 * used by every row and each x chunk by every A row. bfloat16 on CPUs with AVX512-BF16: one
 * vdpbf16ps per pair (exact products, float32 sums) and no conversion. */
ALWAYS_INLINE void dot_step(const void *x, int64_t ldx, int64_t row0, const void *A, int64_t a0,
                            int in_dim, int k, vf acc[2][RB], const int JJ, const int ROWS,
                            const int dt) {
#if defined(__AVX512BF16__)
    if (dt == 1) {
        __m512bh a[2], xv[RB];
        for (int jj = 0; jj < JJ; jj++)
            a[jj] = (__m512bh)_mm512_loadu_si512((const uint16_t *)A + a0 + (int64_t)jj * in_dim + k);
        for (int i = 0; i < ROWS; i++)
            xv[i] = (__m512bh)_mm512_loadu_si512((const uint16_t *)x + (row0 + i) * ldx + k);
        for (int jj = 0; jj < JJ; jj++)
            for (int i = 0; i < ROWS; i++)
                acc[jj][i] = (vf)_mm512_dpbf16_ps((__m512)acc[jj][i], a[jj], xv[i]);
        return;
    }
#endif
    vf a_lo[2], a_hi[2], x_lo[RB], x_hi[RB];
    for (int jj = 0; jj < JJ; jj++) ld2(A, a0 + (int64_t)jj * in_dim + k, &a_lo[jj], &a_hi[jj], dt);
    for (int i = 0; i < ROWS; i++) ld2(x, (row0 + i) * ldx + k, &x_lo[i], &x_hi[i], dt);
    for (int jj = 0; jj < JJ; jj++)
        for (int i = 0; i < ROWS; i++) acc[jj][i] += a_lo[jj] * x_lo[i] + a_hi[jj] * x_hi[i];
}

/* v[i * cols + j] = scale * dot(A[j], x[row0 + i]) for i < ROWS, j in [j0, j1). A rows are
 * taken two at a time (JJ = 2; a last odd one alone). */
ALWAYS_INLINE void shrink_block(const void *x, int64_t ldx, int64_t row0, const void *A,
                                int in_dim, int j0, int j1, float scale, float *v, int cols,
                                const int ROWS, const int dt) {
    const int nv = in_dim / STEP * STEP;
    for (int j = j0; j < j1; j += 2) {
        const int JJ = j + 1 < j1 ? 2 : 1;
        const int64_t a0 = (int64_t)j * in_dim;
        vf acc[2][RB];
        for (int jj = 0; jj < 2; jj++)
            for (int i = 0; i < ROWS; i++) acc[jj][i] = (vf){0};
        if (JJ == 2)
            for (int k = 0; k < nv; k += STEP) {
                /* the rows two pairs ahead (the item's A rows are one contiguous stream) */
                prefetch(A, a0 + 4 * (int64_t)in_dim + k, dt);
                prefetch(A, a0 + 5 * (int64_t)in_dim + k, dt);
                dot_step(x, ldx, row0, A, a0, in_dim, k, acc, 2, ROWS, dt);
            }
        else
            for (int k = 0; k < nv; k += STEP) dot_step(x, ldx, row0, A, a0, in_dim, k, acc, 1, ROWS, dt);
        for (int jj = 0; jj < JJ; jj++) {
            for (int i = 0; i < ROWS; i++) {
                float s = hsum(acc[jj][i]);
                for (int k = nv; k < in_dim; k++)
                    s += lds(A, a0 + (int64_t)jj * in_dim + k, dt) * lds(x, (row0 + i) * ldx + k, dt);
                v[(int64_t)i * cols + j + jj] = s * scale;
            }
        }
    }
}

/* y[row0 + i, col0 + n] += sum_k v[i * cols + k] * Bt[k, n0 + n] for n < width, i < ROWS.
 * Rows of Bt are read front to back (a stream the prefetchers follow); the sums stay in an L1
 * buffer (in ld2's arrangement) and y is read and written once. */
ALWAYS_INLINE void expand_block(const float *v, int cols, int rank, const void *Bt, int64_t ldb,
                                int n0, int width, void *y, int64_t ldy, int64_t row0,
                                int64_t col0, const int ROWS, const int dt) {
    vf acc[RB][CW / VL];
    const int nv = width / STEP * STEP;
    float tail[RB][STEP];
    for (int i = 0; i < ROWS; i++) {
        for (int q = 0; q < nv / VL; q++) acc[i][q] = (vf){0};
        for (int n = 0; n < width - nv; n++) tail[i][n] = 0.f;
    }
    for (int k = 0; k < rank; k++) {
        const int64_t b0 = (int64_t)k * ldb + n0;
        float c[RB];
        for (int i = 0; i < ROWS; i++) c[i] = v[(int64_t)i * cols + k];
        const int64_t ahead = k + PF < rank ? PF * ldb : 0;  /* a later row's chunk */
        for (int n = 0; n < nv; n += STEP) {
            vf b_lo, b_hi;
            prefetch(Bt, b0 + ahead + n, dt);
            ld2(Bt, b0 + n, &b_lo, &b_hi, dt);
            for (int i = 0; i < ROWS; i++) {
                acc[i][n / VL] += c[i] * b_lo;
                acc[i][n / VL + 1] += c[i] * b_hi;
            }
        }
        for (int n = nv; n < width; n++) {
            const float b = lds(Bt, b0 + n, dt);
            for (int i = 0; i < ROWS; i++) tail[i][n - nv] += c[i] * b;
        }
    }
    for (int i = 0; i < ROWS; i++) {
        const int64_t y0 = (row0 + i) * ldy + col0;
        for (int n = 0; n < nv; n += STEP) {
            vf y_lo, y_hi;
            ld2(y, y0 + n, &y_lo, &y_hi, dt);
            st2(y, y0 + n, y_lo + acc[i][n / VL], y_hi + acc[i][n / VL + 1], dt);
        }
        for (int n = nv; n < width; n++) sts(y, y0 + n, lds(y, y0 + n, dt) + tail[i][n - nv], dt);
    }
}

/* y[row0 + i, col0 + n] += sum_k v[i * cols + k] * Bt[k, n0 + n] for n < STRIP, i < ROWS, with
 * the ROWS x STRIP sums in registers: for segments of many rows, where the FMAs dominate. */
ALWAYS_INLINE void expand_strip(const float *v, int cols, int rank, const void *Bt, int64_t ldb,
                                int n0, void *y, int64_t ldy, int64_t row0, int64_t col0,
                                const int ROWS, const int dt) {
    vf acc[RB][STRIP / VL];
    for (int i = 0; i < ROWS; i++)
        for (int q = 0; q < STRIP / VL; q++) acc[i][q] = (vf){0};
    for (int k = 0; k < rank; k++) {
        vf b[STRIP / VL];
        for (int q = 0; q < STRIP / VL; q += 2)
            ld2(Bt, (int64_t)k * ldb + n0 + q * VL, &b[q], &b[q + 1], dt);
        for (int i = 0; i < ROWS; i++) {
            const vf c = (vf){0} + v[(int64_t)i * cols + k];
            for (int q = 0; q < STRIP / VL; q++) acc[i][q] += c * b[q];
        }
    }
    for (int i = 0; i < ROWS; i++) {
        const int64_t y0 = (row0 + i) * ldy + col0;
        for (int q = 0; q < STRIP / VL; q += 2) {
            vf y_lo, y_hi;
            ld2(y, y0 + q * VL, &y_lo, &y_hi, dt);
            st2(y, y0 + q * VL, y_lo + acc[i][q], y_hi + acc[i][q + 1], dt);
        }
    }
}

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

#include "lora_amx.h"

typedef struct {
    int32_t seg, a, b; /* shrink: row block, A-row block; expand: module, column block */
} item_t;

ALWAYS_INLINE int lora_segments(const void *x, int64_t ldx, void *y, int64_t ldy, int32_t in_dim,
                                int32_t nseg, const int64_t *segs, const int64_t *rec,
                                const float *scales, float *work, int32_t nthreads,
                                int32_t amx_rows, const int dt) {
    int64_t *voff = malloc(sizeof(int64_t) * (nseg + 1));
    char *amx_done = calloc(nseg + 1, 1); /* segments the AMX path applied */
    int64_t n_shrink = 0, n_expand = 0;
    if (!voff || !amx_done) {
        free(amx_done);
        free(voff);
        return -1;
    }
#ifdef HAVE_AMX
    if (dt == 1 && amx_rows > 0 && amx_permitted && in_dim % 32 == 0 &&
        amx_segments(x, ldx, y, ldy, in_dim, nseg, segs, rec, scales, amx_rows, nthreads,
                     amx_done) != 0) {
        free(amx_done);
        free(voff);
        return -1;
    }
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
    item_t *items = malloc(sizeof(item_t) * (n_shrink + n_expand + 1));
    if (!items) {
        free(amx_done);
        free(voff);
        return -1;
    }
    /* cost[i] = what item i reads times (4 + its rows): memory for decode rows, FMAs for
     * long segments. pos[i] = cost of the items before i within its phase. */
    int64_t *pos = malloc(sizeof(int64_t) * (n_shrink + n_expand + 2));
    if (!pos) {
        free(items);
        free(amx_done);
        free(voff);
        return -1;
    }
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

    /* Each thread takes a contiguous run of items of about equal cost: runs follow the
     * weights' memory order, so each thread reads long streams the prefetchers follow. */
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int tid = 0, nt = 1;
#endif
        const int64_t s_begin = first_at(pos, 0, n_shrink, cs * tid / nt);
        const int64_t s_end = tid == nt - 1 ? n_shrink : first_at(pos, 0, n_shrink, cs * (tid + 1) / nt);
        for (int64_t it = s_begin; it < s_end; it++) {
            const item_t t = items[it];
            const int64_t *sg = segs + 3 * t.seg, *rc = rec + REC * t.seg;
            const int rank = (int)sg[2], cols = (int)(rc[1] * rank);
            const int64_t row0 = sg[0] + (int64_t)t.a * RB;
            const int nr = (int)((sg[1] - row0) < RB ? (sg[1] - row0) : RB);
            const int j0 = t.b * JB, j1 = j0 + JB < cols ? j0 + JB : cols;
            float *v = work + voff[t.seg] + (int64_t)t.a * RB * cols;
            const void *A = (const void *)(intptr_t)rc[0];
#define SHRINK(R) shrink_block(x, ldx, row0, A, in_dim, j0, j1, scales[t.seg], v, cols, R, dt)
            BY_ROWS(nr, SHRINK)
#undef SHRINK
        }
#pragma omp barrier
        /* expand item i (i >= n_shrink) starts at cost pos[i + 1] of its phase */
        const int64_t e_begin = first_at(pos + 1, n_shrink, n_shrink + n_expand, ce * tid / nt);
        const int64_t e_end = tid == nt - 1 ? n_shrink + n_expand
                                            : first_at(pos + 1, n_shrink, n_shrink + n_expand,
                                                       ce * (tid + 1) / nt);
        for (int64_t it = e_begin; it < e_end; it++) {
            const item_t t = items[it];
            const int64_t *sg = segs + 3 * t.seg, *rc = rec + REC * t.seg;
            const int rank = (int)sg[2], cols = (int)(rc[1] * rank);
            const int64_t lo = rc[5 + t.a], w = rc[8 + t.a] - lo;
            const int n0 = t.b * CW, width = (int)(n0 + CW < w ? CW : w - n0);
            const void *Bt = (const void *)(intptr_t)rc[2 + t.a];
            /* Many rows: 64-column strips in registers (compute-bound); the rest, and short
             * segments, through the L1-buffer path (memory-bound: Bt read front to back). */
            const int strips = sg[1] - sg[0] >= LONG_ROWS ? width / STRIP : 0;
            for (int st = 0; st < strips; st++) {
                for (int64_t row0 = sg[0]; row0 < sg[1]; row0 += RB) {
                    const int nr = (int)((sg[1] - row0) < RB ? (sg[1] - row0) : RB);
                    const float *v = work + voff[t.seg] + (row0 - sg[0]) * cols + t.a * rank;
                    const int c0 = n0 + st * STRIP;
#define STRIPS(R) expand_strip(v, cols, rank, Bt, w, c0, y, ldy, row0, lo + c0, R, dt)
                    BY_ROWS(nr, STRIPS)
#undef STRIPS
                }
            }
            const int done = strips * STRIP;
            if (done == width) continue;
            for (int64_t row0 = sg[0]; row0 < sg[1]; row0 += RB) {
                const int nr = (int)((sg[1] - row0) < RB ? (sg[1] - row0) : RB);
                const float *v = work + voff[t.seg] + (row0 - sg[0]) * cols + t.a * rank;
#define EXPAND(R) \
    expand_block(v, cols, rank, Bt, w, n0 + done, width - done, y, ldy, row0, lo + n0 + done, R, dt)
                BY_ROWS(nr, EXPAND)
#undef EXPAND
            }
        }
    }
    free(pos);
    free(items);
    free(amx_done);
    free(voff);
    return 0;
}

int lora_segments_f32(const void *x, int64_t ldx, void *y, int64_t ldy, int32_t in_dim,
                      int32_t nseg, const int64_t *segs, const int64_t *rec, const float *scales,
                      float *work, int32_t nthreads, int32_t amx_rows) {
    return lora_segments(x, ldx, y, ldy, in_dim, nseg, segs, rec, scales, work, nthreads,
                         amx_rows, 0);
}

int lora_segments_bf16(const void *x, int64_t ldx, void *y, int64_t ldy, int32_t in_dim,
                      int32_t nseg, const int64_t *segs, const int64_t *rec, const float *scales,
                      float *work, int32_t nthreads, int32_t amx_rows) {
    return lora_segments(x, ldx, y, ldy, in_dim, nseg, segs, rec, scales, work, nthreads,
                         amx_rows, 1);
}
