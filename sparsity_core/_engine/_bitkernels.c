/*
 * Magnitude selection on the weights' bits, compiled: the census, apply and N:M passes of
 * sparsity_core/_engine/magnitude.py, each one loop over the weights.
 *
 * A *key* is a weight's bit pattern with the sign cleared (x & mag), read as an unsigned integer:
 * it orders like |w|. Under the nested policy (``shift``) every key moves up by one and a weight the
 * current mask prunes (keep[i] == 0) is key 0, so it is pruned first. 16-bit keys serve bf16 and
 * fp16, 32-bit keys fp32.
 *
 * Called through ctypes (sparsity_core/_engine/_native.py), never imported as a Python module:
 * the PyInit function below only makes the file a valid extension module for setuptools. Every
 * function has a portable C loop, which is the reference; on x86-64 an AVX2 loop is taken when the
 * CPU has it (checked once at run time), giving the same results bit for bit
 * (tests/test_engine_native.py compares both with the NumPy path).
 *
 * Masks are written packed: bit i % 8 of byte i / 8 (NumPy's packbits, bitorder="little"), pad
 * bits zero. Pruned weights are written as +0 (the bits and-ed with zero).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SC_PORTABLE)
#define SC_X86 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,popcnt")))
#else
#define SC_X86 0
#endif

#define SC_EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------------------------------ */
/* The portable loops (the reference), one per key width.                                      */

#define SC_SCALAR(W)                                                                                  \
    static inline uint##W##_t key##W(uint##W##_t raw, const uint8_t *keep, int shift, int64_t i) {   \
        if (!shift) return raw;                                                                       \
        uint##W##_t k = (uint##W##_t)(raw + 1u);                                                      \
        return (keep && !keep[i]) ? 0 : k;                                                            \
    }                                                                                                 \
                                                                                                      \
    static int64_t census##W##_c(const uint##W##_t *x, int64_t start, int64_t n, const uint8_t *keep, \
                                 int shift, uint##W##_t mag, uint##W##_t lo, uint##W##_t blo,         \
                                 uint##W##_t bhi, uint##W##_t hi, uint##W##_t *band, int64_t m,       \
                                 int64_t cap, int64_t *counts) {                                      \
        int64_t below = 0, eq_lo = 0, eq_hi = 0;                                                      \
        uint##W##_t top = (uint##W##_t)counts[3];                                                     \
        for (int64_t i = start; i < n; i++) {                                                         \
            uint##W##_t raw = x[i] & mag;                                                             \
            top = raw > top ? raw : top;                                                              \
            uint##W##_t k = key##W(raw, keep, shift, i);                                              \
            below += k < lo;                                                                          \
            eq_lo += k == lo;                                                                         \
            eq_hi += k == hi;                                                                         \
            if (k >= blo && k <= bhi) {                                                               \
                if (m >= cap) return -1;                                                              \
                band[m++] = k;                                                                        \
            }                                                                                         \
        }                                                                                             \
        counts[0] += below, counts[1] += eq_lo, counts[2] += eq_hi, counts[3] = top;                  \
        return m;                                                                                     \
    }                                                                                                 \
                                                                                                      \
    /* keep k >= t_keep; ``*left`` ties of key ``tcut`` pruned first (earliest), then k >= tcut */   \
    static void apply##W##_c(uint##W##_t *x, int64_t start, int64_t n, const uint8_t *keep,          \
                             int shift, uint##W##_t mag, uint64_t t_keep, uint##W##_t tcut,           \
                             int64_t *left, int apply, uint8_t *packed) {                             \
        for (int64_t i = start; i < n; i++) {                                                         \
            uint##W##_t k = key##W(x[i] & mag, keep, shift, i);                                      \
            int kept = (uint64_t)k >= t_keep;                                                         \
            if (*left && k == tcut) {                                                                 \
                if (--*left == 0) t_keep = tcut;                                                      \
            }                                                                                         \
            if (!kept && apply) x[i] = 0;                                                             \
            if (kept) packed[i >> 3] |= (uint8_t)(1u << (i & 7));                                    \
            else packed[i >> 3] &= (uint8_t) ~(1u << (i & 7));                                       \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* in each run of m keep all but the ``prune`` lowest keys (ties: the earlier pruned first) */   \
    static int64_t nm##W##_c(uint##W##_t *x, int64_t start, int64_t n, const uint8_t *keep,          \
                             int shift, uint##W##_t mag, uint##W##_t inf, int m, int prune,           \
                             int apply, uint8_t *packed) {                                            \
        uint##W##_t k[64];                                                                            \
        for (int64_t g = start; g < n; g += m) {                                                      \
            for (int a = 0; a < m; a++) {                                                             \
                uint##W##_t raw = x[g + a] & mag;                                                     \
                if (raw >= inf) return g;                                                             \
                k[a] = key##W(raw, keep, shift, g + a);                                               \
            }                                                                                         \
            for (int a = 0; a < m; a++) {                                                             \
                int rank = 0;                                                                         \
                for (int b = 0; b < m; b++) rank += k[b] < k[a] || (k[b] == k[a] && b < a);           \
                int64_t i = g + a;                                                                    \
                if (rank >= prune) packed[i >> 3] |= (uint8_t)(1u << (i & 7));                       \
                else {                                                                                \
                    packed[i >> 3] &= (uint8_t) ~(1u << (i & 7));                                    \
                    if (apply) x[i] = 0;                                                              \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        return -1;                                                                                    \
    }

SC_SCALAR(16)
SC_SCALAR(32)

/* x[i] kept where bit i of packed is set, else +0 */
#define SC_MASK_SCALAR(W)                                                                             \
    static void mask##W##_c(uint##W##_t *x, int64_t start, int64_t n, const uint8_t *packed) {         \
        for (int64_t i = start; i < n; i++)                                                           \
            if (!(packed[i >> 3] >> (i & 7) & 1)) x[i] = 0;                                            \
    }
SC_MASK_SCALAR(16)
SC_MASK_SCALAR(32)

/* N:M down the rows (groups of m rows in each column: a [in, out] weight such as transformers'
 * Conv1D, whose reduction axis is dim 0), from row block ``g0`` (in rows). A block of m rows is
 * checked for NaN/inf whole before it is written. */
#define SC_NM_ROWS_SCALAR(W)                                                                          \
    static int64_t nm_rows##W##_c(uint##W##_t *x, int64_t g0, int64_t rows, int64_t cols,             \
                                  const uint8_t *keep, int shift, uint##W##_t mag, uint##W##_t inf,   \
                                  int m, int prune, int apply, uint8_t *packed) {                     \
        uint##W##_t k[64];                                                                            \
        for (int64_t g = g0; g < rows; g += m) {                                                      \
            for (int64_t i = g * cols; i < (g + m) * cols; i++)                                       \
                if ((x[i] & mag) >= inf) return g * cols;                                             \
            for (int64_t c = 0; c < cols; c++) {                                                      \
                for (int a = 0; a < m; a++) k[a] = key##W(x[(g + a) * cols + c] & mag, keep, shift, (g + a) * cols + c); \
                for (int a = 0; a < m; a++) {                                                         \
                    int rank = 0;                                                                     \
                    for (int b = 0; b < m; b++) rank += k[b] < k[a] || (k[b] == k[a] && b < a);       \
                    int64_t i = (g + a) * cols + c;                                                   \
                    if (rank >= prune) packed[i >> 3] |= (uint8_t)(1u << (i & 7));                   \
                    else {                                                                            \
                        packed[i >> 3] &= (uint8_t) ~(1u << (i & 7));                                \
                        if (apply) x[i] = 0;                                                          \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        return -1;                                                                                    \
    }
SC_NM_ROWS_SCALAR(16)
SC_NM_ROWS_SCALAR(32)

/* ------------------------------------------------------------------------------------------ */
/* AVX2 loops. Unsigned compares are signed compares of the keys with the top bit flipped.     */

#if SC_X86

static int have_avx2 = -1;
static void init_tables(void);

static int use_avx2(void) {
    if (have_avx2 < 0) {
        __builtin_cpu_init();
        have_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
        if (have_avx2) init_tables();
    }
    return have_avx2;
}

/* 16 keys (16-bit) from x[i..i+16); raw (sign cleared) keys in *raw */
AVX2 static inline __m256i keys16v(const uint16_t *x, const uint8_t *keep, int shift, int64_t i, __m256i vmag,
                                   __m256i *raw) {
    __m256i r = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), vmag);
    *raw = r;
    if (!shift) return r;
    __m256i k = _mm256_add_epi16(r, _mm256_set1_epi16(1));
    if (keep) {
        __m256i kp = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(keep + i)));
        k = _mm256_and_si256(k, _mm256_sub_epi16(_mm256_setzero_si256(), kp));
    }
    return k;
}

/* 8 keys (32-bit) from x[i..i+8) */
AVX2 static inline __m256i keys32v(const uint32_t *x, const uint8_t *keep, int shift, int64_t i, __m256i vmag,
                                   __m256i *raw) {
    __m256i r = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), vmag);
    *raw = r;
    if (!shift) return r;
    __m256i k = _mm256_add_epi32(r, _mm256_set1_epi32(1));
    if (keep) {
        __m256i kp = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(keep + i)));
        k = _mm256_and_si256(k, _mm256_sub_epi32(_mm256_setzero_si256(), kp));
    }
    return k;
}

