/* RMSNorm (optionally after the residual add) and rotary embeddings for the CPU, one call per
 * use for all the step's tokens. The torch path (engine/layers.py: rms_norm, apply_rotary)
 * spends ~7 small ops per RMSNorm and ~6 per rotary, each with its own pass and allocation; at
 * decode sizes (16 rows of 512) those op overheads are most of their time. Built into one library
 * with the other CPU kernels (kernels/cpu_build.py), called by kernels/norm_rope_cpu.py, and
 * tested against the torch functions in tests/test_norm_rope_cpu.py.
 *
 * Numerics follow the torch functions (dtype 0 = float32, 1 = bfloat16):
 *   rms_norm: r = 1 / sqrt(mean(x^2) + eps) in float32, out = w * to_dtype(x * r), the product
 *     rounded to the dtype. Only the sum of squares runs in another order than torch's.
 *   add: h = to_dtype(h + d) first, in place (torch's `h + d`), then rms_norm of the new h.
 *   rotary (HF's rotate_half): for i < D/2, x1 = x[i], x2 = x[i + D/2]:
 *     out[i] = to_dtype(to_dtype(x1 c[i]) - to_dtype(x2 s[i])),
 *     out[i + D/2] = to_dtype(to_dtype(x2 c[i + D/2]) + to_dtype(x1 s[i + D/2])),
 *     in place; c, s are the rows of the cos / sin tables (dtype) at each token's position.
 *     Results equal torch's exactly.
 * A row's result depends only on that row. Rows are split between threads only when there are
 * enough of them to pay for the OpenMP region.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Products are rounded before they are added, as torch does (no fused multiply-add). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "cpu_common.h"

#define PAR_ROWS 64 /* fewer rows run on the calling thread */

/* A float vector rounded to the dtype and widened back (identity for float32). */
ALWAYS_INLINE vf rnd(vf v, const int dt) {
    if (dt == 0) return v;
    vu u = round_bf16(v);
    memcpy(&v, &u, sizeof v);
    return v;
}

ALWAYS_INLINE float rnds(float f, const int dt) { return dt == 0 ? f : to_bf16(f); }

/* Optionally h += d (rounded, stored back into h), then out = rms_norm(h) for one row. */
ALWAYS_INLINE void norm_row(void *h, const void *d, const void *w, void *out, int64_t dim,
                            float eps, const int dt) {
    vf acc = {0};
    float tail = 0.0f;
    int64_t i = 0;
    for (; i + 2 * VL <= dim; i += 2 * VL) {
        vf a, b;
        ld2(h, i, &a, &b, dt);
        if (d) {
            vf da, db;
            ld2(d, i, &da, &db, dt);
            a = rnd(a + da, dt);
            b = rnd(b + db, dt);
            st2(h, i, a, b, dt);
        }
        acc += a * a;
        acc += b * b;
    }
    for (; i < dim; i++) {
        float a = lds(h, i, dt);
        if (d) {
            a = rnds(a + lds(d, i, dt), dt);
            sts(h, i, a, dt);
        }
        tail += a * a;
    }
    const float r = 1.0f / sqrtf((hsum(acc) + tail) / (float)dim + eps);
    for (i = 0; i + 2 * VL <= dim; i += 2 * VL) {
        vf a, b, wa, wb;
        ld2(h, i, &a, &b, dt);
        ld2(w, i, &wa, &wb, dt);
        st2(out, i, wa * rnd(a * r, dt), wb * rnd(b * r, dt), dt);
    }
    for (; i < dim; i++) sts(out, i, lds(w, i, dt) * rnds(lds(h, i, dt) * r, dt), dt);
}

static void rms_norm(void *h, int64_t ldh, const void *d, int64_t ldd, const void *w, void *out,
                     int64_t ldo, int64_t rows, int64_t dim, float eps, int32_t nthreads,
                     const int dt) {
    const int64_t es = dt == 0 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && rows >= PAR_ROWS)
    for (int64_t t = 0; t < rows; t++) {
        norm_row((char *)h + t * ldh * es, d ? (const char *)d + t * ldd * es : NULL, w,
                 (char *)out + t * ldo * es, dim, eps, dt);
    }
}

