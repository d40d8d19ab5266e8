/*
 * CRC-32C. The SSE4.2 crc32 instruction takes 3 cycles of latency but the
 * unit starts one a cycle, so one chain of it runs at a third of what the
 * unit can do. Long buffers are cut into three adjacent blocks whose CRCs
 * are three independent chains, then put together with two carry-less
 * multiplies: ~3x on a 4 KiB page. The table version is the fallback for
 * CPUs without SSE4.2 (or with RDMAX_NO_SIMD set) and the test oracle.
 *
 * The math. Bit order is reflected, as in the crc32 instruction and the
 * table: bit i of a 32-bit value is the coefficient of x^(31-i), bit i of a
 * 64-bit value that of x^(63-i). P is the Castagnoli polynomial; states
 * below carry no pre/post inversion (rdmax_crc32c does that). The state
 * after a message M, from state s, is linear in s and M:
 *     crc(s, M) = s * x^(8|M|) + crc(0, M)                         (mod P)
 * so for three blocks A, B, C of L bytes each
 *     crc(s, ABC) = crc(s, A) * x^(16L) + crc(0, B) * x^(8L) + crc(0, C)
 * where the three crc() on the right do not depend on each other.
 * Multiplying a state by x^n: the carry-less product of two reflected
 * 32-bit values a, b has its bit k from the terms x^(31-i) x^(31-j), i+j=k,
 * i.e. x^(62-k); read as a reflected 64-bit value (x^(63-k)) it is a*b*x.
 * And crc32q(0, w) = w * x^32 mod P. Hence
 *     crc32q(0, clmul(a, K)) = a * x^n mod P    for K = x^(n-33) mod P,
 * and by linearity both shifts above share one crc32q:
 *     crc(s, ABC) = crc32q(0, clmul(cA, x^(16L-33)) ^ clmul(cB, x^(8L-33))) ^ cC.
 * The K are computed at start-up for every block size used (L = 8k,
 * K_MIN <= k <= K_MAX): xpow[j] = x^(64j-33), so x^(8L-33) = xpow[k] and
 * x^(16L-33) = xpow[2k]. Each round takes the largest k that fits, so any
 * length >= 3*8*K_MIN is all three-way but for < 24 bytes.
 */
#include "crc32c.h"
#include "crc32c-impl.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* Block of 8*K_MAX bytes: rounds of up to 12 KiB, one combine (~20 cycles)
 * per ~1500 cycles of crc32. Below 3 blocks of 8*K_MIN bytes the combine
 * would cost about what the interleaving saves; such buffers run serially. */
#define K_MIN 8
#define K_MAX 512

static uint32_t table[8][256];
static uint32_t xpow[2 * K_MAX + 1]; /* xpow[j] = x^(64j - 33) mod P, j >= 1 */
static enum rdmax_crc32c_impl mode;  /* set once */
static bool have_sse42, have_pclmul;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        }
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
        }
    }
}

/* xpow[j + 1] = xpow[j] * x^64: eight byte steps of a zero byte, each
 * (c >> 8) ^ table[0][c & 0xff] = c * x^8 mod P. x^31 is bit 0. */
static void xpow_init(void)
{
    uint32_t v = 1;

    for (int j = 1; j <= 2 * K_MAX; j++) {
        xpow[j] = v;
        for (int b = 0; b < 8; b++) {
            v = (v >> 8) ^ table[0][v & 0xff];
        }
    }
}

static uint32_t crc32c_table(uint32_t crc, const uint8_t *p, size_t len)
{
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^ table[5][(v >> 16) & 0xff] ^
              table[4][(v >> 24) & 0xff] ^ table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
              table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
        p += 8;
        len -= 8;
    }
    while (len--) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    }
    return crc;
}

static void crc32c_init(void)
{
    table_init();
    xpow_init();
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
    have_pclmul = have_sse42 && __builtin_cpu_supports("pclmul");
#endif
    if (getenv("RDMAX_NO_SIMD") || !have_sse42) {
        mode = RDMAX_CRC32C_TABLE;
    } else {
        mode = have_pclmul ? RDMAX_CRC32C_3WAY_PCLMUL : RDMAX_CRC32C_3WAY_SW;
    }
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p,
                                                            size_t len)
{
    uint64_t c = crc;

    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    crc = (uint32_t)c;
    while (len--) {
        crc = __builtin_ia32_crc32qi(crc, *p++);
    }
    return crc;
}

/* a * ka * x^33 + b * kb * x^33 (mod P): see the top of the file. */
typedef uint32_t combine_fn(uint32_t a, uint32_t ka, uint32_t b, uint32_t kb);

