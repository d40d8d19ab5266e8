/*
 * Delta codec: XOR against the previous version, zero-run-length encoded.
 *
 * Format of one encoded page (mirrored in docs/wire-protocol.md):
 *
 *   delta   := token*                 -- no token at all: page unchanged
 *   token   := zrun nzrun
 *   zrun    := varint                 -- z bytes equal to the old page
 *   nzrun   := varint(m) byte[m]      -- m >= 1 bytes of (old XOR new)
 *   varint  := b0                     -- b0 < 0x80: value b0
 *            | b0 b1                  -- b0 >= 0x80, 1 <= b1 < 0x80:
 *                                        value (b0 & 0x7f) | b1 << 7
 *
 * Tokens cover the page from offset 0 in order; the unchanged tail after the
 * last token is implied. Constraints, all checked by the decoder:
 *   - the first zrun may be 0 (page changes at offset 0); every later zrun
 *     is >= 3, because the encoder folds gaps of 1 or 2 unchanged bytes
 *     into the surrounding nzrun (their XOR bytes are 0): sent as a gap they
 *     would cost a zrun byte and a second length field, as much or more;
 *   - m >= 1, and z + m never runs past the end of the page;
 *   - varints are minimal (no 0x80 0x00) and at most 2 bytes (<= 0x3fff,
 *     enough for RDMAX_DELTA_MAX_LEN);
 *   - every nzrun's bytes are present in the input.
 *
 * Compared with QEMU's XBZRLE (reference/qemu-migration-stream.md 3.5, and
 * xbzrle-ref.c) the token grammar is the same, but we carry XOR bytes
 * rather than new bytes (so the same delta applies in place, and decoding
 * needs no separate "old" copy when the cache slot is the destination), and
 * the gap folding means our encoding is never longer for the same page
 * except in one corner (folding a 2-byte gap that pushes m past 127 costs a
 * byte) and much shorter for pages that change every other byte.
 *
 * Worst case: a token after the first has z >= 3, so its two varints
 * (1 + 2 bytes at most when z < 128, 2 + 2 when z >= 128) cost no more than
 * the z bytes it skips; only the first token can cost up to 3 bytes more than
 * the page bytes it covers (zrun 0, a 2-byte length). Hence
 * RDMAX_DELTA_BOUND(len) = len + 3.
 *
 * Encoder structure (SIMD variants): first a bitmap of the changed bytes is
 * built with vector compares (64 bytes per 64-bit word); an all-zero bitmap
 * is the "unchanged" answer. Then the runs are found by count-trailing-zeros
 * on that bitmap, so the cost of a page with few changes is the compare pass
 * plus a few instructions per run. The scalar variant does all of it a byte
 * at a time, independently, and is the oracle the tests compare against.
 */
#include "delta.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <glib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DELTA_X86 1
#endif

#undef G_LOG_DOMAIN
#define G_LOG_DOMAIN "rdmax-codec"

#define DELTA_MAX_WORDS (RDMAX_DELTA_MAX_LEN / 64)
#define DELTA_MIN_GAP 3 /* smallest zrun after the first token */

#define DELTA_INLINE static inline __attribute__((always_inline))

static bool delta_len_ok(size_t len)
{
    return len != 0 && len % 64 == 0 && len <= RDMAX_DELTA_MAX_LEN;
}

/* ---- varints ------------------------------------------------------------ */

DELTA_INLINE size_t varint_size(size_t v)
{
    return v < 0x80 ? 1 : 2;
}

DELTA_INLINE size_t varint_put(uint8_t *p, size_t v)
{
    if (v < 0x80) {
        p[0] = (uint8_t)v;
        return 1;
    }
    p[0] = (uint8_t)(v | 0x80);
    p[1] = (uint8_t)(v >> 7);
    return 2;
}

/* Reads a varint at src[*p]; false when truncated, overlong or non-minimal. */
DELTA_INLINE bool varint_get(const uint8_t *src, size_t src_len, size_t *p, size_t *v)
{
    size_t b0, b1;

    if (*p >= src_len) {
        return false;
    }
    b0 = src[(*p)++];
    if (b0 < 0x80) {
        *v = b0;
        return true;
    }
    if (*p >= src_len) {
        return false;
    }
    b1 = src[(*p)++];
    if (b1 == 0 || b1 >= 0x80) {
        return false;
    }
    *v = (b0 & 0x7f) | b1 << 7;
    return true;
}