AVX2 static inline int64_t hsum16(__m256i acc) { /* acc: per-lane counts as negative int16 */
    __m256i wide = _mm256_madd_epi16(acc, _mm256_set1_epi16(-1));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return (int64_t)_mm_cvtsi128_si32(s);
}

AVX2 static inline int64_t hsum32(__m256i acc) { /* per-lane counts as negative int32 */
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return -(int64_t)_mm_cvtsi128_si32(s);
}

/* Compress tables: for each 8-bit lane mask, the lanes it selects moved to the front. */
static int32_t perm32[256][8];
static uint8_t perm16[256][16];

static void init_tables(void) {
    for (int mask = 0; mask < 256; mask++) {
        int j = 0;
        for (int lane = 0; lane < 8; lane++)
            if (mask >> lane & 1) {
                perm32[mask][j] = lane;
                perm16[mask][2 * j] = (uint8_t)(2 * lane), perm16[mask][2 * j + 1] = (uint8_t)(2 * lane + 1);
                j++;
            }
        for (; j < 8; j++) perm32[mask][j] = 0, perm16[mask][2 * j] = perm16[mask][2 * j + 1] = 0x80;
    }
}

/* Streams run ahead of the hardware prefetchers by this many bytes (measured: the census of fp32
 * keys 10-25 % faster on one core; benchmarks/engine.py). Prefetching past the end never faults. */
#define SC_AHEAD 4096
#define SC_PREFETCH(p) _mm_prefetch((const char *)(p) + SC_AHEAD, _MM_HINT_T0)

/* Counters live in vector lanes for at most this many iterations (no lane overflows). */
#define SC_FLUSH 4096

