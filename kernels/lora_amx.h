/* AMX path of the CPU LoRA kernel for long bfloat16 segments (prefill chunks), included by
 * lora_cpu.c (which holds the contract: same segments, records and effect).
 *
 * Why: a segment of many rows is compute-bound, and AMX tiles (TDPBF16PS: 16x16 float32 sums of
 * 16x32 by 32x16 bfloat16 products per instruction) do its GEMMs several times faster than
 * AVX-512 dot products. Decode-sized segments stay on the vector path (memory-bound there).
 *
 * Per long segment, in row pieces of at most PIECE rows (Mp = rows rounded up to 16):
 *   xp   [K/2, Mp] 32-bit pairs (x^T in AMX's pair layout, zero past the last row)
 *   v^T = A_cat [C, K] . x^T             A_cat tiles load straight from the pool (row-major)
 *   v    [Mp, nmod, Rp] bfloat16 = round(scale * v^T)^T, zero past rank (Rp = rank up to 32)
 *   bp_m [Rp/2, Wp] pairs = Bt_m [rank, w], rows 2kk and 2kk+1 interleaved (once per segment)
 *   y[rows, lo_m + n] += v_m . Bt_m      one item = one 16-row tile x one module, all columns
 * Numerics: x, A_cat and Bt are bfloat16 already; the shrink sums in float32 and v is rounded
 * once to bfloat16 (as the torch path's bf16 matmul does); the expand sums in float32 and y is
 * rounded once. A row's result depends only on that row (padding rows are zeros).
 * Needs K % 32 == 0 (A_cat tiles read 32 columns at a time); the caller checks.
 */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PIECE 256 /* rows per piece: bounds the packed x and v scratch */
#define MG 4      /* row tiles accumulated at once (tiles 2..5) */

static int amx_permitted = 0;

/* Linux hands out AMX state per process on request; 1 when granted. */
int lora_amx_init(void) {
    if (!amx_permitted) amx_permitted = syscall(SYS_arch_prctl, 0x1023 /* REQ_XCOMP_PERM */,
                                                18 /* XTILEDATA */) == 0;
    return amx_permitted;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg_t;

/* Every tile 16 rows x 64 bytes: 16 float32 sums, 32 bfloat16 or 16 pairs per row. */
static void amx_configure(void) {
    tilecfg_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* float32 -> bfloat16 bits, round to nearest even; NaN stays a quiet NaN (as round_bf16). */
static inline uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)((u | 0x400000u) >> 16);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static __thread kept_t amx_block; /* the call's scratch (kept() of lora_cpu.c) */

/* r[i] (16 dwords each) := column i of the 16 x 16 dword matrix the rows r[0..15] form:
 * pairs within 128-bit lanes, then 4 x 4 blocks within lanes, then the lanes themselves. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* u[i + c], lane L: rows i..i+3 of column 4L + c */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i x0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
        const __m512i x1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        const __m512i y0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        const __m512i y1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(x0, y0, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xDD);
    }
}

typedef struct {
    int32_t seg, row0, rows, mp; /* piece of a segment: rows [row0, row0 + rows) */
    int64_t xp_off, v_off;       /* element offsets into the scratch arrays */
} piece_t;

/* C[i] (tiles 2 + i, i < nm) = sum over kb < nk of tile(a + kb * a_step) . tile(b_i + kb * b_step)
 * where b_i = b + i * b_next: one A tile shared by nm B tiles per step. */
#define AMX_ACC(I, T)                                           \
    if (nm > I) {                                               \
        _tile_loadd(1, b + I * b_next + kb * b_step, b_stride); \
        _tile_dpbf16ps(T, 0, 1);                                \
    }
static inline void amx_row_of_tiles(const char *a, int64_t a_stride, int64_t a_step,
                                    const char *b, int64_t b_stride, int64_t b_step,
                                    int64_t b_next, int nk, int nm, float out[MG][256]) {
    _tile_zero(2);
    _tile_zero(3);
    _tile_zero(4);
    _tile_zero(5);
    for (int kb = 0; kb < nk; kb++) {
        _tile_loadd(0, a + kb * a_step, a_stride);
        AMX_ACC(0, 2) /* tile numbers are part of the instruction: literals */
        AMX_ACC(1, 3)
        AMX_ACC(2, 4)
        AMX_ACC(3, 5)
    }
    _tile_stored(2, out[0], 64);
    if (nm > 1) _tile_stored(3, out[1], 64);
    if (nm > 2) _tile_stored(4, out[2], 64);
    if (nm > 3) _tile_stored(5, out[3], 64);
}
#undef AMX_ACC

