/* y (m, n) = x (m, k) @ dequantized(w).T from 4-bit codes, each weight decoded once per tile.
 *
 * The weight is an Int4Weight in the CPU layout of `block`-row blocks (kernels/int4.py): within a
 * block, for each k, block / 2 bytes whose low nibble is row j's code and high nibble row
 * j + block / 2's; value = (code - 8) * scale + zero, scale and zero per group of `group` input
 * values, stored (k / group, rows, 2) as float32 or bf16 (the dtype of the activations).
 *
 * Three paths, chosen by the caller from what the CPU has:
 *   FG_AVX2_F32   32- or 64-row blocks, float32 activations, 8-wide FMA (x86-64 with AVX2 + FMA);
 *   FG_AVX512_F32 64-row blocks, float32 activations, 16-wide FMA;
 *   FG_AVX512_BF16 64-row blocks, bf16 activations: a chunk of the block is decoded once into
 *                 bf16 pairs in L1 and every row of x is multiplied with it by vdpbf16ps.
 *   FG_AVX512_BF16_FOLD  the same for one or two rows of x, decoding without the scales.
 *   FG_AMX_BF16   64-row blocks, bf16 activations, k a multiple of 32: the whole block is decoded
 *                 once into bf16 pairs (k * 128 bytes, in L2) and multiplied with 16 rows of x at
 *                 a time by AMX tile products (Linux grants the tile state to the process first).
 * The F32 paths decode the block's codes afresh for every MR rows of x: with few rows (a decode
 * step) the codes are read once anyway and the decode is cheaper than a store and reload.
 * Output is float32 (m, n) with row stride n; rows of the weight past n (padding) are skipped.
 * Threads (OpenMP: the runtime PyTorch itself loaded) split the blocks.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

enum { FG_AVX2_F32 = 0, FG_AVX512_F32 = 1, FG_AVX512_BF16 = 2, FG_AVX512_BF16_FOLD = 3, FG_AMX_BF16 = 4 };
enum { FG_OK = 0, FG_BAD_ARGS = 1, FG_NO_MEMORY = 2 };

#define MR 4        /* rows of x per pass of the F32 paths */
#define MR_BF16 6   /* rows of x per pass of the bf16 microkernel (24 accumulators) */
/* Codes are read 64 bytes per pair of inputs; the decode is slow enough that the hardware
 * prefetcher alone leaves the loads waiting on memory (measured: a weight streamed from memory
 * took 2.3x one in cache on a Xeon with AMX), so each pass asks for the codes 2 KiB ahead. */
#define PREFETCH_K 64
#define KC 128      /* input values per decoded chunk of the bf16 path: 64 rows x 128 bf16 = 16 KiB */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Per-thread scratch, grown as needed and kept: a decode step calls this hundreds of times. */
static __thread float *scratch;
static __thread size_t scratch_floats;

static float *thread_scratch(size_t floats) {
    if (floats > scratch_floats) {
        free(scratch);
        scratch = aligned_alloc(64, ((floats * 4 + 63) / 64) * 64);
        scratch_floats = scratch ? floats : 0;
    }
    return scratch;
}

/* block_scales for bf16 scales and 64-row blocks, 16 rows at a time: a (scale, zero) pair of bf16
 * is one dword, the scale's float32 its low half shifted up, the zero's its high half. (Done one
 * value at a time, this cost about as much as decoding the block's codes at one row of x.) The
 * results are those of the scalar loop bit for bit: 8 * scale is exact, so z - 8 * scale rounds once
 * either way. */
__attribute__((target("avx512f,avx512bw,fma"))) static void
block_scales_bf16_64(const uint16_t *sz, int64_t rows, int64_t groups, int64_t r0, float *S, float *Z) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int64_t g = 0; g < groups; g++) {
        const uint32_t *pairs = (const uint32_t *)(sz + (g * rows + r0) * 2);
        for (int i = 0; i < 4; i++) {
            __m512i v = _mm512_loadu_si512(pairs + 16 * i);
            __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            __m512 z = _mm512_castsi512_ps(_mm512_and_si512(v, high));
            _mm512_storeu_ps(S + g * 64 + 16 * i, s);
            _mm512_storeu_ps(Z + g * 64 + 16 * i, _mm512_fnmadd_ps(eight, s, z));
        }
    }
}