AVX2 static inline __attribute__((always_inline)) int64_t census16_body(const uint16_t *x, int64_t n, const uint8_t *keep, int shift, uint16_t mag,
                                  uint16_t lo, uint16_t blo, uint16_t bhi, uint16_t hi, uint16_t *band, int64_t cap,
                                  int64_t *counts, int64_t *done, int edges) {
    const __m256i vmag = _mm256_set1_epi16((short)mag), bias = _mm256_set1_epi16((short)0x8000);
    const __m256i vlo = _mm256_set1_epi16((short)(lo ^ 0x8000)), vhi = _mm256_set1_epi16((short)hi);
    const __m256i vlo_eq = _mm256_set1_epi16((short)lo);
    const __m256i vblo = _mm256_set1_epi16((short)(blo ^ 0x8000)), vbhi = _mm256_set1_epi16((short)(bhi ^ 0x8000));
    __m256i top = _mm256_setzero_si256();
    int64_t m = 0, i = 0, below = 0, eq_lo = 0, eq_hi = 0;
    while (i + 16 <= n) {
        __m256i a_below = _mm256_setzero_si256(), a_lo = a_below, a_hi = a_below;
        int64_t stop = i + 16 * (int64_t)SC_FLUSH;
        if (stop > n) stop = n;
        for (; i + 16 <= stop; i += 16) {
            SC_PREFETCH(x + i);
            __m256i raw, k = keys16v(x, keep, shift, i, vmag, &raw);
            top = _mm256_max_epu16(top, raw);
            __m256i kb = _mm256_xor_si256(k, bias);
            a_below = _mm256_add_epi16(a_below, _mm256_cmpgt_epi16(vlo, kb));
            if (edges) {
                a_lo = _mm256_add_epi16(a_lo, _mm256_cmpeq_epi16(k, vlo_eq));
                a_hi = _mm256_add_epi16(a_hi, _mm256_cmpeq_epi16(k, vhi));
            }
            __m256i out = _mm256_or_si256(_mm256_cmpgt_epi16(vblo, kb), _mm256_cmpgt_epi16(kb, vbhi));
            /* the keys inside [blo, bhi] moved to the front of each half and stored (branch-free) */
            __m256i in8 = _mm256_packs_epi16(out, out);
            uint32_t in = ~(uint32_t)_mm256_movemask_epi8(in8);
            uint32_t m0 = in & 0xFF, m1 = (in >> 16) & 0xFF;
            __m128i h0 = _mm_shuffle_epi8(_mm256_castsi256_si128(k), _mm_loadu_si128((const __m128i *)perm16[m0]));
            _mm_storeu_si128((__m128i *)(band + m), h0);
            m += __builtin_popcount(m0);
            __m128i h1 = _mm_shuffle_epi8(_mm256_extracti128_si256(k, 1), _mm_loadu_si128((const __m128i *)perm16[m1]));
            _mm_storeu_si128((__m128i *)(band + m), h1);
            m += __builtin_popcount(m1);
            if (m > cap) return -1;
        }
        below += hsum16(a_below), eq_lo += hsum16(a_lo), eq_hi += hsum16(a_hi);
    }
    uint16_t t16[16];
    _mm256_storeu_si256((__m256i *)t16, top);
    uint16_t t = (uint16_t)counts[3];
    for (int j = 0; j < 16; j++) t = t16[j] > t ? t16[j] : t;
    counts[0] += below, counts[1] += eq_lo, counts[2] += eq_hi, counts[3] = t;
    *done = i;
    return m;
}

/* specialised copies of the loop: no current mask and no edge counts (a one-shot prune), or the rest */
AVX2 static int64_t census16_avx2(const uint16_t *x, int64_t n, const uint8_t *keep, int shift, uint16_t mag,
                                  uint16_t lo, uint16_t blo, uint16_t bhi, uint16_t hi, uint16_t *band, int64_t cap,
                                  int64_t *counts, int64_t *done) {
    /* the counts of keys == lo and == hi matter only where an edge is counted, not kept */
    int edges = lo == hi || blo != lo || bhi != hi;
    if (!shift && !edges) return census16_body(x, n, NULL, 0, mag, lo, blo, bhi, hi, band, cap, counts, done, 0);
    if (!shift) return census16_body(x, n, NULL, 0, mag, lo, blo, bhi, hi, band, cap, counts, done, 1);
    return census16_body(x, n, keep, shift, mag, lo, blo, bhi, hi, band, cap, counts, done, 1);
}

AVX2 static inline __attribute__((always_inline)) int64_t census32_body(const uint32_t *x, int64_t n, const uint8_t *keep, int shift, uint32_t mag,
                                  uint32_t lo, uint32_t blo, uint32_t bhi, uint32_t hi, uint32_t *band, int64_t cap,
                                  int64_t *counts, int64_t *done, int edges) {
    const __m256i vmag = _mm256_set1_epi32((int)mag), bias = _mm256_set1_epi32((int)0x80000000u);
    const __m256i vlo = _mm256_set1_epi32((int)(lo ^ 0x80000000u)), vhi = _mm256_set1_epi32((int)hi);
    const __m256i vlo_eq = _mm256_set1_epi32((int)lo);
    const __m256i vblo = _mm256_set1_epi32((int)(blo ^ 0x80000000u)), vbhi = _mm256_set1_epi32((int)(bhi ^ 0x80000000u));
    __m256i top = _mm256_setzero_si256();
    __m256i a_below = _mm256_setzero_si256(), a_lo = a_below, a_hi = a_below;
    int64_t m = 0, i = 0;
    /* one vector: counts, and the keys inside [blo, bhi] moved to the front and stored (branch-free) */
#define SC_STEP32(at)                                                                                 \
    do {                                                                                              \
        __m256i raw, k = keys32v(x, keep, shift, (at), vmag, &raw);                                   \
        top = _mm256_max_epu32(top, raw);                                                             \
        __m256i kb = _mm256_xor_si256(k, bias), under = _mm256_cmpgt_epi32(vblo, kb);                 \
        /* without edges blo == lo: the keys below the band are the keys below lo */                  \
        a_below = _mm256_add_epi32(a_below, edges ? _mm256_cmpgt_epi32(vlo, kb) : under);             \
        if (edges) {                                                                                  \
            a_lo = _mm256_add_epi32(a_lo, _mm256_cmpeq_epi32(k, vlo_eq));                             \
            a_hi = _mm256_add_epi32(a_hi, _mm256_cmpeq_epi32(k, vhi));                                \
        }                                                                                             \
        __m256i out = _mm256_or_si256(under, _mm256_cmpgt_epi32(kb, vbhi));                           \
        uint32_t in = ~(uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(out)) & 0xFFu;                \
        _mm256_storeu_si256((__m256i *)(band + m),                                                    \
                            _mm256_permutevar8x32_epi32(k, _mm256_loadu_si256((const __m256i *)perm32[in]))); \
        m += __builtin_popcount(in);                                                                  \
    } while (0)
    for (; i + 16 <= n; i += 16) { /* int32 lanes: a count per lane overflows only past 2^31 iterations */
        SC_PREFETCH(x + i);
        SC_STEP32(i);
        SC_STEP32(i + 8);
        if (m > cap) return -1;
    }
    for (; i + 8 <= n; i += 8) {
        SC_STEP32(i);
        if (m > cap) return -1;
    }
#undef SC_STEP32
    uint32_t t8[8];
    _mm256_storeu_si256((__m256i *)t8, top);
    uint32_t t = (uint32_t)counts[3];
    for (int j = 0; j < 8; j++) t = t8[j] > t ? t8[j] : t;
    counts[0] += hsum32(a_below), counts[1] += hsum32(a_lo), counts[2] += hsum32(a_hi), counts[3] = t;
    *done = i;
    return m;
}

