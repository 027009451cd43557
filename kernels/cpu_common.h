/* Helpers shared by the CPU kernels (lora_cpu.c, attention_cpu.c): float32 vectors, loads and
 * stores of float32 or bfloat16 as float32 vectors, and per-thread scratch blocks. */
#ifndef LORAPLEX_CPU_COMMON_H
#define LORAPLEX_CPU_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#define VL 16 /* floats per vector */

typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* 32 elements from p + i as two float vectors. float32: elements [0, 16) and [16, 32).
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

/* f rounded to bfloat16 (as round_bf16), back as a float: v before a bfloat16 expand. */
ALWAYS_INLINE float to_bf16(float f) {
    const uint32_t u = round_bf16((vf){0} + f)[0];
    memcpy(&f, &u, sizeof f);
    return f;
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

/* Ask for the cache lines of 32 elements at p + i (rows of Bt are strided chunks, which the
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

/* A grow-only block owned by the calling thread and kept between calls, so a call's scratch
 * costs no allocation and no fresh pages (the engine steps on one long-lived thread; a thread's
 * blocks are not freed when it exits). 64-byte aligned; NULL when out of memory. */
typedef struct {
    void *p;
    size_t n;
} kept_t;

static void *kept(kept_t *k, size_t n) {
    if (n > k->n) {
        free(k->p);
        k->n = 0;
        const size_t size = (n + n / 2 + 4095) / 4096 * 4096;
        k->p = aligned_alloc(64, size);
        if (k->p) k->n = size;
    }
    return k->p;
}

#endif