__attribute__((target("sse4.2,pclmul"))) static uint32_t combine_pclmul(uint32_t a, uint32_t ka,
                                                                        uint32_t b, uint32_t kb)
{
    __m128i v = _mm_set_epi64x(b, a);
    __m128i k = _mm_set_epi64x(kb, ka);
    __m128i w = _mm_xor_si128(_mm_clmulepi64_si128(v, k, 0x00), _mm_clmulepi64_si128(v, k, 0x11));

    return (uint32_t)__builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(w));
}

/* The same multiply in C, for SSE4.2 CPUs without PCLMULQDQ (Nehalem):
 * ~100 cycles a round instead of ~20, still far below the ~1500 saved. */
static uint64_t clmul32(uint32_t a, uint32_t b)
{
    uint64_t r = 0;

    for (int i = 0; i < 32; i++) {
        r ^= ((uint64_t)a << i) & -(uint64_t)((b >> i) & 1);
    }
    return r;
}

__attribute__((target("sse4.2"))) static uint32_t combine_sw(uint32_t a, uint32_t ka, uint32_t b,
                                                             uint32_t kb)
{
    return (uint32_t)__builtin_ia32_crc32di(0, clmul32(a, ka) ^ clmul32(b, kb));
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_3way(uint32_t crc, const uint8_t *p,
                                                              size_t len, combine_fn *combine)
{
    while (len >= 3 * 8 * K_MIN) {
        size_t k = len / 24 < K_MAX ? len / 24 : K_MAX;
        size_t blk = 8 * k;
        const uint8_t *a = p, *b = p + blk, *c = p + 2 * blk;
        uint64_t ca = crc, cb = 0, cc = 0;

        for (size_t i = 0; i < blk; i += 8) {
            uint64_t va, vb, vc;
            memcpy(&va, a + i, 8);
            memcpy(&vb, b + i, 8);
            memcpy(&vc, c + i, 8);
            ca = __builtin_ia32_crc32di(ca, va);
            cb = __builtin_ia32_crc32di(cb, vb);
            cc = __builtin_ia32_crc32di(cc, vc);
        }
        crc = combine((uint32_t)ca, xpow[2 * k], (uint32_t)cb, xpow[k]) ^ (uint32_t)cc;
        p += 3 * blk;
        len -= 3 * blk;
    }
    return crc32c_hw(crc, p, len);
}
#endif

const char *rdmax_crc32c_impl_name(enum rdmax_crc32c_impl impl)
{
    static const char *const names[] = {
        [RDMAX_CRC32C_TABLE] = "table",
        [RDMAX_CRC32C_SERIAL] = "sse4.2-serial",
        [RDMAX_CRC32C_3WAY_SW] = "sse4.2-3way-swmul",
        [RDMAX_CRC32C_3WAY_PCLMUL] = "sse4.2-3way-pclmul",
    };
    return (unsigned)impl < RDMAX_CRC32C_NIMPL ? names[impl] : "?";
}

bool rdmax_crc32c_impl_supported(enum rdmax_crc32c_impl impl)
{
    pthread_once(&once, crc32c_init);
    switch (impl) {
    case RDMAX_CRC32C_TABLE:
        return true;
    case RDMAX_CRC32C_SERIAL:
    case RDMAX_CRC32C_3WAY_SW:
        return have_sse42;
    case RDMAX_CRC32C_3WAY_PCLMUL:
        return have_pclmul;
    default:
        return false;
    }
}

enum rdmax_crc32c_impl rdmax_crc32c_selected(void)
{
    pthread_once(&once, crc32c_init);
    return mode;
}

uint32_t rdmax_crc32c_with(enum rdmax_crc32c_impl impl, uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&once, crc32c_init);
    crc = ~crc;
    switch (impl) {
#if defined(__x86_64__)
    case RDMAX_CRC32C_SERIAL:
        return ~crc32c_hw(crc, buf, len);
    case RDMAX_CRC32C_3WAY_SW:
        return ~crc32c_3way(crc, buf, len, combine_sw);
    case RDMAX_CRC32C_3WAY_PCLMUL:
        return ~crc32c_3way(crc, buf, len, combine_pclmul);
#endif
    default:
        return ~crc32c_table(crc, buf, len);
    }
}

uint32_t rdmax_crc32c(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&once, crc32c_init);
    crc = ~crc;
#if defined(__x86_64__)
    if (mode == RDMAX_CRC32C_3WAY_PCLMUL) {
        return ~crc32c_3way(crc, buf, len, combine_pclmul);
    }
    if (mode == RDMAX_CRC32C_3WAY_SW) {
        return ~crc32c_3way(crc, buf, len, combine_sw);
    }
#endif
    return ~crc32c_table(crc, buf, len);
}
