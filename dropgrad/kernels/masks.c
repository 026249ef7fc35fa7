/* Fused gradient-mask kernel for dropgrad: one pass over memory, no torch headers.
 *
 * For every element i of tensor j (contiguous, row-major):
 *     h       = fmix32(fmix32(lo32(o + i) ^ k0[j]) ^ (hi32(o + i) + k1[j]))   (o = offsets[j])
 *     g[i]   <- g[i] * (h < threshold[j] ? fl(scale[j]) : 0 * fl(scale[j]))
 * which is dropgrad.masks.keep_mask followed by the reference kernel's
 * `g.mul_(keep.to(opmath) * scale)`, bit for bit: the factor is formed in the
 * dtype torch computes in (float32 for half/bfloat16/float32, float64 for
 * float64) and half/bfloat16 results are rounded as torch's vectorized CPU
 * kernels round them (round to nearest even; NaN kept quiet).
 *
 * The keys may be given (k0 | k1 << 32) or derived here from the step prefix,
 * the tensor index and the stream (dropgrad.masks.key_from_prefix).
 *
 * Built by dropgrad/kernels/cpu.py (in the background, from DropGrad()) with `cc -O3 -fopenmp -shared`
 * (OpenMP is optional) and called through ctypes, which releases the GIL.
 * Do not build with -ffast-math: it breaks NaN/subnormal parity with torch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define DG_F32 0
#define DG_F64 1
#define DG_F16 2
#define DG_BF16 3

/* One work unit of the flat element space; large enough to amortise the
 * scheduling, small enough to spread 161 tensors over 2-64 threads. */
#define DG_CHUNK 65536
/* Below this many elements in a call, threads cost more than they save. */
#define DG_MIN_PARALLEL 131072

/* Generic x86-64 has no 32-bit vector multiply; clone the hot loops for AVX2
 * (-DDG_NO_CLONES builds only the generic code, to test it on an AVX2 machine). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && !defined(DG_NO_CLONES)
#define DG_CLONES __attribute__((target_clones("avx2", "default"), noinline))
#else
#define DG_CLONES
#endif

/* fmix32(fmix32(lo ^ k0) ^ c1) < thr (fmix32: MurmurHash3's finalizer), with the xorshift that ends the inner
 * fmix32 and the one that starts the outer cancelling on the inner value:
 * for 32-bit a, (a ^ a>>16 ^ c1) ^ ((a ^ a>>16 ^ c1) >> 16) = a ^ c1 ^ c1>>16.
 * Callers pass c1x = c1 ^ (c1 >> 16); 4 of 18 vector operations are saved (and
 * 3 more in the blocked loops below).
 * keep_rest is the part after the first multiply, h = ((lo ^ k0) ^ (lo ^ k0) >> 16) * 0x85EBCA6B. */
static inline uint32_t keep_rest(uint32_t h, uint32_t c1x, uint32_t thr) {
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= c1x;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h < thr;
}

static inline uint32_t keep_bit(uint32_t lo, uint32_t k0, uint32_t c1x, uint32_t thr) {
    uint32_t h = lo ^ k0;
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    return keep_rest(h, c1x, thr);
}

static inline float f32_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

/* IEEE half -> float, exact (NaN payload kept; the multiply quiets it as torch does). */
static inline float half_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = f32_from_bits(((two_w >> 4) + (0xE0u << 23))) * exp_scale;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    /* a branch-free select: GCC keeps a ?: between two float results as control flow, which stops vectorization */
    const uint32_t small = 0u - (uint32_t)(two_w < (1u << 27));
    const uint32_t result = sign | (f32_to_bits(denormalized) & small) | (f32_to_bits(normalized) & ~small);
    return f32_from_bits(result);
}

/* float -> IEEE half, round to nearest even (FP16 library algorithm), with
 * NaN handled like x86 F16C `vcvtps2ph`, which torch's vector path uses:
 * quiet bit set, top 10 payload bits kept, sign kept. */