/* Shrink of one piece, A_cat rows [c0, c0 + 16) (rows past C read from a zeroed copy):
 * v[m, j, k] = bf16(scale * A_cat[c] . x[row0 + m]) for c = j * rank + k. */
static void amx_shrink(const piece_t *p, const uint32_t *xp, uint16_t *v, const uint16_t *A,
                       int K, int C, int rank, int nmod, int rp, float scale, int c0,
                       uint16_t *a_tail) {
    const uint16_t *a = A + (int64_t)c0 * K;
    if (c0 + 16 > C) { /* the last, partial block: copy it next to zero rows */
        memset(a_tail, 0, (size_t)16 * K * 2);
        memcpy(a_tail, a, (size_t)(C - c0) * K * 2);
        a = a_tail;
    }
    float out[MG][256] __attribute__((aligned(64)));
    for (int mb = 0; mb < p->mp / 16; mb += MG) {
        const int nm = p->mp / 16 - mb < MG ? p->mp / 16 - mb : MG;
        amx_row_of_tiles((const char *)a, (int64_t)K * 2, 64,
                         (const char *)(xp + mb * 16), (int64_t)p->mp * 4,
                         (int64_t)16 * p->mp * 4, 64, K / 32, nm, out);
        for (int i = 0; i < nm; i++) {
            __m512i r[16]; /* out[i] is [16 A rows c][16 x rows m]: transpose to rows m */
            for (int c = 0; c < 16; c++) r[c] = _mm512_load_si512(out[i] + c * 16);
            transpose16(r);
            for (int m = 0; m < 16; m++) {
                const int64_t row = (int64_t)(mb + i) * 16 + m;
                const __m256i b = (__m256i)_mm512_cvtneps_pbh(
                    _mm512_mul_ps(_mm512_castsi512_ps(r[m]), _mm512_set1_ps(scale)));
                /* lanes c - c0 of module j go to v[row, j, k]: one run per module the block
                 * touches (a single run when the rank is a multiple of 16) */
                for (int c = c0; c < C && c < c0 + 16;) {
                    const int j = c / rank, k = c % rank;
                    const int len = C - c < rank - k ? C - c : rank - k;
                    const int n = c0 + 16 - c < len ? c0 + 16 - c : len, a = c - c0;
                    /* lane a lands on k: the base sits a elements before it (masked lanes
                     * are not touched) */
                    _mm256_mask_storeu_epi16(v + (row * nmod + j) * rp + k - a,
                                             (__mmask16)(((1u << n) - 1) << a), b);
                    c += n;
                }
            }
        }
    }
}

/* bp [rp / 2, wp] pairs := Bt [rank, w] with rows 2kk and 2kk + 1 interleaved (AMX's pair
 * layout for the right operand); zeros past rank and past w (wp = w rounded up to 16). */