/* specialised copies of the loop: no current mask and no edge counts (a one-shot prune), or the rest */
AVX2 static int64_t census32_avx2(const uint32_t *x, int64_t n, const uint8_t *keep, int shift, uint32_t mag,
                                  uint32_t lo, uint32_t blo, uint32_t bhi, uint32_t hi, uint32_t *band, int64_t cap,
                                  int64_t *counts, int64_t *done) {
    /* the counts of keys == lo and == hi matter only where an edge is counted, not kept */
    int edges = lo == hi || blo != lo || bhi != hi;
    if (!shift && !edges) return census32_body(x, n, NULL, 0, mag, lo, blo, bhi, hi, band, cap, counts, done, 0);
    if (!shift) return census32_body(x, n, NULL, 0, mag, lo, blo, bhi, hi, band, cap, counts, done, 1);
    return census32_body(x, n, keep, shift, mag, lo, blo, bhi, hi, band, cap, counts, done, 1);
}

/* keep bits of 32 16-bit lanes (two vectors of compare results), in element order */
AVX2 static inline uint32_t bits16x2(__m256i a, __m256i b) {
    __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8);
    return (uint32_t)_mm256_movemask_epi8(p);
}

/* The apply pass from element ``*at`` while ties are left to prune at key tcut (k >= t_keep
 * kept), vector by vector; a vector holding a tie is resolved lane by lane. */
AVX2 static void apply16_avx2(uint16_t *x, int64_t n, const uint8_t *keep, int shift, uint16_t mag, uint64_t t_keep,
                              uint16_t tcut, int64_t *left, int apply, uint8_t *packed, int64_t *at) {
    const __m256i vmag = _mm256_set1_epi16((short)mag), bias = _mm256_set1_epi16((short)0x8000);
    const __m256i vcut = _mm256_set1_epi16((short)tcut);
    int64_t i = *at, ties = *left; /* locals: the stores through x and packed could alias *left */
    for (; i + 32 <= n; i += 32) {
        SC_PREFETCH(x + i);
        /* keep = k >= t_keep = !(t_keep > k); t_keep may be 0x10000 (nothing kept) only for tcut + 1 */
        __m256i vt = _mm256_set1_epi16((short)((uint16_t)(t_keep - 1) ^ 0x8000)); /* keep = k > t_keep - 1 */
        __m256i raw, k0 = keys16v(x, keep, shift, i, vmag, &raw), k1 = keys16v(x, keep, shift, i + 16, vmag, &raw);
        __m256i keep0, keep1;
        if (t_keep == 0) {
            keep0 = keep1 = _mm256_set1_epi16(-1);
        } else {
            keep0 = _mm256_cmpgt_epi16(_mm256_xor_si256(k0, bias), vt);
            keep1 = _mm256_cmpgt_epi16(_mm256_xor_si256(k1, bias), vt);
        }
        uint32_t bits = bits16x2(keep0, keep1);
        if (ties) {
            uint32_t eq = bits16x2(_mm256_cmpeq_epi16(k0, vcut), _mm256_cmpeq_epi16(k1, vcut));
            if (eq) { /* ties of key tcut: the first *left pruned, the rest kept */
                while (eq && ties) {
                    eq &= eq - 1;
                    if (--ties == 0) t_keep = tcut;
                }
                bits |= eq;
                if (apply)
                    for (int j = 0; j < 32; j++)
                        if (!((bits >> j) & 1)) x[i + j] = 0;
                memcpy(packed + (i >> 3), &bits, 4);
                continue;
            }
        }
        if (apply && bits != 0xFFFFFFFFu) {
            _mm256_storeu_si256((__m256i *)(x + i), _mm256_and_si256(_mm256_loadu_si256((__m256i *)(x + i)), keep0));
            _mm256_storeu_si256((__m256i *)(x + i + 16),
                                _mm256_and_si256(_mm256_loadu_si256((__m256i *)(x + i + 16)), keep1));
        }
        memcpy(packed + (i >> 3), &bits, 4);
    }
    *at = i, *left = ties;
    at[1] = (int64_t)t_keep; /* the caller finishes the tail with the portable loop from here */
}