/* Scale and zero - 8 * scale of rows r0 .. r0 + block - 1 for every group: S[g * block + i]. */
static void block_scales(const void *sz, int sz_bf16, int64_t rows, int64_t groups, int64_t r0,
                         int block, int avx512, float *S, float *Z) {
    if (avx512 && sz_bf16 && block == 64) {
        block_scales_bf16_64((const uint16_t *)sz, rows, groups, r0, S, Z);
        return;
    }
    for (int64_t g = 0; g < groups; g++) {
        for (int i = 0; i < block; i++) {
            int64_t at = (g * rows + r0 + i) * 2;
            float s, z;
            if (sz_bf16) {
                s = bf16_to_f32(((const uint16_t *)sz)[at]);
                z = bf16_to_f32(((const uint16_t *)sz)[at + 1]);
            } else {
                s = ((const float *)sz)[at];
                z = ((const float *)sz)[at + 1];
            }
            S[g * block + i] = s;
            Z[g * block + i] = z - 8.0f * s;
        }
    }
}

static void store_rows(const float *tile, int mr, int block, float *y, int64_t n, int64_t r0) {
    int64_t cols = n - r0 < block ? n - r0 : block;
    for (int m = 0; m < mr; m++)
        memcpy(y + m * n + r0, tile + m * block, (size_t)cols * 4);
}

/* ---- AVX-512, float32 activations ------------------------------------------------------------ */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"), always_inline)) static inline void
tile_avx512_f32(const float *x, int64_t k, int mr, const uint8_t *d, const float *S, const float *Z,
                int64_t group, float *tile) {
    __m512 acc[MR][4];
    for (int m = 0; m < MR; m++)
        for (int i = 0; i < 4; i++) acc[m][i] = _mm512_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t g = 0; g < k / group; g++) {
        __m512 s[4], z[4];
        for (int i = 0; i < 4; i++) {
            s[i] = _mm512_loadu_ps(S + g * 64 + 16 * i);
            z[i] = _mm512_loadu_ps(Z + g * 64 + 16 * i);
        }
        for (int64_t kk = g * group; kk < (g + 1) * group; kk++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(d + kk * 32));
            __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            __m128i c[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                            _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
            __m512 w[4];
            for (int i = 0; i < 4; i++)
                w[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c[i])), s[i], z[i]);
            for (int m = 0; m < mr; m++) {
                __m512 xb = _mm512_set1_ps(x[m * k + kk]);
                for (int i = 0; i < 4; i++) acc[m][i] = _mm512_fmadd_ps(w[i], xb, acc[m][i]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(tile + m * 64 + 16 * i, acc[m][i]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) static void
block_avx512_f32(const float *x, int64_t m, int64_t k, const uint8_t *d, const float *S,
                 const float *Z, int64_t group, float *tile, float *y, int64_t n, int64_t r0) {
    for (int64_t m0 = 0; m0 < m; m0 += MR) {
        int mr = m - m0 < MR ? (int)(m - m0) : MR;
        const float *xm = x + m0 * k;
        switch (mr) {  /* a constant row count per call, so the accumulators stay in registers */
            case 1: tile_avx512_f32(xm, k, 1, d, S, Z, group, tile); break;
            case 2: tile_avx512_f32(xm, k, 2, d, S, Z, group, tile); break;
            case 3: tile_avx512_f32(xm, k, 3, d, S, Z, group, tile); break;
            default: tile_avx512_f32(xm, k, 4, d, S, Z, group, tile); break;
        }
        store_rows(tile, mr, 64, y + m0 * n, n, r0);
    }
}

/* ---- AVX2, float32 activations ------------------------------------------------------------- */
/* The 32 codes of rows 32 * half .. 32 * half + 31 at input kk: a 32-row block's 16 bytes (low
 * nibbles rows 0-15, high 16-31), or one nibble of a 64-row block's 32 bytes. */
__attribute__((target("avx2,fma"), always_inline)) static inline __m256i
codes_avx2(const uint8_t *d, int block, int half, int64_t kk) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    if (block == 32) {
        __m128i v = _mm_loadu_si128((const __m128i *)(d + kk * 16));
        __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
        return _mm256_and_si256(both, low4);
    }
    __m256i v = _mm256_loadu_si256((const __m256i *)(d + kk * 32));
    return _mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, low4);
}