static void amx_pack_b(const uint16_t *Bt, int rank, int64_t w, int rp, int64_t wp, uint32_t *bp) {
    /* word 2n of a pair row is row 2kk's column n, word 2n + 1 row 2kk + 1's: columns 0..15
     * of the two rows' 32, then 16..31 */
    static const uint16_t order[32] = {0, 32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                       37, 6, 38, 7,  39, 8,  40, 9,  41, 10, 42,
                                       11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i lo = _mm512_loadu_si512(order);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    const int64_t nv = w / 32 * 32;
    for (int kk = 0; kk < rp / 2; kk++) {
        uint32_t *d = bp + kk * wp;
        const int k = 2 * kk;
        if (k >= rank) {
            memset(d, 0, (size_t)wp * 4);
            continue;
        }
        const uint16_t *e = Bt + k * w, *o = k + 1 < rank ? e + w : NULL;
        for (int64_t n = 0; n < nv; n += 32) {
            const __m512i re = _mm512_loadu_si512(e + n);
            const __m512i ro = o ? _mm512_loadu_si512(o + n) : _mm512_setzero_si512();
            _mm512_storeu_si512(d + n, _mm512_permutex2var_epi16(re, lo, ro));
            _mm512_storeu_si512(d + n + 16, _mm512_permutex2var_epi16(re, hi, ro));
        }
        for (int64_t n = nv; n < w; n++) d[n] = (uint32_t)e[n] | (o ? (uint32_t)o[n] << 16 : 0u);
        memset(d + w, 0, (size_t)(wp - w) * 4);
    }
}

/* Expand of one piece's row tile mb (16 rows) for module j, all its w columns, left to right
 * (each y row is read and written as one stream): y[row, lo + n] += sum_k v[m, j, k] Bt[k, n]. */
static void amx_expand(const piece_t *p, int mb, const uint16_t *v, int nmod, int j, int rp,
                       const uint32_t *bp, int64_t w, uint16_t *y, int64_t ldy, int64_t lo) {
    const int64_t wp = (w + 15) / 16 * 16;
    const uint16_t *a = v + ((int64_t)mb * 16 * nmod + j) * rp;
    const int rows = p->rows - mb * 16 < 16 ? p->rows - mb * 16 : 16;
    float out[MG][256] __attribute__((aligned(64)));
    for (int nb = 0; nb < wp / 16; nb += MG) {
        const int nm = wp / 16 - nb < MG ? (int)(wp / 16 - nb) : MG;
        amx_row_of_tiles((const char *)a, (int64_t)nmod * rp * 2, 64, (const char *)(bp + nb * 16),
                         wp * 4, 16 * wp * 4, 64, rp / 32, nm, out);
        for (int m = 0; m < rows; m++) {
            uint16_t *yr = y + (p->row0 + mb * 16 + m) * ldy + lo;
            for (int i = 0; i < nm; i++) {
                const int64_t n0 = (int64_t)(nb + i) * 16;
                const float *o = out[i] + m * 16;
                if (n0 + 16 <= w) { /* a whole tile row: 16 columns at once */
                    __m256i yb = _mm256_loadu_si256((const __m256i *)(yr + n0));
                    __m512 yf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(yb), 16));
                    __m256bh r = _mm512_cvtneps_pbh(_mm512_add_ps(yf, _mm512_load_ps(o)));
                    _mm256_storeu_si256((__m256i *)(yr + n0), (__m256i)r);
                } else {
                    for (int64_t n = n0; n < w; n++)
                        yr[n] = bf16_bits(bf16_float(yr[n]) + o[n - n0]);
                }
            }
        }
    }
}

/* Every segment with rows >= amx_rows (bfloat16, K % 32 == 0; amx_permitted): applied here;
 * done[s] is set for them so the vector path skips them. 0, or -1 when out of memory.
 * One OpenMP region, three phases: pack (x^T per row tile, B per segment and module), shrink
 * (piece, A-row block), expand (piece, row tile, module). */