AVX2 static void apply32_avx2(uint32_t *x, int64_t n, const uint8_t *keep, int shift, uint32_t mag, uint64_t t_keep,
                              uint32_t tcut, int64_t *left, int apply, uint8_t *packed, int64_t *at) {
    const __m256i vmag = _mm256_set1_epi32((int)mag), bias = _mm256_set1_epi32((int)0x80000000u);
    const __m256i vcut = _mm256_set1_epi32((int)tcut);
    int64_t i = *at, ties = *left; /* locals: the stores through x and packed could alias *left */
    for (; i + 32 <= n; i += 32) {
        SC_PREFETCH(x + i);
        SC_PREFETCH(x + i + 16);
        __m256i vt = _mm256_set1_epi32((int)((uint32_t)(t_keep - 1) ^ 0x80000000u));
        __m256i all = _mm256_set1_epi32(-1), kv[4];
        uint32_t bits = 0, eq = 0;
        for (int v = 0; v < 4; v++) {
            __m256i raw, k = keys32v(x, keep, shift, i + 8 * v, vmag, &raw);
            kv[v] = t_keep == 0 ? all : _mm256_cmpgt_epi32(_mm256_xor_si256(k, bias), vt);
            bits |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(kv[v])) << (8 * v);
            if (ties) eq |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, vcut))) << (8 * v);
        }
        if (eq) {
            while (eq && ties) {
                eq &= eq - 1;
                if (--ties == 0) t_keep = tcut;
            }
            bits |= eq;
            if (apply)
                for (int j = 0; j < 32; j++)
                    if (!((bits >> j) & 1)) x[i + j] = 0;
            memcpy(packed + (i >> 3), &bits, 4);
            continue;
        }
        if (apply && bits != 0xFFFFFFFFu)
            for (int v = 0; v < 4; v++)
                _mm256_storeu_si256((__m256i *)(x + i + 8 * v),
                                    _mm256_and_si256(_mm256_loadu_si256((__m256i *)(x + i + 8 * v)), kv[v]));
        memcpy(packed + (i >> 3), &bits, 4);
    }
    *at = i, *left = ties;
    at[1] = (int64_t)t_keep;
}

/* N:M for m in {2, 4, 8}: lane i is compared with lane (i + s) % m of its group for each s, the
 * rotation done by a byte shuffle (16-bit keys, groups inside a 128-bit half) or a lane permute
 * (32-bit keys). rank_i = #{j: k_j < k_i} + #{j < i: k_j == k_i}; keep rank >= prune. */
AVX2 static int64_t nm16_avx2(uint16_t *x, int64_t n, const uint8_t *keep, int shift, uint16_t mag, uint16_t inf,
                              int m, int prune, int apply, uint8_t *packed, int64_t *at) {
    const __m256i vmag = _mm256_set1_epi16((short)mag), bias = _mm256_set1_epi16((short)0x8000);
    const __m256i vinf = _mm256_set1_epi16((short)((inf - 1) ^ 0x8000));
    __m256i rot[8], later[8];
    for (int s = 1; s < m; s++) {
        int8_t idx[32];
        int16_t lm[16];
        for (int lane = 0; lane < 16; lane++) {
            int c = lane % m, j = lane - c + (c + s) % m;
            idx[2 * (lane % 8)] = (int8_t)(2 * (j % 8)), idx[2 * (lane % 8) + 1] = (int8_t)(2 * (j % 8) + 1);
            lm[lane] = (int16_t)((c + s >= m) ? -1 : 0); /* j < i: the earlier lane wins a tie */
        }
        memcpy(idx + 16, idx, 16);
        rot[s] = _mm256_loadu_si256((const __m256i *)idx);
        later[s] = _mm256_loadu_si256((const __m256i *)lm);
    }
    const __m256i vprune = _mm256_set1_epi16((short)(prune - 1));
    int64_t i = *at;
    for (; i + 32 <= n; i += 32) {
        SC_PREFETCH(x + i);
        __m256i kk[2];
        __m256i bad = _mm256_setzero_si256();
        for (int v = 0; v < 2; v++) {
            __m256i raw;
            __m256i k = keys16v(x, keep, shift, i + 16 * v, vmag, &raw);
            bad = _mm256_or_si256(bad, _mm256_cmpgt_epi16(_mm256_xor_si256(raw, bias), vinf));
            __m256i kb = _mm256_xor_si256(k, bias), rank = _mm256_setzero_si256();
            for (int s = 1; s < m; s++) {
                __m256i kj = _mm256_shuffle_epi8(kb, rot[s]);
                __m256i hit = _mm256_or_si256(_mm256_cmpgt_epi16(kb, kj), _mm256_and_si256(_mm256_cmpeq_epi16(kb, kj), later[s]));
                rank = _mm256_sub_epi16(rank, hit);
            }
            kk[v] = _mm256_cmpgt_epi16(rank, vprune);
        }
        if (!_mm256_testz_si256(bad, bad)) break; /* NaN or inf in these 32: the portable loop finds it */
        uint32_t bits = bits16x2(kk[0], kk[1]);
        if (apply) {
            _mm256_storeu_si256((__m256i *)(x + i), _mm256_and_si256(_mm256_loadu_si256((__m256i *)(x + i)), kk[0]));
            _mm256_storeu_si256((__m256i *)(x + i + 16),
                                _mm256_and_si256(_mm256_loadu_si256((__m256i *)(x + i + 16)), kk[1]));
        }
        memcpy(packed + (i >> 3), &bits, 4);
    }
    *at = i;
    return -1;
}