__attribute__((target("avx2,fma"), always_inline)) static inline void
tile_avx2_f32(const float *x, int64_t k, int mr, const uint8_t *d, int block, int half,
              const float *S, const float *Z, int64_t group, float *tile) {
    __m256 acc[2][4];
    for (int m = 0; m < 2; m++)
        for (int i = 0; i < 4; i++) acc[m][i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < k / group; g++) {
        const float *s = S + g * block + 32 * half, *z = Z + g * block + 32 * half;
        for (int64_t kk = g * group; kk < (g + 1) * group; kk++) {
            __m256i cc = codes_avx2(d, block, half, kk);
            __m128i c[4] = {_mm256_castsi256_si128(cc), _mm_srli_si128(_mm256_castsi256_si128(cc), 8),
                            _mm256_extracti128_si256(cc, 1), _mm_srli_si128(_mm256_extracti128_si256(cc, 1), 8)};
            __m256 w[4];
            for (int i = 0; i < 4; i++)
                w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c[i])),
                                       _mm256_loadu_ps(s + 8 * i), _mm256_loadu_ps(z + 8 * i));
            for (int m = 0; m < mr; m++) {
                __m256 xb = _mm256_set1_ps(x[m * k + kk]);
                for (int i = 0; i < 4; i++) acc[m][i] = _mm256_fmadd_ps(w[i], xb, acc[m][i]);
            }
        }
    }
    for (int m = 0; m < mr; m++)
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(tile + m * block + 32 * half + 8 * i, acc[m][i]);
}

/* 16 ymm registers: two rows of x and 32 rows of the weight per pass (a 64-row block in halves). */
__attribute__((target("avx2,fma"))) static void
block_avx2_f32(const float *x, int64_t m, int64_t k, const uint8_t *d, int block, const float *S,
               const float *Z, int64_t group, float *tile, float *y, int64_t n, int64_t r0) {
    for (int64_t m0 = 0; m0 < m; m0 += 2) {
        int mr = m - m0 < 2 ? 1 : 2;
        const float *xm = x + m0 * k;
        for (int half = 0; half < block / 32; half++) {
            if (mr == 1) tile_avx2_f32(xm, k, 1, d, block, half, S, Z, group, tile);
            else tile_avx2_f32(xm, k, 2, d, block, half, S, Z, group, tile);
        }
        store_rows(tile, mr, block, y + m0 * n, n, r0);
    }
}

/* ---- AVX-512 BF16, bf16 activations -------------------------------------------------------- */
/* Decode k values kc .. kc + KC of a 64-row block into bf16 pairs: buf[p * 64 + 16 * i + j] holds
 * rows 16 * i + j at k = kc + 2p and kc + 2p + 1 (the operand layout of vdpbf16ps). */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) static void