/* ---- scalar oracle: a byte at a time, written to be obviously right ----- */

static ssize_t delta_encode_scalar(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur,
                                   size_t len)
{
    size_t pos = 0, n = 0;

    if (!delta_len_ok(len)) {
        return -EINVAL;
    }
    for (;;) {
        size_t s = pos, e, z, m, i;

        while (s < len && old[s] == cur[s]) {
            s++;
        }
        if (s == len) {
            break;
        }
        e = s;
        for (;;) {
            while (e < len && old[e] != cur[e]) {
                e++;
            }
            /* old[e] == cur[e] here, or e == len: fold a gap of 1 or 2. */
            if (e + 1 < len && old[e + 1] != cur[e + 1]) {
                e += 1;
                continue;
            }
            if (e + 2 < len && old[e + 2] != cur[e + 2]) {
                e += 2;
                continue;
            }
            break;
        }
        z = s - pos;
        m = e - s;
        if (varint_size(z) + varint_size(m) + m > cap - n) {
            return -EMSGSIZE;
        }
        n += varint_put(dst + n, z);
        n += varint_put(dst + n, m);
        for (i = 0; i < m; i++) {
            dst[n + i] = old[s + i] ^ cur[s + i];
        }
        n += m;
        pos = e;
    }
    return (ssize_t)n;
}

static ssize_t delta_decode_scalar(uint8_t *page, size_t len, const uint8_t *old,
                                   const uint8_t *src, size_t src_len)
{
    size_t pos = 0, p = 0, i;
    bool first = true;

    if (!delta_len_ok(len)) {
        return -EINVAL;
    }
    if (page != old) {
        for (i = 0; i < len; i++) {
            page[i] = old[i];
        }
    }
    while (p < src_len) {
        size_t z, m;

        if (!varint_get(src, src_len, &p, &z)) {
            return -EBADMSG;
        }
        if ((!first && z < DELTA_MIN_GAP) || z > len - pos) {
            return -EBADMSG;
        }
        pos += z;
        if (!varint_get(src, src_len, &p, &m)) {
            return -EBADMSG;
        }
        if (m == 0 || m > len - pos || m > src_len - p) {
            return -EBADMSG;
        }
        for (i = 0; i < m; i++) {
            page[pos + i] ^= src[p + i];
        }
        pos += m;
        p += m;
        first = false;
    }
    return (ssize_t)len;
}

/* ---- shared pieces of the fast variants --------------------------------- */

/*
 * These are always_inline so that each variant's copy is compiled with that
 * variant's target ISA (GCC allows inlining a generic function into a
 * target("avx2") one, and then vectorizes the loops for it).
 */

DELTA_INLINE uint64_t load64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, sizeof(v));
    return v;
}

DELTA_INLINE void store64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, sizeof(v));
}

/* dst[0..m) = a[0..m) ^ b[0..m) */
DELTA_INLINE void xor_copy(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t m)
{
    while (m >= 8) {
        store64(dst, load64(a) ^ load64(b));
        dst += 8;
        a += 8;
        b += 8;
        m -= 8;
    }
    while (m--) {
        *dst++ = *a++ ^ *b++;
    }
}

/* Index of the first set bit at or after `from`, or nwords * 64. */
DELTA_INLINE size_t bm_next_set(const uint64_t *bm, size_t nwords, size_t from)
{
    size_t w = from >> 6;
    uint64_t x;

    if (w >= nwords) {
        return nwords * 64;
    }
    x = bm[w] & (~UINT64_C(0) << (from & 63));
    while (x == 0) {
        if (++w == nwords) {
            return nwords * 64;
        }
        x = bm[w];
    }
    return w * 64 + (size_t)__builtin_ctzll(x);
}

/* Index of the first clear bit at or after `from`, or nwords * 64. */
DELTA_INLINE size_t bm_next_clear(const uint64_t *bm, size_t nwords, size_t from)
{
    size_t w = from >> 6;
    uint64_t x;

    if (w >= nwords) {
        return nwords * 64;
    }
    x = ~bm[w] & (~UINT64_C(0) << (from & 63));
    while (x == 0) {
        if (++w == nwords) {
            return nwords * 64;
        }
        x = ~bm[w];
    }
    return w * 64 + (size_t)__builtin_ctzll(x);
}