AVX2 static int64_t nm32_avx2(uint32_t *x, int64_t n, const uint8_t *keep, int shift, uint32_t mag, uint32_t inf,
                              int m, int prune, int apply, uint8_t *packed, int64_t *at) {
    const __m256i vmag = _mm256_set1_epi32((int)mag), bias = _mm256_set1_epi32((int)0x80000000u);
    const __m256i vinf = _mm256_set1_epi32((int)((inf - 1) ^ 0x80000000u));
    __m256i rot[8], later[8];
    for (int s = 1; s < m; s++) {
        int32_t idx[8], lm[8];
        for (int lane = 0; lane < 8; lane++) {
            int c = lane % m;
            idx[lane] = lane - c + (c + s) % m;
            lm[lane] = (c + s >= m) ? -1 : 0;
        }
        rot[s] = _mm256_loadu_si256((const __m256i *)idx);
        later[s] = _mm256_loadu_si256((const __m256i *)lm);
    }
    const __m256i vprune = _mm256_set1_epi32(prune - 1);
    int64_t i = *at;
    for (; i + 32 <= n; i += 32) {
        SC_PREFETCH(x + i);
        SC_PREFETCH(x + i + 16);
        __m256i kk[4];
        __m256i bad = _mm256_setzero_si256();
        uint32_t bits = 0;
        for (int v = 0; v < 4; v++) {
            __m256i raw;
            __m256i k = keys32v(x, keep, shift, i + 8 * v, vmag, &raw);
            bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(_mm256_xor_si256(raw, bias), vinf));
            __m256i kb = _mm256_xor_si256(k, bias), rank = _mm256_setzero_si256();
            for (int s = 1; s < m; s++) {
                __m256i kj = _mm256_permutevar8x32_epi32(kb, rot[s]);
                __m256i hit = _mm256_or_si256(_mm256_cmpgt_epi32(kb, kj), _mm256_and_si256(_mm256_cmpeq_epi32(kb, kj), later[s]));
                rank = _mm256_sub_epi32(rank, hit);
            }
            kk[v] = _mm256_cmpgt_epi32(rank, vprune);
            bits |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(kk[v])) << (8 * v);
        }
        if (!_mm256_testz_si256(bad, bad)) break;
        if (apply && bits != 0xFFFFFFFFu)
            for (int v = 0; v < 4; v++)
                _mm256_storeu_si256((__m256i *)(x + i + 8 * v),
                                    _mm256_and_si256(_mm256_loadu_si256((__m256i *)(x + i + 8 * v)), kk[v]));
        memcpy(packed + (i >> 3), &bits, 4);
    }
    *at = i;
    return -1;
}

/* Packed keep bits applied to weights, 32 at a time: each lane's bit picked out of a broadcast
 * of its bytes; a word of 32 kept elements is skipped (no write). */
AVX2 static void mask32_avx2(uint32_t *x, int64_t n, const uint8_t *packed, int64_t *at) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        SC_PREFETCH(x + i);
        SC_PREFETCH(x + i + 16);
        uint32_t word;
        memcpy(&word, packed + (i >> 3), 4);
        if (word == 0xFFFFFFFFu) continue;
        for (int v = 0; v < 4; v++) {
            __m256i b = _mm256_and_si256(_mm256_set1_epi32((int)(word >> (8 * v) & 0xFF)), sel);
            __m256i *p = (__m256i *)(x + i + 8 * v);
            _mm256_storeu_si256(p, _mm256_and_si256(_mm256_loadu_si256(p), _mm256_cmpeq_epi32(b, sel)));
        }
    }
    *at = i;
}

AVX2 static void mask16_avx2(uint16_t *x, int64_t n, const uint8_t *packed, int64_t *at) {
    const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, (short)32768);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        SC_PREFETCH(x + i);
        uint32_t word;
        memcpy(&word, packed + (i >> 3), 4);
        if (word == 0xFFFFFFFFu) continue;
        for (int v = 0; v < 2; v++) {
            __m256i b = _mm256_and_si256(_mm256_set1_epi16((short)(word >> (16 * v) & 0xFFFF)), sel);
            __m256i *p = (__m256i *)(x + i + 16 * v);
            _mm256_storeu_si256(p, _mm256_and_si256(_mm256_loadu_si256(p), _mm256_cmpeq_epi16(b, sel)));
        }
    }
    *at = i;
}

/* N:M down the rows, vector by vector across the columns (cols a multiple of the lanes, so that
 * each row's keep bits are whole bytes): lane c of row a is ranked against the same lane of the
 * block's other rows. Stops before a block holding NaN/inf (the portable loop reports it). */
#define SC_NM_ROWS_AVX2(W, LANES, SUFFIX, BIAS, SET1, CMPGT, CMPEQ, SUB, MAXU, KEYS, BITS)                \
    AVX2 static void nm_rows##W##_avx2(uint##W##_t *x, int64_t rows, int64_t cols, const uint8_t *keep,   \
                                       int shift, uint##W##_t mag, uint##W##_t inf, int m, int prune,     \
                                       int apply, uint8_t *packed, int64_t *at) {                         \
        const __m256i vmag = SET1(mag), bias = SET1(BIAS), vprune = SET1(prune - 1), top = SET1(inf - 1); \
        int64_t g = 0;                                                                                    \
        for (; g < rows; g += m) {                                                                        \
            __m256i mx = _mm256_setzero_si256();                                                          \
            for (int64_t i = g * cols; i < (g + m) * cols; i += LANES) {                                  \
                SC_PREFETCH(x + i);                                                                       \
                mx = MAXU(mx, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), vmag));      \
            }                                                                                             \
            /* max(raw) > inf - 1, unsigned: max(raw, inf - 1) != inf - 1 somewhere */                    \
            if (_mm256_movemask_epi8(CMPEQ(MAXU(mx, top), top)) != -1) break;                             \
            for (int64_t c = 0; c < cols; c += LANES) {                                                   \
                __m256i kb[8], rank[8];                                                                   \
                for (int a = 0; a < m; a++) {                                                             \
                    __m256i raw;                                                                          \
                    kb[a] = _mm256_xor_si256(KEYS(x, keep, shift, (g + a) * cols + c, vmag, &raw), bias); \
                    rank[a] = _mm256_setzero_si256();                                                     \
                }                                                                                         \
                for (int a = 0; a < m; a++)                                                               \
                    for (int b = a + 1; b < m; b++) { /* b after a: a tie counts for b */                 \
                        __m256i a_lt_b = CMPGT(kb[b], kb[a]), b_lt_a = CMPGT(kb[a], kb[b]);               \
                        __m256i tie = _mm256_andnot_si256(_mm256_or_si256(a_lt_b, b_lt_a), SET1(-1));     \
                        rank[a] = SUB(rank[a], b_lt_a);                                                   \
                        rank[b] = SUB(rank[b], _mm256_or_si256(a_lt_b, tie));                             \
                    }                                                                                     \
                for (int a = 0; a < m; a++) {                                                             \
                    __m256i kept = CMPGT(rank[a], vprune);                                                \
                    int64_t i = (g + a) * cols + c;                                                       \
                    if (apply)                                                                            \
                        _mm256_storeu_si256((__m256i *)(x + i),                                           \
                                            _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + i)), kept)); \
                    BITS(packed + (i >> 3), kept);                                                        \
                }                                                                                         \
            }                                                                                             \
        }                                                                                                 \
        *at = g;                                                                                          \
    }

