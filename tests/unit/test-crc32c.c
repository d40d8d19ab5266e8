/*
 * CRC-32C (transport/crc32c.c): every implementation this CPU runs against
 * the table, on every length up to past a page at random alignments, on
 * long buffers around the three-way round sizes, and chained in random
 * pieces; and the choice rdmax_crc32c makes, RDMAX_NO_SIMD included.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "crc32c-impl.h"
#include "crc32c.h"

static uint64_t rng_s;

static uint64_t rng(void)
{
    uint64_t z = (rng_s += UINT64_C(0x9e3779b97f4a7c15));

    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static void fill(uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        p[i] = (uint8_t)rng();
    }
}

/*
 * len random bytes at a random offset 0..63 of a buffer that ends right
 * after them, so a read past the end is a sanitizer error. Free *base.
 */
static const uint8_t *random_buf(size_t len, void **base)
{
    size_t off = rng() % 64;
    uint8_t *b = malloc(off + len + 1);

    cr_assert_not_null(b);
    fill(b + off, len);
    *base = b;
    return b + off;
}

/* Every implementation this CPU runs must give the table's CRC. */
static void check_all(uint32_t crc, const uint8_t *p, size_t len)
{
    uint32_t want = rdmax_crc32c_with(RDMAX_CRC32C_TABLE, crc, p, len);

    for (int impl = 0; impl < RDMAX_CRC32C_NIMPL; impl++) {
        if (rdmax_crc32c_impl_supported(impl)) {
            cr_assert_eq(rdmax_crc32c_with(impl, crc, p, len), want,
                         "%s: %zu bytes at offset %u from crc %08x", rdmax_crc32c_impl_name(impl),
                         len, (unsigned)((uintptr_t)p % 64), crc);
        }
    }
    cr_assert_eq(rdmax_crc32c(crc, p, len), want, "rdmax_crc32c: %zu bytes", len);
}

Test(crc32c, matches_the_standard_check_value)
{
    for (int impl = 0; impl < RDMAX_CRC32C_NIMPL; impl++) {
        if (!rdmax_crc32c_impl_supported(impl)) {
            continue;
        }
        cr_assert_eq(rdmax_crc32c_with(impl, 0, "123456789", 9), 0xe3069283u, "%s",
                     rdmax_crc32c_impl_name(impl));
        /* Incremental equals one-shot, at every split. */
        for (size_t i = 0; i <= 9; i++) {
            uint32_t c = rdmax_crc32c_with(impl, 0, "123456789", i);
            cr_assert_eq(rdmax_crc32c_with(impl, c, "123456789" + i, 9 - i), 0xe3069283u);
        }
    }
    cr_assert_eq(rdmax_crc32c(0, "123456789", 9), 0xe3069283u);
}

/* The CRC-32C definition, one bit at a time: shares no code with the
 * table, so the oracle itself is checked on lengths past the threshold. */
static uint32_t bitwise(const uint8_t *p, size_t len)
{
    uint32_t c = ~0u;

    for (size_t i = 0; i < len; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        }
    }
    return ~c;
}

Test(crc32c, matches_the_definition_on_pages)
{
    static uint8_t page[4096], zero[4096];

    for (size_t i = 0; i < sizeof(page); i++) {
        page[i] = (uint8_t)i;
    }
    /* Pinned, so a change to the definition above is noticed too. */
    cr_assert_eq(bitwise(zero, sizeof(zero)), 0x98f94189u);
    for (int impl = 0; impl < RDMAX_CRC32C_NIMPL; impl++) {
        if (rdmax_crc32c_impl_supported(impl)) {
            cr_assert_eq(rdmax_crc32c_with(impl, 0, page, sizeof(page)),
                         bitwise(page, sizeof(page)), "%s", rdmax_crc32c_impl_name(impl));
            cr_assert_eq(rdmax_crc32c_with(impl, 0, zero, sizeof(zero)), 0x98f94189u, "%s",
                         rdmax_crc32c_impl_name(impl));
            cr_assert_eq(rdmax_crc32c_with(impl, 0, page, 3000), bitwise(page, 3000), "%s",
                         rdmax_crc32c_impl_name(impl));
        }
    }
}