decode_chunk_bf16(const uint8_t *d, const float *S, const float *Z, int64_t group, int64_t kc,
                  int64_t kn, __m512i *buf) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                           23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t p = 0; p < kn / 2; p++) {
        int64_t kk = kc + 2 * p, g = kk / group;
        _mm_prefetch((const char *)(d + (kk + PREFETCH_K) * 32), _MM_HINT_T0);
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(d + kk * 32));
        __m256i v1 = _mm256_loadu_si256((const __m256i *)(d + (kk + 1) * 32));
        __m256i lo0 = _mm256_and_si256(v0, low4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
        __m256i lo1 = _mm256_and_si256(v1, low4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
        __m128i c0[4] = {_mm256_castsi256_si128(lo0), _mm256_extracti128_si256(lo0, 1),
                         _mm256_castsi256_si128(hi0), _mm256_extracti128_si256(hi0, 1)};
        __m128i c1[4] = {_mm256_castsi256_si128(lo1), _mm256_extracti128_si256(lo1, 1),
                         _mm256_castsi256_si128(hi1), _mm256_extracti128_si256(hi1, 1)};
        for (int i = 0; i < 4; i++) {
            __m512 s = _mm512_loadu_ps(S + g * 64 + 16 * i), z = _mm512_loadu_ps(Z + g * 64 + 16 * i);
            __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c0[i])), s, z);
            __m512 b = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c1[i])), s, z);
            __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);  /* a0..a15, b0..b15 */
            _mm512_store_si512(buf + p * 4 + i, _mm512_permutexvar_epi16(pairs, ab));
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"), always_inline)) static inline void
micro_bf16(const uint16_t *x, int64_t k, int mr, int64_t kc, int64_t kn, const __m512i *buf,
           float *tile, int first) {
    __m512 acc[MR_BF16][4];
    for (int m = 0; m < mr; m++)
        for (int i = 0; i < 4; i++)
            acc[m][i] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(tile + m * 64 + 16 * i);
    for (int64_t p = 0; p < kn / 2; p++) {
        __m512i w[4];
        for (int i = 0; i < 4; i++) w[i] = _mm512_load_si512(buf + p * 4 + i);
        for (int m = 0; m < mr; m++) {
            int32_t pair;
            memcpy(&pair, x + m * k + kc + 2 * p, 4);
            __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            for (int i = 0; i < 4; i++) acc[m][i] = _mm512_dpbf16_ps(acc[m][i], (__m512bh)w[i], xb);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(tile + m * 64 + 16 * i, acc[m][i]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) static void
block_avx512_bf16(const uint16_t *x, int64_t m, int64_t k, const uint8_t *d, const float *S,
                  const float *Z, int64_t group, __m512i *buf, float *tile, float *y, int64_t n,
                  int64_t r0) {
    for (int64_t kc = 0; kc < k; kc += KC) {
        int64_t kn = k - kc < KC ? k - kc : KC;
        decode_chunk_bf16(d, S, Z, group, kc, kn, buf);
        for (int64_t m0 = 0; m0 < m; m0 += MR_BF16) {
            int mr = m - m0 < MR_BF16 ? (int)(m - m0) : MR_BF16;
            const uint16_t *xm = x + m0 * k;
            float *t = tile + m0 * 64;
            switch (mr) {
                case 1: micro_bf16(xm, k, 1, kc, kn, buf, t, kc == 0); break;
                case 2: micro_bf16(xm, k, 2, kc, kn, buf, t, kc == 0); break;
                case 3: micro_bf16(xm, k, 3, kc, kn, buf, t, kc == 0); break;
                case 4: micro_bf16(xm, k, 4, kc, kn, buf, t, kc == 0); break;
                case 5: micro_bf16(xm, k, 5, kc, kn, buf, t, kc == 0); break;
                default: micro_bf16(xm, k, 6, kc, kn, buf, t, kc == 0); break;
            }
        }
    }
    store_rows(tile, (int)m, 64, y, n, r0);
}

/* ---- AMX BF16, bf16 activations ------------------------------------------------------------- */
/* Tiles 0-3: y for 16 rows of x against the block's rows 16 i .. 16 i + 15 (float32); tile 4: 16
 * rows of x by 32 inputs; tiles 5-7: 16 pairs of inputs of 16 weight rows, as decode_chunk_bf16
 * lays them out (a pair of inputs of the block's 64 rows is 256 bytes). */
struct tile_config {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

__attribute__((target("amx-tile,amx-bf16"))) static void configure_tiles(int mr) {
    struct tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = t < 5 ? (uint8_t)mr : 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,amx-tile,amx-bf16"))) static void
block_amx_bf16(const uint16_t *x, int64_t m, int64_t k, const uint8_t *d, const float *S, const float *Z,
               int64_t group, __m512i *buf, float *tile, float *y, int64_t n, int64_t r0) {
    for (int64_t kc = 0; kc < k; kc += KC)
        decode_chunk_bf16(d, S, Z, group, kc, k - kc < KC ? k - kc : KC, buf + kc / 2 * 4);
    int configured = 0;
    for (int64_t m0 = 0; m0 < m; m0 += 16) {
        int mr = m - m0 < 16 ? (int)(m - m0) : 16;
        if (mr != configured) configure_tiles(configured = mr);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        const uint16_t *xm = x + m0 * k;
        for (int64_t s = 0; s < k / 32; s++) {
            const char *b = (const char *)(buf + s * 16 * 4);
            _tile_loadd(4, xm + 32 * s, k * 2);
            _tile_loadd(5, b, 256);
            _tile_loadd(6, b + 64, 256);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(7, b + 128, 256);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(5, b + 192, 256);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 4, 5);
        }
        _tile_stored(0, tile, 256);
        _tile_stored(1, tile + 16, 256);
        _tile_stored(2, tile + 32, 256);
        _tile_stored(3, tile + 48, 256);
        store_rows(tile, mr, 64, y + m0 * n, n, r0);
    }
    _tile_release();
}

/* Whether Linux lets this process use the AMX tile data (asked once; granted for all threads). */
static int amx_permitted(void) {
#ifdef SYS_arch_prctl
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return 0;
#endif
}

/* ---- AVX-512 BF16, bf16 activations, one or two rows ------------------------------------------ */
/* With one or two rows of x the decode is most of the work, so it is cut to the bone: a code c
 * widened to 16 bits and or-ed with 0x4300 is the bf16 value 128 + c, exactly; per group the
 * products sum_k (128 + c) x_k accumulate in float32 and are folded into the output as
 * scale * sum + (zero - 136 * scale) * sum_k x_k. The byte interleave that pairs k with k + 1
 * leaves the rows of each accumulator in the order fold_row() gives. */
static inline int fold_row(int i, int j) { return 32 * (i / 2) + 8 * (i % 2) + (j < 8 ? j : j + 8); }

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"), always_inline)) static inline void
tile_bf16_fold(const uint16_t *x, int64_t k, int mr, const uint8_t *d, const float *S, const float *ZC,
               const float *xsum, int64_t group, float *tile) {
    __m512 acc[2][4];
    for (int m = 0; m < 2; m++)
        for (int i = 0; i < 4; i++) acc[m][i] = _mm512_setzero_ps();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m512i bias = _mm512_set1_epi16(0x4300);
    int64_t groups = k / group;
    for (int64_t g = 0; g < groups; g++) {
        __m512 part[2][4];
        for (int m = 0; m < 2; m++)
            for (int i = 0; i < 4; i++) part[m][i] = _mm512_setzero_ps();
        for (int64_t kk = g * group; kk < (g + 1) * group; kk += 2) {
            _mm_prefetch((const char *)(d + (kk + PREFETCH_K) * 32), _MM_HINT_T0);
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(d + kk * 32));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(d + (kk + 1) * 32));
            __m256i lo0 = _mm256_and_si256(v0, low4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
            __m256i lo1 = _mm256_and_si256(v1, low4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
            __m256i pairs[4] = {_mm256_unpacklo_epi8(lo0, lo1), _mm256_unpackhi_epi8(lo0, lo1),
                                _mm256_unpacklo_epi8(hi0, hi1), _mm256_unpackhi_epi8(hi0, hi1)};
            __m512i w[4];
            for (int i = 0; i < 4; i++) w[i] = _mm512_or_si512(_mm512_cvtepu8_epi16(pairs[i]), bias);
            for (int m = 0; m < mr; m++) {
                int32_t pair;
                memcpy(&pair, x + m * k + kk, 4);
                __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
                for (int i = 0; i < 4; i++) part[m][i] = _mm512_dpbf16_ps(part[m][i], (__m512bh)w[i], xb);
            }
        }
        for (int i = 0; i < 4; i++) {
            __m512 s = _mm512_loadu_ps(S + g * 64 + 16 * i), zc = _mm512_loadu_ps(ZC + g * 64 + 16 * i);
            for (int m = 0; m < mr; m++) {
                acc[m][i] = _mm512_fmadd_ps(s, part[m][i], acc[m][i]);
                acc[m][i] = _mm512_fmadd_ps(zc, _mm512_set1_ps(xsum[m * groups + g]), acc[m][i]);
            }
        }
    }
    float lanes[16];
    for (int m = 0; m < mr; m++)
        for (int i = 0; i < 4; i++) {
            _mm512_storeu_ps(lanes, acc[m][i]);
            for (int j = 0; j < 16; j++) tile[m * 64 + fold_row(i, j)] = lanes[j];
        }
}

/* S and Z (zero - 8 * scale) of a block -> the fold's order, Z becoming zero - 136 * scale: vector
 * i of the fold holds rows 8 * (i % 2) + 32 * (i / 2) + 0..7 and the 8 rows 16 after them, two
 * 128-bit lanes of each of two of the block's row vectors (see fold_row). */
__attribute__((target("avx512f,fma"))) static void
fold_scales(const float *S, const float *Z, int64_t groups, float *SF, float *ZF) {
    const __m512 c128 = _mm512_set1_ps(128.0f);
    for (int64_t g = 0; g < groups; g++) {
        __m512 s[4], z[4];
        for (int q = 0; q < 4; q++) {
            s[q] = _mm512_loadu_ps(S + g * 64 + 16 * q);
            z[q] = _mm512_loadu_ps(Z + g * 64 + 16 * q);
        }
        __m512 sf[4] = {_mm512_shuffle_f32x4(s[0], s[1], 0x44), _mm512_shuffle_f32x4(s[0], s[1], 0xEE),
                        _mm512_shuffle_f32x4(s[2], s[3], 0x44), _mm512_shuffle_f32x4(s[2], s[3], 0xEE)};
        __m512 zf[4] = {_mm512_shuffle_f32x4(z[0], z[1], 0x44), _mm512_shuffle_f32x4(z[0], z[1], 0xEE),
                        _mm512_shuffle_f32x4(z[2], z[3], 0x44), _mm512_shuffle_f32x4(z[2], z[3], 0xEE)};
        for (int i = 0; i < 4; i++) {
            _mm512_storeu_ps(SF + g * 64 + 16 * i, sf[i]);
            _mm512_storeu_ps(ZF + g * 64 + 16 * i, _mm512_fnmadd_ps(c128, sf[i], zf[i]));
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"))) static void
block_bf16_fold(const uint16_t *x, int64_t m, int64_t k, const uint8_t *d, const float *S,
                const float *Z, const float *xsum, int64_t group, float *tile, float *y, int64_t n,
                int64_t r0) {
    int64_t groups = k / group;
    float *SF = tile + 2 * 64, *ZF = SF + groups * 64;
    fold_scales(S, Z, groups, SF, ZF);
    for (int64_t m0 = 0; m0 < m; m0 += 2) {
        int mr = m - m0 < 2 ? 1 : 2;
        if (mr == 1) tile_bf16_fold(x + m0 * k, k, 1, d, SF, ZF, xsum + m0 * groups, group, tile);
        else tile_bf16_fold(x + m0 * k, k, 2, d, SF, ZF, xsum + m0 * groups, group, tile);
        store_rows(tile, mr, 64, y + m0 * n, n, r0);
    }
}

/* Per row of bf16 x, the sum of each group of inputs, in float32. */
static void group_sums(const uint16_t *x, int64_t m, int64_t k, int64_t group, float *xsum) {
    for (int64_t r = 0; r < m; r++)
        for (int64_t g = 0; g < k / group; g++) {
            float sum = 0.0f;
            for (int64_t j = g * group; j < (g + 1) * group; j++) sum += bf16_to_f32(x[r * k + j]);
            xsum[r * (k / group) + g] = sum;
        }
}

/* ---- entry point ------------------------------------------------------------------------------ */
static int run_block(int path, const void *x, int64_t m, int64_t k, const uint8_t *data, const void *sz,
                     int sz_bf16, int64_t rows, int64_t n, int64_t group, int block, const float *xsum,
                     float *y, int64_t b) {
    int64_t groups = k / group, r0 = b * block;
    size_t sz_floats = (size_t)(2 * groups * block);
    size_t tile_floats = (size_t)(path == FG_AVX512_BF16 ? m * 64 : path == FG_AVX512_BF16_FOLD
                                  ? 2 * 64 + 2 * groups * 64 : path == FG_AMX_BF16 ? 16 * 64 : MR * 64);
    size_t buf_floats = path == FG_AVX512_BF16 ? KC / 2 * 4 * 16 : path == FG_AMX_BF16 ? (size_t)k * 32 : 0;
    float *mem = thread_scratch(buf_floats + sz_floats + tile_floats);
    if (!mem) return FG_NO_MEMORY;
    float *S = mem + buf_floats, *Z = S + groups * block, *tile = Z + groups * block;
    const uint8_t *d = data + r0 * (k / 2);
    block_scales(sz, sz_bf16, rows, groups, r0, block, path != FG_AVX2_F32, S, Z);
    if (path == FG_AVX512_BF16_FOLD)
        block_bf16_fold(x, m, k, d, S, Z, xsum, group, tile, y, n, r0);
    else if (path == FG_AMX_BF16)
        block_amx_bf16(x, m, k, d, S, Z, group, (__m512i *)mem, tile, y, n, r0);
    else if (path == FG_AVX512_BF16)
        block_avx512_bf16(x, m, k, d, S, Z, group, (__m512i *)mem, tile, y, n, r0);
    else if (path == FG_AVX512_F32)
        block_avx512_f32(x, m, k, d, S, Z, group, tile, y, n, r0);
    else
        block_avx2_f32(x, m, k, d, block, S, Z, group, tile, y, n, r0);
    return FG_OK;
}

/* Bit i set: path i runs on this CPU. */
int fg_cpu_paths(void) {
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    int avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                 && __builtin_cpu_supports("avx512vl");
    int bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
    int amx = bf16 && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") && amx_permitted();
    return avx2 << FG_AVX2_F32 | avx512 << FG_AVX512_F32 | bf16 << FG_AVX512_BF16 | bf16 << FG_AVX512_BF16_FOLD
           | amx << FG_AMX_BF16;
}

int fg_int4_mm(int path, const void *x, int64_t m, int64_t k, const uint8_t *data, const void *sz,
               int sz_bf16, int64_t rows, int64_t n, int64_t group, int block, float *y, int threads) {
    if ((block != 64 && !(path == FG_AVX2_F32 && block == 32)) || rows % block || n > rows || group <= 0 || group % 2 || k % group
        || m <= 0 || threads <= 0 || (path == FG_AMX_BF16 && k % 32))
        return FG_BAD_ARGS;
    int64_t blocks = rows / block;
    int status = FG_OK;
    float *xsum = NULL;
    if (path == FG_AVX512_BF16_FOLD) {
        if (!(xsum = malloc((size_t)(m * (k / group)) * 4))) return FG_NO_MEMORY;
        group_sums(x, m, k, group, xsum);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        if (b * block >= n) continue;  /* padding rows only */
        int s = run_block(path, x, m, k, data, sz, sz_bf16, rows, n, group, block, xsum, y, b);
        if (s != FG_OK) {
#pragma omp atomic write
            status = s;
        }
    }
    free(xsum);
    return status;
}
