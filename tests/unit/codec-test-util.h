/*
 * Shared helpers of the codec unit tests (test-delta, test-page-cache,
 * test-lane-codec, test-xbzrle-ref): a seeded PRNG and page mutators.
 *
 * Seeds: RDMAX_TEST_SEED=<n> replays a run; otherwise each test process
 * picks a fresh seed, so repeated runs explore more inputs. Every assertion
 * message that depends on random input prints the seed (SEED_FMT/SEED_ARG).
 */
#ifndef RDMAX_CODEC_TEST_UTIL_H
#define RDMAX_CODEC_TEST_UTIL_H

#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SEED_FMT "(seed %" PRIu64 "; replay with RDMAX_TEST_SEED=%" PRIu64 ")"
#define SEED_ARG(s) (s), (s)

static inline uint64_t test_seed(void)
{
    const char *env = getenv("RDMAX_TEST_SEED");
    struct timespec ts;

    if (env && *env) {
        return strtoull(env, NULL, 0);
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    return ((uint64_t)ts.tv_sec * 1000000007u) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 32);
}

/* splitmix64: tiny, good enough, and the same everywhere. */
struct test_rng {
    uint64_t s;
};

static inline uint64_t rng_next(struct test_rng *r)
{
    uint64_t z = (r->s += UINT64_C(0x9e3779b97f4a7c15));

    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

/* Uniform in [0, n). n > 0. */
static inline uint64_t rng_below(struct test_rng *r, uint64_t n)
{
    return rng_next(r) % n;
}

/* A nonzero byte (so XOR by it always changes a byte). */
static inline uint8_t rng_nonzero_byte(struct test_rng *r)
{
    return (uint8_t)(1 + rng_below(r, 255));
}

static inline void rng_fill(struct test_rng *r, uint8_t *p, size_t len)
{
    size_t i;

    for (i = 0; i + 8 <= len; i += 8) {
        uint64_t v = rng_next(r);

        memcpy(p + i, &v, 8);
    }
    for (; i < len; i++) {
        p[i] = (uint8_t)rng_next(r);
    }
}

/*
 * Turn page (len bytes) into a plausible next version, picking among
 * patterns that stress the run logic: unchanged, a few scattered bytes,
 * clustered runs, gaps of exactly 1..4 bytes, runs around the 127/128
 * varint boundary, the first or last byte, every byte, every other byte,
 * zeroing, fresh random contents, and a sparse page.
 */
static inline void mutate_page(struct test_rng *r, uint8_t *page, size_t len)
{
    size_t i, n, pos, run;

    switch (rng_below(r, 14)) {
    case 0: /* unchanged */
        break;
    case 1: /* a few scattered bytes */
        n = 1 + rng_below(r, 8);
        for (i = 0; i < n; i++) {
            page[rng_below(r, len)] ^= rng_nonzero_byte(r);
        }
        break;
    case 2: /* about 1% of bytes */
        for (i = 0; i < len / 100; i++) {
            page[rng_below(r, len)] ^= rng_nonzero_byte(r);
        }
        break;
    case 3: /* clustered runs */
        n = 1 + rng_below(r, 6);
        for (i = 0; i < n; i++) {
            pos = rng_below(r, len);
            run = 1 + rng_below(r, 300);
            for (; run && pos < len; run--, pos++) {
                page[pos] ^= rng_nonzero_byte(r);
            }
        }
        break;
    case 4: /* changes separated by gaps of exactly g bytes */
        run = 1 + rng_below(r, 4);
        pos = rng_below(r, 64);
        for (; pos < len; pos += run + 1 + rng_below(r, 3)) {
            page[pos] ^= rng_nonzero_byte(r);
        }
        break;
    case 5: /* runs and gaps near the 1- and 2-byte varint boundary */
        pos = rng_below(r, 130);
        while (pos < len) {
            run = 125 + rng_below(r, 6);
            for (; run && pos < len; run--, pos++) {
                page[pos] ^= rng_nonzero_byte(r);
            }
            pos += 1 + rng_below(r, 130);
        }
        break;
    case 6: /* the last byte */
        page[len - 1] ^= rng_nonzero_byte(r);
        break;
    case 7: /* the first byte */
        page[0] ^= rng_nonzero_byte(r);
        break;
    case 8: /* every byte */
        for (i = 0; i < len; i++) {
            page[i] ^= rng_nonzero_byte(r);
        }
        break;
    case 9: /* every other byte */
        for (i = rng_below(r, 2); i < len; i += 2) {
            page[i] ^= rng_nonzero_byte(r);
        }
        break;
    case 10: /* zeroed */
        memset(page, 0, len);
        break;
    case 11: /* fresh contents */
        rng_fill(r, page, len);
        break;
    case 12: /* sparse: zero page with a few words */
        memset(page, 0, len);
        n = rng_below(r, 16);
        for (i = 0; i < n; i++) {
            page[rng_below(r, len)] = rng_nonzero_byte(r);
        }
        break;
    default: /* a random fraction of bytes, 0..100% */
        n = rng_below(r, 101);
        for (i = 0; i < len; i++) {
            if (rng_below(r, 100) < n) {
                page[i] ^= rng_nonzero_byte(r);
            }
        }
        break;
    }
}

#endif