Test(crc32c, every_length_to_4200_at_random_alignments)
{
    rng_s = 1;
    for (size_t len = 0; len <= 4200; len++) {
        void *base;
        const uint8_t *p = random_buf(len, &base);

        check_all(len % 3 ? (uint32_t)rng() : 0, p, len);
        free(base);
    }
}

/* Around the round sizes: the threshold (3 x 64 bytes), the largest round
 * (3 x 4096), several rounds and a short last one, 256 KiB. */
Test(crc32c, long_buffers_around_round_sizes)
{
    static const size_t lens[] = {191,   192,    193,    215,    216,     12287,
                                  12288, 12289,  12311,  24576,  24767,   36863,
                                  65536, 262144, 262151, 266240, 1 << 20, (1 << 20) + 4095};

    rng_s = 2;
    for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
        for (int rep = 0; rep < 3; rep++) {
            void *base;
            const uint8_t *p = random_buf(lens[i], &base);

            check_all((uint32_t)rng(), p, lens[i]);
            free(base);
        }
    }
}

/* Chained calls over random pieces (empty, tiny, around the threshold and
 * the largest round) give the one-shot CRC, in each implementation. */
Test(crc32c, chained_calls_equal_one_shot)
{
    enum { N = 200000 };
    void *base;
    const uint8_t *p;
    uint32_t want;

    rng_s = 3;
    p = random_buf(N, &base);
    want = rdmax_crc32c_with(RDMAX_CRC32C_TABLE, 0, p, N);
    for (int trial = 0; trial < 40; trial++) {
        for (int impl = -1; impl < RDMAX_CRC32C_NIMPL; impl++) {
            uint64_t seed = rng_s;
            size_t at = 0;
            uint32_t c = 0;

            if (impl >= 0 && !rdmax_crc32c_impl_supported(impl)) {
                continue;
            }
            while (at < N) {
                size_t max = (size_t[]){8, 200, 5000, 40000}[rng() % 4];
                size_t n = rng() % (max + 1);

                n = n < N - at ? n : N - at;
                c = impl < 0 ? rdmax_crc32c(c, p + at, n) : rdmax_crc32c_with(impl, c, p + at, n);
                at += n;
            }
            cr_assert_eq(c, want, "%s, trial %d",
                         impl < 0 ? "rdmax_crc32c" : rdmax_crc32c_impl_name(impl), trial);
            if (impl < RDMAX_CRC32C_NIMPL - 1) {
                rng_s = seed; /* the same pieces for each implementation */
            }
        }
    }
    free(base);
}

/* Each test is its own process, so each picks afresh. */
Test(crc32c, picks_the_fastest_supported)
{
    unsetenv("RDMAX_NO_SIMD");
    if (rdmax_crc32c_impl_supported(RDMAX_CRC32C_3WAY_PCLMUL)) {
        cr_assert_eq(rdmax_crc32c_selected(), RDMAX_CRC32C_3WAY_PCLMUL);
    } else if (rdmax_crc32c_impl_supported(RDMAX_CRC32C_3WAY_SW)) {
        cr_assert_eq(rdmax_crc32c_selected(), RDMAX_CRC32C_3WAY_SW);
    } else {
        cr_assert_eq(rdmax_crc32c_selected(), RDMAX_CRC32C_TABLE);
    }
}

Test(crc32c, no_simd_env_forces_the_table)
{
    uint8_t b[5000];

    setenv("RDMAX_NO_SIMD", "1", 1);
    rng_s = 4;
    fill(b, sizeof(b));
    cr_assert_eq(rdmax_crc32c_selected(), RDMAX_CRC32C_TABLE);
    cr_assert_eq(rdmax_crc32c(7, b, sizeof(b)),
                 rdmax_crc32c_with(RDMAX_CRC32C_TABLE, 7, b, sizeof(b)));
    cr_assert_eq(rdmax_crc32c(0, "123456789", 9), 0xe3069283u);
}