static inline uint16_t float_to_half(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f);
    float base = (f32_from_bits(w & 0x7FFFFFFFu) * scale_to_inf) * scale_to_zero;
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    const uint32_t nan = 0x7E00u | ((w >> 13) & 0x03FFu);
    const uint32_t is_nan = 0u - (uint32_t)(shl1_w > 0xFF000000u); /* a mask, not ?: (which blocks vectorization) */
    return (uint16_t)((sign >> 16) | (nan & is_nan) | (nonsign & ~is_nan));
}

/* float -> bfloat16 as torch's vectorized kernels do: round to nearest even, NaN -> 0xFFFF. */
static inline uint16_t float_to_bf16(float f) {
    const uint32_t w = f32_to_bits(f);
    if ((w & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFu;
    return (uint16_t)((w + 0x7FFFu + ((w >> 16) & 1u)) >> 16);
}

/* Each loop handles elements whose 64-bit index shares its high word, so the
 * second hash round's key (hi32 + k1, folded into c1x) is a constant and the loop vectorizes.
 *
 * The first round is cheaper in aligned blocks of DG_BLOCK elements. For the
 * low words x of one 2^16-aligned run, (x ^ k0) >> 16 is the constant
 * (x >> 16) ^ (k0 >> 16), so (x ^ k0) ^ ((x ^ k0) >> 16) = x ^ kr with
 * kr = k0 ^ (x >> 16) ^ (k0 >> 16). For x = b + k, b a multiple of DG_BLOCK
 * and k < DG_BLOCK, x ^ kr = (b ^ (kr & ~(DG_BLOCK-1))) + (k ^ (kr & (DG_BLOCK-1))),
 * and multiplication distributes over addition mod 2^32, so the first
 * round's product is s(b) + L[k]: one scalar multiply per block and a table
 * of DG_BLOCK words per run, instead of xor, shift, xor, multiply and a
 * counter update per vector (16 vector operations per 8 elements, was 19).
 * Unaligned heads and short tails take the plain form.
 *
 * DG_MASK_LOOP(STEP) runs STEP(i, factor) over elements [0, n), factor fk for
 * kept elements and f0 for dropped ones (fk for all when `all`). */
#define DG_BLOCK 32
/* One thread's pass is bound by how many cache misses it has in flight, and
 * the hash's instructions fill the out-of-order window; a software prefetch
 * this many bytes ahead (per 64-byte line of each block) brings a one-thread
 * float32 pass from ~1.35x to ~1.05x the time of a plain g *= c pass. */
#ifndef DG_PREFETCH_AHEAD
#define DG_PREFETCH_AHEAD 4096
#endif
#if defined(__GNUC__)
#define DG_PREFETCH(p) __builtin_prefetch((p), 1, 3)
#else
#define DG_PREFETCH(p) ((void)0)
#endif
#define DG_MASK_LOOP(STEP)                                                                              \
    do {                                                                                                \
        if (all) {                                                                                      \
            for (int64_t i = 0; i < n; i++) STEP(i, fk);                                                \
            break;                                                                                      \
        }                                                                                               \
        int64_t i = 0;                                                                                  \
        uint32_t x = lo;                                                                                \
        while (i < n) {                                                                                 \
            int64_t head = (int64_t)((DG_BLOCK - (x & (DG_BLOCK - 1))) & (DG_BLOCK - 1));               \
            if (head > n - i) head = n - i;                                                             \
            int64_t nb = (n - i - head) / DG_BLOCK;                                                     \
            if (nb == 0) head = n - i;                                                                  \
            for (const int64_t e = i + head; i < e; i++, x++) STEP(i, keep_bit(x, k0, c1x, thr) ? fk : f0); \
            if (nb == 0) break;                                                                         \
            const int64_t to_run_end = (int64_t)((0x10000u - (x & 0xFFFFu)) / DG_BLOCK);                \
            if (nb > to_run_end) nb = to_run_end;                                                       \
            const uint32_t kr = k0 ^ (x >> 16) ^ (k0 >> 16);                                            \
            const uint32_t khi = kr & ~(uint32_t)(DG_BLOCK - 1), klo = kr & (DG_BLOCK - 1);             \
            uint32_t L[DG_BLOCK];                                                                       \
            for (uint32_t k = 0; k < DG_BLOCK; k++) L[k] = (k ^ klo) * 0x85EBCA6Bu;                     \
            for (int64_t b = 0; b < nb; b++, i += DG_BLOCK, x += DG_BLOCK) {                            \
                const uint32_t s = (x ^ khi) * 0x85EBCA6Bu;                                             \
                for (size_t pb = 0; pb < DG_BLOCK * sizeof(*g); pb += 64)                               \
                    DG_PREFETCH((const void *)((uintptr_t)(g + i) + DG_PREFETCH_AHEAD + pb));           \
                for (int k = 0; k < DG_BLOCK; k++) STEP(i + k, keep_rest(s + L[k], c1x, thr) ? fk : f0); \
            }                                                                                           \
        }                                                                                               \
    } while (0)

#define DG_STEP_MUL(j, f) (g[(j)] = g[(j)] * (f))
#define DG_STEP_F16(j, f) (g[(j)] = float_to_half(half_to_float(g[(j)]) * (f)))
#define DG_STEP_BF16(j, f) (g[(j)] = float_to_bf16(f32_from_bits((uint32_t)g[(j)] << 16) * (f)))

DG_CLONES static void run_f32(float *g, int64_t n, uint32_t lo, uint32_t k0, uint32_t c1x, uint32_t thr, int all, float fk, float f0) {
    DG_MASK_LOOP(DG_STEP_MUL);
}

DG_CLONES static void run_f64(double *g, int64_t n, uint32_t lo, uint32_t k0, uint32_t c1x, uint32_t thr, int all, double fk, double f0) {
    DG_MASK_LOOP(DG_STEP_MUL);
}

DG_CLONES static void run_f16(uint16_t *g, int64_t n, uint32_t lo, uint32_t k0, uint32_t c1x, uint32_t thr, int all, float fk, float f0) {
    DG_MASK_LOOP(DG_STEP_F16);
}

DG_CLONES static void run_bf16(uint16_t *g, int64_t n, uint32_t lo, uint32_t k0, uint32_t c1x, uint32_t thr, int all, float fk, float f0) {
    DG_MASK_LOOP(DG_STEP_BF16);
}

/* Mask elements [start, stop) of tensor j. */
static void run_segment(void *ptr, int32_t dtype, int64_t start, int64_t stop, uint32_t k0, uint32_t k1,
                        uint64_t threshold, double scale, uint64_t offset) {
    /* threshold 0 keeps nothing: comparing against 0 is never true, so thr=0 works as is;
     * threshold 2^32 keeps everything: the `all` flag (no uint32 holds 2^32). */
    const int all = threshold >= 0x100000000ull;
    const uint32_t thr = all ? 0u : (uint32_t)threshold;
    const float fk32 = (float)scale, f032 = 0.0f * fk32;
    const double fk64 = scale, f064 = 0.0 * scale;
    int64_t i = start;
    while (i < stop) {
        const uint64_t idx = offset + (uint64_t)i;
        const uint32_t hi = (uint32_t)(idx >> 32), lo = (uint32_t)idx;
        int64_t n = stop - i;
        const uint64_t to_wrap = 0x100000000ull - (uint64_t)lo;
        if ((uint64_t)n > to_wrap) n = (int64_t)to_wrap;
        const uint32_t c1 = hi + k1, c1x = c1 ^ (c1 >> 16);
        switch (dtype) {
        case DG_F32: run_f32((float *)ptr + i, n, lo, k0, c1x, thr, all, fk32, f032); break;
        case DG_F64: run_f64((double *)ptr + i, n, lo, k0, c1x, thr, all, fk64, f064); break;
        case DG_F16: run_f16((uint16_t *)ptr + i, n, lo, k0, c1x, thr, all, fk32, f032); break;
        case DG_BF16: run_bf16((uint16_t *)ptr + i, n, lo, k0, c1x, thr, all, fk32, f032); break;
        default: return;
        }
        i += n;
    }
}

/* SplitMix64's output function applied to x + golden ratio (dropgrad.masks._splitmix64). */
static inline uint64_t splitmix64(uint64_t x) {
    uint64_t z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* dropgrad.masks.key_from_prefix(prefix, index, stream) as one word: k0 | k1 << 32. */
static inline uint64_t key_word(uint64_t prefix, uint64_t index, uint64_t stream) {
    return splitmix64(splitmix64(prefix ^ index) ^ stream);
}

#ifdef DROPGRAD_TESTING
/* Entry points for the test suite only (dropgrad.testing builds a separate library with
 * -DDROPGRAD_TESTING); the library that masks gradients does not export them. */

/* Keys of `count` tensors: out[j] = key_word(prefix, index[j], stream) (index NULL: index j). */
void dropgrad_derive_keys(int64_t count, uint64_t prefix, uint64_t stream, const uint64_t *index, uint64_t *out) {
    for (int64_t j = 0; j < count; j++) out[j] = key_word(prefix, index ? index[j] : (uint64_t)j, stream);
}
#endif /* DROPGRAD_TESTING */

/* One tensor's work, resolved once per call. */
typedef struct {
    void *ptr;
    int64_t start;  /* its first element in the flat element space */
    uint64_t key;   /* k0 | k1 << 32 */
    uint64_t threshold;
    uint64_t offset;
    double scale;
    int32_t dtype;
} dg_seg;

/* Masks the pieces [lo, hi) of the flat element space (the concatenation of
 * all active tensors; seg[count].start is the total). */
static void run_range(int64_t count, const dg_seg *seg, int64_t lo, int64_t hi) {
    /* first tensor with seg[j + 1].start > lo */
    int64_t a = 0, b = count - 1;
    while (a < b) {
        const int64_t m = a + (b - a) / 2;
        if (seg[m + 1].start > lo) b = m; else a = m + 1;
    }
    for (int64_t j = a; j < count && lo < hi; j++) {
        const int64_t end = seg[j + 1].start < hi ? seg[j + 1].start : hi;
        const dg_seg *r = seg + j;
        if (end > lo)
            run_segment(r->ptr, r->dtype, lo - r->start, end - r->start, (uint32_t)r->key, (uint32_t)(r->key >> 32),
                        r->threshold, r->scale, r->offset);
        lo = end;
    }
}

/* Mask `count` tensors in one call. Per tensor j: data pointer ptrs[j],
 * numels[j] elements (contiguous), dtype code codes[j], threshold
 * thresholds[j] (at most 2^32), survivors' factor scales[j], element offset
 * offsets[j] (NULL: all 0) and the key: keys[j] (k0 | k1 << 32) when derive is
 * 0, else key_word(prefix, keys[j], stream) with keys[] holding tensor indices
 * (keys NULL: index j). A tensor with a NULL pointer, no elements, or
 * threshold 2^32 and factor 1 is left alone (the reference does not touch
 * it either). Work is split over the concatenation of the other tensors in
 * DG_CHUNK-element pieces, so many small tensors cost one parallel region, not
 * one each; the result does not depend on nthreads. Returns 0, or -1 on a bad
 * dtype code, size or allocation failure (checked before anything is written). */
int dropgrad_mask_tensors(int64_t count, const uint64_t *ptrs, const int64_t *numels, const int32_t *codes,
                          const uint64_t *keys, const uint64_t *thresholds, const double *scales,
                          const uint64_t *offsets, uint64_t prefix, uint64_t stream, int derive, int nthreads) {
    if (count <= 0) return 0;
    dg_seg *seg = (dg_seg *)malloc((size_t)(count + 1) * sizeof(dg_seg));
    if (!seg) return -1;
    int64_t m = 0, total = 0;
    for (int64_t j = 0; j < count; j++) {
        const int64_t n = numels[j];
        if (n < 0 || codes[j] < DG_F32 || codes[j] > DG_BF16 || n > INT64_MAX - total) { free(seg); return -1; }
        if (ptrs[j] == 0 || n == 0 || (thresholds[j] >= 0x100000000ull && scales[j] == 1.0)) continue;
        dg_seg *r = seg + m++;
        r->ptr = (void *)(uintptr_t)ptrs[j];
        r->start = total;
        r->key = derive ? key_word(prefix, keys ? keys[j] : (uint64_t)j, stream) : keys[j];
        r->threshold = thresholds[j];
        r->offset = offsets ? offsets[j] : 0;
        r->scale = scales[j];
        r->dtype = codes[j];
        total += n;
    }
    seg[m].start = total;
    const int64_t nchunks = (total + DG_CHUNK - 1) / DG_CHUNK;
    if (nthreads < 1 || total < DG_MIN_PARALLEL) nthreads = 1;
    if (nthreads > nchunks) nthreads = (int)(nchunks > 0 ? nchunks : 1);
    if (m == 0) {
        /* nothing to do */
    } else if (nthreads == 1) {
        run_range(m, seg, 0, total);
    } else {
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static)
#endif
        for (int64_t c = 0; c < nchunks; c++) {
            const int64_t lo = c * DG_CHUNK;
            run_range(m, seg, lo, lo + DG_CHUNK < total ? lo + DG_CHUNK : total);
        }
    }
    free(seg);
    return 0;
}

#ifdef DROPGRAD_TESTING
/* Keep bits only (1 = kept), for tests: out[i] for elements offset .. offset + n - 1. */
void dropgrad_keep_bits(uint8_t *out, int64_t n, uint32_t k0, uint32_t k1, uint64_t threshold, uint64_t offset) {
    const int all = threshold >= 0x100000000ull;
    for (int64_t i = 0; i < n; i++) {
        const uint64_t idx = offset + (uint64_t)i;
        const uint32_t c1 = (uint32_t)(idx >> 32) + k1;
        out[i] = all ? 1 : (uint8_t)keep_bit((uint32_t)idx, k0, c1 ^ (c1 >> 16), (uint32_t)threshold);
    }
}

/* Counts of elements offset .. offset + n - 1 whose hash is below each of
 * four thresholds (each < 2^32). No memory traffic: a full aligned 2^32 block,
 * where each count must equal its threshold exactly (for a fixed high word
 * the hash is a bijection of the low word), takes about a second. */
DG_CLONES static void count_run(uint32_t lo, int64_t n, uint32_t k0, uint32_t c1x, const uint32_t *t, uint64_t *acc) {
    uint32_t c0 = 0, c1 = 0, c2 = 0, c3 = 0; /* n <= DG_CHUNK, no overflow */
    uint32_t x = lo;
    for (int64_t i = 0; i < n; i++, x++) {
        uint32_t h = x ^ k0;
        h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u;
        h ^= c1x;
        h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
        c0 += h < t[0]; c1 += h < t[1]; c2 += h < t[2]; c3 += h < t[3];
    }
    acc[0] += c0; acc[1] += c1; acc[2] += c2; acc[3] += c3;
}

void dropgrad_count_below4(int64_t n, uint32_t k0, uint32_t k1, uint64_t offset, const uint32_t *thresholds,
                           uint64_t *counts, int nthreads) {
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    const int64_t nchunks = (n + DG_CHUNK - 1) / DG_CHUNK;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads < 1 ? 1 : nthreads) schedule(static) reduction(+ : a0, a1, a2, a3)
#endif
    for (int64_t c = 0; c < nchunks; c++) {
        uint64_t acc[4] = {0, 0, 0, 0};
        int64_t i = c * DG_CHUNK;
        const int64_t stop = i + DG_CHUNK < n ? i + DG_CHUNK : n;
        while (i < stop) {
            const uint64_t idx = offset + (uint64_t)i;
            const uint32_t lo = (uint32_t)idx, c1 = (uint32_t)(idx >> 32) + k1;
            int64_t m = stop - i;
            if ((uint64_t)m > 0x100000000ull - lo) m = (int64_t)(0x100000000ull - lo);
            count_run(lo, m, k0, c1 ^ (c1 >> 16), thresholds, acc);
            i += m;
        }
        a0 += acc[0]; a1 += acc[1]; a2 += acc[2]; a3 += acc[3];
    }
    counts[0] = a0; counts[1] = a1; counts[2] = a2; counts[3] = a3;
}
#endif /* DROPGRAD_TESTING */

int dropgrad_abi_version(void) { return 4; }

int dropgrad_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}