DELTA_INLINE bool bm_test(const uint64_t *bm, size_t i)
{
    return (bm[i >> 6] >> (i & 63)) & 1;
}

/* Emits the tokens for the changed-byte bitmap bm (not all zero). */
DELTA_INLINE ssize_t delta_walk(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur,
                                const uint64_t *bm, size_t nwords)
{
    size_t len = nwords * 64;
    size_t pos = 0, n = 0;
    size_t s = bm_next_set(bm, nwords, 0);

    while (s < len) {
        size_t e = bm_next_clear(bm, nwords, s + 1);
        size_t z, m;

        /* bm[e] is clear (or e == len): fold gaps of 1 or 2 clear bits. */
        for (;;) {
            if (e + 1 < len && bm_test(bm, e + 1)) {
                e = bm_next_clear(bm, nwords, e + 2);
            } else if (e + 2 < len && bm_test(bm, e + 2)) {
                e = bm_next_clear(bm, nwords, e + 3);
            } else {
                break;
            }
        }
        z = s - pos;
        m = e - s;
        if (varint_size(z) + varint_size(m) + m > cap - n) {
            return -EMSGSIZE;
        }
        n += varint_put(dst + n, z);
        n += varint_put(dst + n, m);
        xor_copy(dst + n, old + s, cur + s, m);
        n += m;
        pos = e;
        /* e, e + 1 and e + 2 are clear (or past the end). */
        s = bm_next_set(bm, nwords, e + DELTA_MIN_GAP);
    }
    return (ssize_t)n;
}

/* page[0..m) ^= src[0..m) */
DELTA_INLINE void xor_into(uint8_t *page, const uint8_t *src, size_t m)
{
    while (m >= 8) {
        store64(page, load64(page) ^ load64(src));
        page += 8;
        src += 8;
        m -= 8;
    }
    while (m--) {
        *page++ ^= *src++;
    }
}

DELTA_INLINE ssize_t delta_decode_fast(uint8_t *page, size_t len, const uint8_t *old,
                                       const uint8_t *src, size_t src_len)
{
    size_t pos = 0, p = 0;

    if (!delta_len_ok(len)) {
        return -EINVAL;
    }
    if (page != old) {
        memcpy(page, old, len);
    }
    while (p < src_len) {
        size_t z, m;

        if (!varint_get(src, src_len, &p, &z) || z > len - pos || (z < DELTA_MIN_GAP && pos != 0)) {
            return -EBADMSG;
        }
        pos += z;
        if (!varint_get(src, src_len, &p, &m) || m == 0 || m > len - pos || m > src_len - p) {
            return -EBADMSG;
        }
        xor_into(page + pos, src + p, m);
        pos += m;
        p += m;
    }
    return (ssize_t)len;
}

/* ---- x86 variants ------------------------------------------------------- */

#ifdef DELTA_X86

__attribute__((target("sse2"))) static ssize_t
delta_encode_sse2(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur, size_t len)
{
    uint64_t bm[DELTA_MAX_WORDS];
    uint64_t any = 0;
    size_t nwords = len / 64, w;

    if (!delta_len_ok(len)) {
        return -EINVAL;
    }
    for (w = 0; w < nwords; w++) {
        const __m128i *o = (const __m128i *)(old + w * 64);
        const __m128i *c = (const __m128i *)(cur + w * 64);
        uint64_t eq0 = (uint16_t)_mm_movemask_epi8(
            _mm_cmpeq_epi8(_mm_loadu_si128(o + 0), _mm_loadu_si128(c + 0)));
        uint64_t eq1 = (uint16_t)_mm_movemask_epi8(
            _mm_cmpeq_epi8(_mm_loadu_si128(o + 1), _mm_loadu_si128(c + 1)));
        uint64_t eq2 = (uint16_t)_mm_movemask_epi8(
            _mm_cmpeq_epi8(_mm_loadu_si128(o + 2), _mm_loadu_si128(c + 2)));
        uint64_t eq3 = (uint16_t)_mm_movemask_epi8(
            _mm_cmpeq_epi8(_mm_loadu_si128(o + 3), _mm_loadu_si128(c + 3)));
        uint64_t ne = ~(eq0 | eq1 << 16 | eq2 << 32 | eq3 << 48);

        bm[w] = ne;
        any |= ne;
    }
    if (any == 0) {
        return 0;
    }
    return delta_walk(dst, cap, old, cur, bm, nwords);
}