static int amx_segments(const uint16_t *x, int64_t ldx, uint16_t *y, int64_t ldy, int K,
                        int nseg, const int64_t *segs, const int64_t *rec, const float *scales,
                        int amx_rows, int nthreads, char *done) {
    int npieces = 0;
    for (int s = 0; s < nseg; s++) {
        const int64_t rows = segs[3 * s + 1] - segs[3 * s];
        done[s] = rows >= amx_rows && rec[REC * s + 1] > 0;
        if (done[s]) npieces += (int)((rows + PIECE - 1) / PIECE);
    }
    if (npieces == 0) return 0;
    piece_t *pieces = malloc(sizeof(piece_t) * npieces);
    int64_t *bp_off = malloc(sizeof(int64_t) * 3 * nseg); /* [s][m]: packed B, in pairs */
    int64_t xp_n = 0, v_n = 0, bp_n = 0;
    int n = 0, n_bpack = 0, n_shrink = 0, n_expand = 0;
    for (int s = 0; s < nseg && pieces && bp_off; s++) {
        if (!done[s]) continue;
        const int rank = (int)segs[3 * s + 2], nmod = (int)rec[REC * s + 1];
        const int rp = (rank + 31) / 32 * 32;
        for (int m = 0; m < nmod; m++) {
            const int64_t w = rec[REC * s + 8 + m] - rec[REC * s + 5 + m];
            bp_off[3 * s + m] = bp_n;
            bp_n += rp / 2 * ((w + 15) / 16 * 16);
            n_bpack++;
        }
        for (int64_t r0 = segs[3 * s]; r0 < segs[3 * s + 1]; r0 += PIECE) {
            const int rows = (int)(segs[3 * s + 1] - r0 < PIECE ? segs[3 * s + 1] - r0 : PIECE);
            const int mp = (rows + 15) / 16 * 16;
            pieces[n++] = (piece_t){s, (int32_t)r0, rows, mp, xp_n, v_n};
            xp_n += (int64_t)mp * K / 2;
            v_n += (int64_t)mp * nmod * rp;
            n_shrink += (nmod * rank + 15) / 16;
            n_expand += mp / 16 * nmod;
        }
    }
    const int n_xpack = n * (PIECE / 16);
    int32_t(*items)[3] = malloc(sizeof(int32_t[3]) * (n_bpack + n_shrink + n_expand + 1));
    /* one scratch block, kept between calls: xp | bp | v | per-thread a_tail (uint16 units) */
    const int64_t n16 = 2 * xp_n + 2 * bp_n + v_n + (int64_t)16 * K * nthreads; /* uint16s */
    uint16_t *xp16 = kept(&amx_block, (size_t)n16 * 2);
    int rc = 0;
    if (!pieces || !bp_off || !items || !xp16) {
        rc = -1;
        goto out;
    }
    uint32_t *xp = (uint32_t *)xp16, *bp = xp + xp_n;
    uint16_t *v = (uint16_t *)(bp + bp_n), *a_tails = v + v_n;
    memset(v, 0, (size_t)v_n * 2); /* padding past rank must be zeros */
    int ib = 0, is = n_bpack, ie = n_bpack + n_shrink;
    for (int s = 0; s < nseg; s++)
        for (int m = 0; done[s] && m < rec[REC * s + 1]; m++) {
            items[ib][0] = s, items[ib][1] = m, items[ib][2] = 0;
            ib++;
        }
    for (int i = 0; i < n; i++) {
        const int s = pieces[i].seg, rank = (int)segs[3 * s + 2], nmod = (int)rec[REC * s + 1];
        for (int c = 0; c < (nmod * rank + 15) / 16; c++) {
            items[is][0] = i, items[is][1] = c, items[is][2] = 0;
            is++;
        }
        for (int mb = 0; mb < pieces[i].mp / 16; mb++)
            for (int m = 0; m < nmod; m++) {
                items[ie][0] = i, items[ie][1] = mb, items[ie][2] = m;
                ie++;
            }
    }
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        uint16_t *a_tail = a_tails + (int64_t)16 * K * tid;
        amx_configure();
#pragma omp for schedule(dynamic)
        for (int t = 0; t < n_xpack + n_bpack; t++) {
            if (t >= n_xpack) { /* B of one segment and module */
                const int s = items[t - n_xpack][0], m = items[t - n_xpack][1];
                const int rank = (int)segs[3 * s + 2], rp = (rank + 31) / 32 * 32;
                const int64_t w = rec[REC * s + 8 + m] - rec[REC * s + 5 + m];
                amx_pack_b((const uint16_t *)(intptr_t)rec[REC * s + 2 + m], rank, w, rp,
                           (w + 15) / 16 * 16, bp + bp_off[3 * s + m]);
                continue;
            }
            const piece_t *p = &pieces[t / (PIECE / 16)]; /* x^T in pairs, zero past the rows */
            const int mb = t % (PIECE / 16) * 16;
            if (mb >= p->mp) continue;
            for (int kb = 0; kb < K / 2; kb += 16) {
                __m512i r[16];
                for (int m = 0; m < 16; m++)
                    r[m] = mb + m < p->rows
                               ? _mm512_loadu_si512(x + (int64_t)(p->row0 + mb + m) * ldx + 2 * kb)
                               : _mm512_setzero_si512();
                transpose16(r);
                for (int k = 0; k < 16; k++)
                    _mm512_storeu_si512(xp + p->xp_off + (int64_t)(kb + k) * p->mp + mb, r[k]);
            }
        }
#pragma omp for schedule(dynamic)
        for (int it = n_bpack; it < n_bpack + n_shrink; it++) {
            const piece_t *p = &pieces[items[it][0]];
            const int s = p->seg, rank = (int)segs[3 * s + 2], nmod = (int)rec[REC * s + 1];
            const int rp = (rank + 31) / 32 * 32;
            amx_shrink(p, xp + p->xp_off, v + p->v_off, (const uint16_t *)(intptr_t)rec[REC * s],
                       K, nmod * rank, rank, nmod, rp, scales[s], items[it][1] * 16, a_tail);
        }
#pragma omp for schedule(dynamic)
        for (int it = n_bpack + n_shrink; it < n_bpack + n_shrink + n_expand; it++) {
            const piece_t *p = &pieces[items[it][0]];
            const int s = p->seg, rank = (int)segs[3 * s + 2], nmod = (int)rec[REC * s + 1];
            const int mb = items[it][1], m = items[it][2], rp = (rank + 31) / 32 * 32;
            const int64_t lo = rec[REC * s + 5 + m], w = rec[REC * s + 8 + m] - lo;
            amx_expand(p, mb, v + p->v_off, nmod, m, rp, bp + bp_off[3 * s + m], w, y, ldy, lo);
        }
        _tile_release();
    }
out:
    free(items);
    free(bp_off);
    free(pieces);
    return rc;
}
#else
int lora_amx_init(void) { return 0; }
#endif