/* One head of one token, in place: half = D / 2 elements per side. */
ALWAYS_INLINE void rope_head(void *x, const void *c, const void *s, int64_t half, const int dt) {
    const int64_t off = half * (dt == 0 ? 4 : 2); /* bytes to the second half */
    char *x2p = (char *)x + off;
    const char *c2 = (const char *)c + off, *s2 = (const char *)s + off;
    int64_t i = 0;
    for (; i + 2 * VL <= half; i += 2 * VL) {
        vf x1a, x1b, x2a, x2b, ca, cb, sa, sb, c2a, c2b, s2a, s2b;
        ld2(x, i, &x1a, &x1b, dt);
        ld2(x2p, i, &x2a, &x2b, dt);
        ld2(c, i, &ca, &cb, dt);
        ld2(s, i, &sa, &sb, dt);
        ld2(c2, i, &c2a, &c2b, dt);
        ld2(s2, i, &s2a, &s2b, dt);
        st2(x, i, rnd(x1a * ca, dt) - rnd(x2a * sa, dt), rnd(x1b * cb, dt) - rnd(x2b * sb, dt),
            dt);
        st2(x2p, i, rnd(x2a * c2a, dt) + rnd(x1a * s2a, dt),
            rnd(x2b * c2b, dt) + rnd(x1b * s2b, dt), dt);
    }
    for (; i < half; i++) {
        const float x1 = lds(x, i, dt), x2 = lds(x2p, i, dt);
        sts(x, i, rnds(x1 * lds(c, i, dt), dt) - rnds(x2 * lds(s, i, dt), dt), dt);
        sts(x2p, i, rnds(x2 * lds(c2, i, dt), dt) + rnds(x1 * lds(s2, i, dt), dt), dt);
    }
}

/* x [rows, ldx]: heads [heads, D] contiguous from each row's start; positions [rows] int64
 * index the [*, D] cos / sin tables. */
static void rotary(void *x, int64_t ldx, const int64_t *positions, const void *cos_t,
                   const void *sin_t, int64_t rows, int32_t heads, int32_t D, int32_t nthreads,
                   const int dt) {
    const int64_t es = dt == 0 ? 4 : 2;
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && rows >= PAR_ROWS)
    for (int64_t t = 0; t < rows; t++) {
        const char *c = (const char *)cos_t + positions[t] * D * es;
        const char *s = (const char *)sin_t + positions[t] * D * es;
        for (int32_t hd = 0; hd < heads; hd++)
            rope_head((char *)x + (t * ldx + (int64_t)hd * D) * es, c, s, D / 2, dt);
    }
}

/* d may be NULL (no residual add). */
void rms_norm_f32(void *h, int64_t ldh, const void *d, int64_t ldd, const void *w, void *out,
                  int64_t ldo, int64_t rows, int64_t dim, float eps, int32_t nthreads) {
    rms_norm(h, ldh, d, ldd, w, out, ldo, rows, dim, eps, nthreads, 0);
}

void rms_norm_bf16(void *h, int64_t ldh, const void *d, int64_t ldd, const void *w, void *out,
                   int64_t ldo, int64_t rows, int64_t dim, float eps, int32_t nthreads) {
    rms_norm(h, ldh, d, ldd, w, out, ldo, rows, dim, eps, nthreads, 1);
}

void rotary_f32(void *x, int64_t ldx, const int64_t *positions, const void *cos_t,
                const void *sin_t, int64_t rows, int32_t heads, int32_t D, int32_t nthreads) {
    rotary(x, ldx, positions, cos_t, sin_t, rows, heads, D, nthreads, 0);
}

void rotary_bf16(void *x, int64_t ldx, const int64_t *positions, const void *cos_t,
                 const void *sin_t, int64_t rows, int32_t heads, int32_t D, int32_t nthreads) {
    rotary(x, ldx, positions, cos_t, sin_t, rows, heads, D, nthreads, 1);
}