__attribute__((target("sse2"))) static ssize_t
delta_decode_sse2(uint8_t *page, size_t len, const uint8_t *old, const uint8_t *src, size_t src_len)
{
    return delta_decode_fast(page, len, old, src, src_len);
}

__attribute__((target("avx2"))) static ssize_t
delta_encode_avx2(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur, size_t len)
{
    uint64_t bm[DELTA_MAX_WORDS];
    uint64_t any = 0;
    size_t nwords = len / 64, w;

    if (!delta_len_ok(len)) {
        return -EINVAL;
    }
    for (w = 0; w < nwords; w++) {
        const __m256i *o = (const __m256i *)(old + w * 64);
        const __m256i *c = (const __m256i *)(cur + w * 64);
        uint64_t eq0 = (uint32_t)_mm256_movemask_epi8(
            _mm256_cmpeq_epi8(_mm256_loadu_si256(o + 0), _mm256_loadu_si256(c + 0)));
        uint64_t eq1 = (uint32_t)_mm256_movemask_epi8(
            _mm256_cmpeq_epi8(_mm256_loadu_si256(o + 1), _mm256_loadu_si256(c + 1)));
        uint64_t ne = ~(eq0 | eq1 << 32);

        bm[w] = ne;
        any |= ne;
    }
    if (any == 0) {
        return 0;
    }
    return delta_walk(dst, cap, old, cur, bm, nwords);
}

__attribute__((target("avx2"))) static ssize_t
delta_decode_avx2(uint8_t *page, size_t len, const uint8_t *old, const uint8_t *src, size_t src_len)
{
    return delta_decode_fast(page, len, old, src, src_len);
}

__attribute__((target("avx512f,avx512bw"))) static ssize_t
delta_encode_avx512(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur, size_t len)
{
    uint64_t bm[DELTA_MAX_WORDS];
    uint64_t any = 0;
    size_t nwords = len / 64, w;

    if (!delta_len_ok(len)) {
        return -EINVAL;
    }
    for (w = 0; w < nwords; w++) {
        uint64_t ne = _mm512_cmpneq_epi8_mask(_mm512_loadu_si512(old + w * 64),
                                              _mm512_loadu_si512(cur + w * 64));

        bm[w] = ne;
        any |= ne;
    }
    if (any == 0) {
        return 0;
    }
    return delta_walk(dst, cap, old, cur, bm, nwords);
}

__attribute__((target("avx512f,avx512bw"))) static ssize_t
delta_decode_avx512(uint8_t *page, size_t len, const uint8_t *old, const uint8_t *src,
                    size_t src_len)
{
    return delta_decode_fast(page, len, old, src, src_len);
}

#endif /* DELTA_X86 */

/* ---- dispatch ----------------------------------------------------------- */

static const struct rdmax_delta_ops delta_ops[RDMAX_DELTA_IMPL_COUNT] = {
    [RDMAX_DELTA_SCALAR] = {"scalar", RDMAX_DELTA_SCALAR, delta_encode_scalar, delta_decode_scalar},
#ifdef DELTA_X86
    [RDMAX_DELTA_SSE2] = {"sse2", RDMAX_DELTA_SSE2, delta_encode_sse2, delta_decode_sse2},
    [RDMAX_DELTA_AVX2] = {"avx2", RDMAX_DELTA_AVX2, delta_encode_avx2, delta_decode_avx2},
    [RDMAX_DELTA_AVX512] = {"avx512", RDMAX_DELTA_AVX512, delta_encode_avx512, delta_decode_avx512},
#endif
};

static const char *const delta_names[RDMAX_DELTA_IMPL_COUNT] = {
    [RDMAX_DELTA_AUTO] = "auto", [RDMAX_DELTA_SCALAR] = "scalar", [RDMAX_DELTA_SSE2] = "sse2",
    [RDMAX_DELTA_AVX2] = "avx2", [RDMAX_DELTA_AVX512] = "avx512",
};