AVX2 static inline void bits8x32(uint8_t *out, __m256i kept) { *out = (uint8_t)_mm256_movemask_ps(_mm256_castsi256_ps(kept)); }

AVX2 static inline void bits16x16(uint8_t *out, __m256i kept) {
    uint32_t b = (uint32_t)_mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(kept, kept), 0xD8));
    uint16_t two = (uint16_t)b;
    memcpy(out, &two, 2);
}

SC_NM_ROWS_AVX2(16, 16, epi16, (short)0x8000, _mm256_set1_epi16, _mm256_cmpgt_epi16, _mm256_cmpeq_epi16, _mm256_sub_epi16,
                _mm256_max_epu16, keys16v, bits16x16)
SC_NM_ROWS_AVX2(32, 8, epi32, (int)0x80000000u, _mm256_set1_epi32, _mm256_cmpgt_epi32, _mm256_cmpeq_epi32, _mm256_sub_epi32,
                _mm256_max_epu32, keys32v, bits8x32)

#endif /* SC_X86 */

/* ------------------------------------------------------------------------------------------ */
/* Exported entry points. ``simd`` = 0 forces the portable loops (tests compare the two).      */

/*
 * The census of x[0..n): counts[0] += keys < lo, counts[1] += keys == lo, counts[2] += keys == hi,
 * counts[3] = max(counts[3], largest sign-cleared key before any shift: NaN/inf shows there).
 * counts[1] and counts[2] only where an edge is counted rather than kept (lo == hi, blo != lo or
 * bhi != hi); otherwise left as they were (the vector loop skips them there; nothing reads them);
 * keys in [blo, bhi] appended to band (at most cap of them; band holds cap + 16 keys: the vector loop
 * stores 8 at a time, twice between checks). Returns how many were appended, or -1
 * when more than cap would be (band then holds garbage).
 */
#define SC_CENSUS(W)                                                                                        \
    SC_EXPORT int64_t sc_census##W(const uint##W##_t *x, int64_t n, const uint8_t *keep, int shift,          \
                                   uint##W##_t mag, uint##W##_t lo, uint##W##_t blo, uint##W##_t bhi,        \
                                   uint##W##_t hi, uint##W##_t *band, int64_t cap, int64_t *counts,          \
                                   int simd) {                                                               \
        int64_t m = 0, start = 0, eq_lo = counts[1], eq_hi = counts[2];                                     \
        if (SC_X86 && simd && SC_HAVE_AVX2()) {                                                             \
            m = SC_CALL_AVX2(census##W##_avx2(x, n, keep, shift, mag, lo, blo, bhi, hi, band, cap, counts,   \
                                              &start));                                                     \
            if (m < 0) return -1;                                                                           \
        }                                                                                                   \
        m = census##W##_c(x, start, n, keep, shift, mag, lo, blo, bhi, hi, band, m, cap, counts);           \
        /* no edge counted: the vector loop may skip those counts, so neither loop's are kept */            \
        if (m >= 0 && !(lo == hi || blo != lo || bhi != hi)) counts[1] = eq_lo, counts[2] = eq_hi;          \
        return m;                                                                                           \
    }

/*
 * The apply pass over x[0..n): keep k >= t_keep, except that while ``left`` ties of key tcut are
 * still to be pruned (earliest first) t_keep is tcut + 1, and tcut once they are spent. The keep
 * bits go into packed; pruned weights are zeroed when ``apply``.
 */
