/* Vector building blocks of the CPU LoRA kernel (lora_cpu.c): the register-blocked shrink and
 * expand of up to RB rows (the loads, stores and vector types are kernels/cpu_common.h's).
 * Included by lora_cpu.c, which holds the contract and splits the work between threads.
 * Arithmetic is float32 whatever the storage type; rows are independent lanes (a row's result
 * does not depend on the other rows of its block). */
#include "cpu_common.h"

#define STEP 32    /* elements per step: two vectors */
#define RB 4       /* rows per register block */
#define JB 16      /* A rows per shrink item */
#define CW 512     /* output columns per expand item (a multiple of STEP) */
#define PF 2       /* expand: prefetch the chunk this many rows of Bt ahead */
#define STRIP 64   /* expand of long segments: output columns held in registers */
#define LONG_ROWS 8 /* segments of at least this many rows use the register strips */

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
        for (int i = 0; i < ROWS; i++) {
            const float vk = v[(int64_t)i * cols + k];
            c[i] = dt == 1 ? to_bf16(vk) : vk;
        }
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
            const float vk = v[(int64_t)i * cols + k];
            const vf c = (vf){0} + (dt == 1 ? to_bf16(vk) : vk);
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

#if defined(__AVX512BF16__)

/* p[0:16] = bf16(p[0:16] + s), rounded to nearest even as round_bf16 does, except that
 * vcvtneps2bf16 flushes denormals to zero (as vdpbf16ps does with its inputs). */
ALWAYS_INLINE void add_to_bf16(uint16_t *p, __m512 s) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)p);
    const __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(f, s)));
}

/* v[i * cols + k] and v[i * cols + k + 1] rounded to bfloat16, as one 32-bit pair (low half k;
 * the second is 0 when k + 1 == rank), broadcast to 16 lanes. */
ALWAYS_INLINE __m512bh v_pair(const float *v, int64_t i, int cols, int k, int rank) {
    const float lo = v[i * cols + k], hi = k + 1 < rank ? v[i * cols + k + 1] : 0.f;
    const __m128bh p = _mm_cvtneps_pbh(_mm_setr_ps(lo, hi, 0.f, 0.f));
    uint32_t u;
    memcpy(&u, &p, sizeof u);
    return (__m512bh)_mm512_set1_epi32((int)u);
}

/* bfloat16 y[row0 + i, col0 + n] += sum_k bf16(v[i * cols + k]) * Bt[k, n0 + n] for n < width,
 * i < ROWS, two rows of Bt per instruction: rows k and k + 1 (32 columns each) interleave into
 * pairs (vpunpck{l,h}wd), and one vdpbf16ps per 16 columns and row adds both products (exact,
 * float32 sums). Per 128-bit lane, the low unpack holds columns 8L..8L+3 and the high one
 * 8L+4..8L+7; the sums stay in an L1 buffer in that order and are put back in order once, when y
 * is updated. Bt's rows are read front to back, four at a time (the reads a row of Bt costs are
 * what bounds decode, so this path keeps few instructions per cache line). */
ALWAYS_INLINE void expand_pairs(const float *v, int cols, int rank, const uint16_t *Bt,
                                int64_t ldb, int n0, int width, uint16_t *y, int64_t ldy,
                                int64_t row0, int64_t col0, const int ROWS) {
    __m512 acc[RB][CW / VL];
    const int nv = width / STEP * STEP;
    float tail[RB][STEP];
    for (int i = 0; i < ROWS; i++) {
        for (int q = 0; q < nv / VL; q++) acc[i][q] = _mm512_setzero_ps();
        for (int n = 0; n < width - nv; n++) tail[i][n] = 0.f;
    }
    const __m512i zero = _mm512_setzero_si512();
    for (int k = 0; k < rank; k += 4) {
        const int nk = rank - k < 4 ? rank - k : 4; /* rows of Bt in this pass */
        const uint16_t *b0 = Bt + (int64_t)k * ldb + n0, *b1 = b0 + ldb, *b2 = b1 + ldb,
                       *b3 = b2 + ldb;
        __m512bh c0[RB], c1[RB];
        for (int i = 0; i < ROWS; i++) {
            c0[i] = v_pair(v, i, cols, k, rank);
            c1[i] = nk > 2 ? v_pair(v, i, cols, k + 2, rank) : (__m512bh)zero;
        }
        const int64_t ahead = k + 4 < rank ? 4 * ldb : 0; /* the next pass's rows */
        for (int n = 0; n < nv; n += STEP) {
            _mm_prefetch((const char *)(b0 + ahead + n), _MM_HINT_T0);
            _mm_prefetch((const char *)(b1 + ahead + n), _MM_HINT_T0);
            _mm_prefetch((const char *)(b2 + ahead + n), _MM_HINT_T0);
            _mm_prefetch((const char *)(b3 + ahead + n), _MM_HINT_T0);
            const __m512i r0 = _mm512_loadu_si512(b0 + n);
            const __m512i r1 = nk > 1 ? _mm512_loadu_si512(b1 + n) : zero;
            const __m512i r2 = nk > 2 ? _mm512_loadu_si512(b2 + n) : zero;
            const __m512i r3 = nk > 3 ? _mm512_loadu_si512(b3 + n) : zero;
            const __m512bh p_lo = (__m512bh)_mm512_unpacklo_epi16(r0, r1);
            const __m512bh p_hi = (__m512bh)_mm512_unpackhi_epi16(r0, r1);
            const __m512bh q_lo = (__m512bh)_mm512_unpacklo_epi16(r2, r3);
            const __m512bh q_hi = (__m512bh)_mm512_unpackhi_epi16(r2, r3);
            for (int i = 0; i < ROWS; i++) {
                __m512 a_lo = _mm512_dpbf16_ps(acc[i][n / VL], p_lo, c0[i]);
                __m512 a_hi = _mm512_dpbf16_ps(acc[i][n / VL + 1], p_hi, c0[i]);
                acc[i][n / VL] = _mm512_dpbf16_ps(a_lo, q_lo, c1[i]);
                acc[i][n / VL + 1] = _mm512_dpbf16_ps(a_hi, q_hi, c1[i]);
            }
        }
        for (int n = nv; n < width; n++)
            for (int i = 0; i < ROWS; i++)
                for (int t = 0; t < nk; t++)
                    tail[i][n - nv] += to_bf16(v[(int64_t)i * cols + k + t]) *
                                       lds(Bt, (int64_t)(k + t) * ldb + n0 + n, 1);
    }
    /* columns back in order: of 32, column 8L + j is lo[4L + j] (j < 4), else hi[4L + j - 4] */
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int i = 0; i < ROWS; i++) {
        uint16_t *yr = y + (row0 + i) * ldy + col0;
        for (int n = 0; n < nv; n += STEP) {
            const __m512 lo = acc[i][n / VL], hi = acc[i][n / VL + 1];
            add_to_bf16(yr + n, _mm512_permutex2var_ps(lo, first, hi));
            add_to_bf16(yr + n + VL, _mm512_permutex2var_ps(lo, second, hi));
        }
        for (int n = nv; n < width; n++) sts(yr, n, lds(yr, n, 1) + tail[i][n - nv], 1);
    }
}
#endif