static bool delta_cpu_has(enum rdmax_delta_impl impl)
{
    switch (impl) {
    case RDMAX_DELTA_SCALAR:
        return true;
#ifdef DELTA_X86
    case RDMAX_DELTA_SSE2:
        return __builtin_cpu_supports("sse2");
    case RDMAX_DELTA_AVX2:
        return __builtin_cpu_supports("avx2");
    case RDMAX_DELTA_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#endif
    default:
        return false;
    }
}

/*
 * The best one this CPU runs. AVX2 before AVX-512: on a page the encoder is
 * bound by loads and the per-run walk, not by vector width, and AVX-512
 * would lower the clock on some Intel parts for the whole core (bench-codec
 * reports all of them, so this can be revisited with figures).
 */
static enum rdmax_delta_impl delta_best(void)
{
    static const enum rdmax_delta_impl order[] = {RDMAX_DELTA_AVX2, RDMAX_DELTA_SSE2,
                                                  RDMAX_DELTA_SCALAR};
    size_t i;

    for (i = 0; i < G_N_ELEMENTS(order); i++) {
        if (delta_cpu_has(order[i])) {
            return order[i];
        }
    }
    return RDMAX_DELTA_SCALAR;
}

static const struct rdmax_delta_ops *delta_default;

static const struct rdmax_delta_ops *delta_choose(void)
{
    const char *env = getenv("RDMAX_DELTA_IMPL");
    enum rdmax_delta_impl impl;

    if (env && *env) {
        if (rdmax_delta_impl_parse(env, &impl) == 0 && rdmax_delta_ops_get(impl)) {
            return rdmax_delta_ops_get(impl);
        }
        g_warning("RDMAX_DELTA_IMPL=%s: unknown or unsupported here, using %s", env,
                  delta_names[delta_best()]);
    }
    return &delta_ops[delta_best()];
}

/* Chosen once; a race between two first callers stores the same answer. */
static const struct rdmax_delta_ops *delta_get_default(void)
{
    const struct rdmax_delta_ops *o = __atomic_load_n(&delta_default, __ATOMIC_ACQUIRE);

    if (G_UNLIKELY(o == NULL)) {
        o = delta_choose();
        __atomic_store_n(&delta_default, o, __ATOMIC_RELEASE);
    }
    return o;
}

ssize_t rdmax_delta_encode(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur,
                           size_t len)
{
    return delta_get_default()->encode(dst, cap, old, cur, len);
}

ssize_t rdmax_delta_decode(uint8_t *page, size_t len, const uint8_t *old, const uint8_t *src,
                           size_t src_len)
{
    return delta_get_default()->decode(page, len, old, src, src_len);
}

const struct rdmax_delta_ops *rdmax_delta_ops_get(enum rdmax_delta_impl impl)
{
    if (impl == RDMAX_DELTA_AUTO) {
        return delta_get_default();
    }
    if ((unsigned)impl >= RDMAX_DELTA_IMPL_COUNT || !delta_ops[impl].encode ||
        !delta_cpu_has(impl)) {
        return NULL;
    }
    return &delta_ops[impl];
}

int rdmax_delta_select(enum rdmax_delta_impl impl)
{
    const struct rdmax_delta_ops *o =
        impl == RDMAX_DELTA_AUTO ? &delta_ops[delta_best()] : rdmax_delta_ops_get(impl);

    if (!o) {
        return -ENOTSUP;
    }
    __atomic_store_n(&delta_default, o, __ATOMIC_RELEASE);
    return 0;
}

const char *rdmax_delta_impl_name(enum rdmax_delta_impl impl)
{
    if ((unsigned)impl >= RDMAX_DELTA_IMPL_COUNT) {
        return NULL;
    }
    return delta_names[impl];
}

int rdmax_delta_impl_parse(const char *name, enum rdmax_delta_impl *out)
{
    unsigned i;

    for (i = 0; i < RDMAX_DELTA_IMPL_COUNT; i++) {
        if (strcmp(name, delta_names[i]) == 0) {
            *out = (enum rdmax_delta_impl)i;
            return 0;
        }
    }
    return -EINVAL;
}