#define SC_APPLY(W)                                                                                         \
    SC_EXPORT void sc_apply##W(uint##W##_t *x, int64_t n, const uint8_t *keep, int shift, uint##W##_t mag,  \
                               uint64_t t_keep, uint##W##_t tcut, int64_t left, int apply, uint8_t *packed,  \
                               int simd) {                                                                   \
        int64_t at[2] = {0, (int64_t)t_keep};                                                               \
        if (n & 7) packed[n >> 3] = 0; /* the pad bits */                                                   \
        if (SC_X86 && simd && SC_HAVE_AVX2()) {                                                             \
            (void)SC_CALL_AVX2(apply##W##_avx2(x, n, keep, shift, mag, t_keep, tcut, &left, apply, packed, at));   \
            t_keep = (uint64_t)at[1];                                                                       \
        }                                                                                                   \
        apply##W##_c(x, at[0], n, keep, shift, mag, t_keep, tcut, &left, apply, packed);                    \
    }

/*
 * N:M over x[0..n) in runs of m (n a multiple of m, m <= 64): keep bits into packed, pruned
 * weights zeroed when ``apply``. Returns -1, or the first element of the run holding a NaN or inf
 * (everything before that run is written, nothing after it).
 */
#define SC_NM(W)                                                                                            \
    SC_EXPORT int64_t sc_nm##W(uint##W##_t *x, int64_t n, const uint8_t *keep, int shift, uint##W##_t mag,  \
                               uint##W##_t inf, int m, int prune, int apply, uint8_t *packed, int simd) {    \
        int64_t at = 0;                                                                                     \
        if (n & 7) packed[n >> 3] = 0; /* the pad bits */                                                   \
        if (SC_X86 && simd && (m == 2 || m == 4 || m == 8) && SC_HAVE_AVX2())                               \
            (void)SC_CALL_AVX2(nm##W##_avx2(x, n, keep, shift, mag, inf, m, prune, apply, packed, &at));           \
        return nm##W##_c(x, at, n, keep, shift, mag, inf, m, prune, apply, packed);                         \
    }

#if SC_X86
#define SC_HAVE_AVX2() use_avx2()
#define SC_CALL_AVX2(call) call
#else
#define SC_HAVE_AVX2() 0
#define SC_CALL_AVX2(call) 0 /* never reached: SC_HAVE_AVX2() is 0 */
#endif

/*
 * Packed keep bits applied to x[0..n) (16- or 32-bit elements: the weights' bits): pruned
 * elements become +0, kept ones are not written where a whole word of 32 is kept.
 */
#define SC_MASK(W)                                                                                          \
    SC_EXPORT void sc_mask##W(uint##W##_t *x, int64_t n, const uint8_t *packed, int simd) {                  \
        int64_t at = 0;                                                                                     \
        if (SC_X86 && simd && SC_HAVE_AVX2()) (void)SC_CALL_AVX2(mask##W##_avx2(x, n, packed, &at));         \
        mask##W##_c(x, at, n, packed);                                                                      \
    }

SC_MASK(16)
SC_MASK(32)

/*
 * N:M down the rows of a rows x cols array (rows a multiple of m, m <= 8): in each column, each
 * block of m rows keeps all but its ``prune`` lowest keys (ties: the earlier row pruned first).
 * Keep bits into packed (C order), pruned weights zeroed when ``apply``. Returns -1, or the first
 * element of the block of m rows holding a NaN or inf (the blocks before it are written).
 */
#define SC_NM_ROWS(W, LANES)                                                                                \
    SC_EXPORT int64_t sc_nm_rows##W(uint##W##_t *x, int64_t rows, int64_t cols, const uint8_t *keep,          \
                                    int shift, uint##W##_t mag, uint##W##_t inf, int m, int prune, int apply, \
                                    uint8_t *packed, int simd) {                                              \
        int64_t g = 0;                                                                                      \
        if ((rows * cols) & 7) packed[(rows * cols) >> 3] = 0; /* the pad bits */                           \
        if (SC_X86 && simd && cols % LANES == 0 && SC_HAVE_AVX2())                                          \
            (void)SC_CALL_AVX2(nm_rows##W##_avx2(x, rows, cols, keep, shift, mag, inf, m, prune, apply, packed, &g)); \
        return nm_rows##W##_c(x, g, rows, cols, keep, shift, mag, inf, m, prune, apply, packed);            \
    }

SC_NM_ROWS(16, 16)
SC_NM_ROWS(32, 8)
SC_CENSUS(16)
SC_CENSUS(32)
SC_APPLY(16)
SC_APPLY(32)
SC_NM(16)
SC_NM(32)

/*
 * The key of rank r (0-based, r < m) among band[0..m), band unchanged: counting passes over the
 * band (the NumPy partition would copy it, and slows down on the runs of equal keys that 16-bit
 * keys make). The keys' range is cut into at most 2^16 buckets of 2^shift keys; the bucket holding
 * rank r is found from their counts, then the key inside it from a count of its own keys (shift
 * 0: exact at once). Returns -1 when the counts cannot be allocated (the caller selects another way).
 */
#define SC_SELECT(W)                                                                                        \
    SC_EXPORT int64_t sc_select##W(const uint##W##_t *band, int64_t m, int64_t r) {                           \
        uint##W##_t lo = band[0], hi = band[0];                                                              \
        for (int64_t i = 1; i < m; i++) {                                                                   \
            lo = band[i] < lo ? band[i] : lo;                                                                \
            hi = band[i] > hi ? band[i] : hi;                                                                \
        }                                                                                                   \
        int shift = 0;                                                                                      \
        while (((uint64_t)(hi - lo) >> shift) >= (1u << 16)) shift++;                                      \
        uint32_t *hist = malloc(sizeof *hist << 16);                                                        \
        if (!hist) return -1;                                                                               \
        for (;;) {                                                                                          \
            uint64_t buckets = ((uint64_t)(hi - lo) >> shift) + 1;                                          \
            memset(hist, 0, buckets * sizeof *hist);                                                        \
            for (int64_t i = 0; i < m; i++)                                                                 \
                if (band[i] >= lo && band[i] <= hi) hist[(band[i] - lo) >> shift]++;                         \
            uint64_t b = 0;                                                                                 \
            for (int64_t seen = 0;; b++) {                                                                  \
                if (seen + hist[b] > r) {                                                                   \
                    r -= seen;                                                                              \
                    break;                                                                                  \
                }                                                                                           \
                seen += hist[b];                                                                            \
            }                                                                                               \
            if (shift == 0) {                                                                               \
                free(hist);                                                                                 \
                return (int64_t)lo + (int64_t)b;                                                            \
            }                                                                                               \
            /* the bucket's keys, rank r among them: one more count, exact */                               \
            lo = (uint##W##_t)(lo + (b << shift));                                                          \
            uint64_t top = (uint64_t)lo + ((1ull << shift) - 1);                                            \
            hi = top < hi ? (uint##W##_t)top : hi;                                                          \
            shift = 0;                                                                                      \
        }                                                                                                   \
    }

SC_SELECT(16) /* 32-bit bands are mostly distinct keys: NumPy's partition is quicker there */

/* Whether the AVX2 loops run on this CPU (for the benchmarks and tests to report). */
SC_EXPORT int sc_simd(void) {
#if SC_X86
    return use_avx2();
#else
    return 0;
#endif
}

/* A valid (empty) extension module, so that setuptools builds and names it as one. */
static struct PyModuleDef sc_module = {PyModuleDef_HEAD_INIT, "_bitkernels", "compiled kernels (loaded with ctypes)", -1, NULL, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bitkernels(void) { return PyModule_Create(&sc_module); }
