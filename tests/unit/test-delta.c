/*
 * Delta codec: edge cases from STYLE.md rule 38 for every implementation,
 * every SIMD implementation against the scalar oracle, seeded random round
 * trips, and malformed input.
 */
#include <criterion/criterion.h>
#include <errno.h>

#include "codec-test-util.h"
#include "delta.h"
#include "xbzrle-ref.h"

#define LEN 4096u
#define BOUND RDMAX_DELTA_BOUND(LEN)

static const struct rdmax_delta_ops *impls[RDMAX_DELTA_IMPL_COUNT];
static size_t n_impls;

static void setup(void)
{
    int i;

    n_impls = 0;
    for (i = RDMAX_DELTA_SCALAR; i < RDMAX_DELTA_IMPL_COUNT; i++) {
        const struct rdmax_delta_ops *o = rdmax_delta_ops_get((enum rdmax_delta_impl)i);

        if (o) {
            impls[n_impls++] = o;
        }
    }
    cr_assert(n_impls >= 1 && impls[0]->impl == RDMAX_DELTA_SCALAR);
}

TestSuite(delta, .init = setup);

static uint8_t old_pg[LEN], cur_pg[LEN], out_pg[LEN];
static uint8_t enc[BOUND + 64], enc2[2 * LEN];

/* Encodes with every implementation; checks they agree; returns the result. */
static ssize_t encode_all(size_t cap, uint64_t seed)
{
    ssize_t ref = impls[0]->encode(enc, cap, old_pg, cur_pg, LEN);
    size_t i;

    for (i = 1; i < n_impls; i++) {
        ssize_t r = impls[i]->encode(enc2, cap, old_pg, cur_pg, LEN);

        cr_assert_eq(r, ref, "%s encode gave %zd, scalar %zd " SEED_FMT, impls[i]->name, r, ref,
                     SEED_ARG(seed));
        if (r > 0) {
            cr_assert(memcmp(enc, enc2, (size_t)r) == 0,
                      "%s encoding differs from scalar " SEED_FMT, impls[i]->name, SEED_ARG(seed));
        }
    }
    return ref;
}

/* Decodes enc[0..n) against old_pg with every implementation, in and out of place. */
static void decode_all_expect(size_t n, const uint8_t *want, uint64_t seed)
{
    static uint8_t inplace[LEN];
    size_t i;

    for (i = 0; i < n_impls; i++) {
        ssize_t r = impls[i]->decode(out_pg, LEN, old_pg, enc, n);

        cr_assert_eq(r, (ssize_t)LEN, "%s decode gave %zd " SEED_FMT, impls[i]->name, r,
                     SEED_ARG(seed));
        cr_assert(memcmp(out_pg, want, LEN) == 0, "%s decode wrong page " SEED_FMT, impls[i]->name,
                  SEED_ARG(seed));
        memcpy(inplace, old_pg, LEN);
        r = impls[i]->decode(inplace, LEN, inplace, enc, n);
        cr_assert_eq(r, (ssize_t)LEN);
        cr_assert(memcmp(inplace, want, LEN) == 0, "%s in-place decode wrong " SEED_FMT,
                  impls[i]->name, SEED_ARG(seed));
    }
}

/* Every implementation gives the same verdict (and page, when accepted). */
static ssize_t decode_all_agree(const uint8_t *src, size_t n, uint64_t seed)
{
    static uint8_t ref_pg[LEN];
    ssize_t ref = impls[0]->decode(ref_pg, LEN, old_pg, src, n);
    size_t i;

    cr_assert(ref == (ssize_t)LEN || ref == -EBADMSG, "scalar decode gave %zd " SEED_FMT, ref,
              SEED_ARG(seed));
    for (i = 1; i < n_impls; i++) {
        ssize_t r = impls[i]->decode(out_pg, LEN, old_pg, src, n);

        cr_assert_eq(r, ref, "%s decode gave %zd, scalar %zd " SEED_FMT, impls[i]->name, r, ref,
                     SEED_ARG(seed));
        if (r == (ssize_t)LEN) {
            cr_assert(memcmp(out_pg, ref_pg, LEN) == 0, "%s decoded page differs " SEED_FMT,
                      impls[i]->name, SEED_ARG(seed));
        }
    }
    return ref;
}

Test(delta, encode_identical_page_returns_zero)
{
    struct test_rng r = {test_seed()};

    rng_fill(&r, old_pg, LEN);
    memcpy(cur_pg, old_pg, LEN);
    cr_assert_eq(encode_all(BOUND, r.s), 0);
    cr_assert_eq(encode_all(0, r.s), 0, "unchanged needs no room at all");
    decode_all_expect(0, cur_pg, r.s);
}

Test(delta, zero_page_against_zero_is_unchanged_and_against_data_is_full)
{
    ssize_t n;

    memset(old_pg, 0, LEN);
    memset(cur_pg, 0, LEN);
    cr_assert_eq(encode_all(BOUND, 0), 0);

    memset(old_pg, 0xa5, LEN);
    n = encode_all(BOUND, 0);
    cr_assert_eq(n, (ssize_t)LEN + 3, "one run of 4096: zrun 0, 2-byte length");
    cr_assert_eq(enc[0], 0);
    cr_assert_eq(enc[1], 0x80);
    cr_assert_eq(enc[2], 0x20);
    decode_all_expect((size_t)n, cur_pg, 0);
}

Test(delta, last_byte_change_costs_four_bytes)
{
    static const uint8_t want[] = {0xff, 0x1f, 0x01, 0x42};
    ssize_t n;

    memset(old_pg, 7, LEN);
    memcpy(cur_pg, old_pg, LEN);
    cur_pg[LEN - 1] ^= 0x42;
    n = encode_all(BOUND, 0);
    cr_assert_eq(n, 4);
    cr_assert(memcmp(enc, want, 4) == 0, "zrun 4095, m 1, xor 0x42");
    decode_all_expect(4, cur_pg, 0);
}

Test(delta, first_byte_change_starts_with_zero_zrun)
{
    memset(old_pg, 1, LEN);
    memcpy(cur_pg, old_pg, LEN);
    cur_pg[0] = 3;
    cr_assert_eq(encode_all(BOUND, 0), 3);
    cr_assert_eq(enc[0], 0);
    cr_assert_eq(enc[1], 1);
    cr_assert_eq(enc[2], 2);
    decode_all_expect(3, cur_pg, 0);
}

Test(delta, gaps_of_one_or_two_are_folded_three_is_not)
{
    memset(old_pg, 0, LEN);
    memset(cur_pg, 0, LEN);
    /* changes at 10, 12 (gap 1), 15 (gap 2), 19 (gap 3) */
    cur_pg[10] = cur_pg[12] = cur_pg[15] = cur_pg[19] = 9;
    cr_assert_eq(encode_all(BOUND, 0), 1 + 1 + 6 + 1 + 1 + 1);
    cr_assert_eq(enc[0], 10);
    cr_assert_eq(enc[1], 6);
    cr_assert_eq(enc[8], 3);
    cr_assert_eq(enc[9], 1);
    decode_all_expect(11, cur_pg, 0);
}

Test(delta, every_other_byte_changed_is_one_run_within_bound)
{
    size_t i;
    ssize_t n;

    memset(old_pg, 0, LEN);
    memset(cur_pg, 0, LEN);
    for (i = 0; i < LEN; i += 2) {
        cur_pg[i] = 1;
    }
    n = encode_all(BOUND, 0);
    cr_assert_eq(n, (ssize_t)(1 + 2 + LEN - 1), "QEMU's format would need 6144 bytes");
    decode_all_expect((size_t)n, cur_pg, 0);
}

Test(delta, worst_case_expansion_is_bound_and_smaller_cap_gives_emsgsize)
{
    size_t i;

    for (i = 0; i < LEN; i++) {
        old_pg[i] = (uint8_t)i;
        cur_pg[i] = (uint8_t)~i;
    }
    cr_assert_eq(encode_all(BOUND, 0), (ssize_t)BOUND);
    cr_assert_eq(encode_all(BOUND - 1, 0), -EMSGSIZE);
    cr_assert_eq(encode_all(LEN, 0), -EMSGSIZE, "full page is cheaper: caller sends it raw");
    cr_assert_eq(encode_all(0, 0), -EMSGSIZE);
}

Test(delta, encode_fits_exactly_at_its_length_and_not_one_byte_less)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    int it;

    for (it = 0; it < 2000; it++) {
        ssize_t n;

        rng_fill(&r, old_pg, LEN);
        memcpy(cur_pg, old_pg, LEN);
        mutate_page(&r, cur_pg, LEN);
        n = encode_all(BOUND, seed);
        cr_assert(n >= 0 && n <= (ssize_t)BOUND, SEED_FMT, SEED_ARG(seed));
        if (n > 0) {
            cr_assert_eq(encode_all((size_t)n, seed), n, SEED_FMT, SEED_ARG(seed));
            cr_assert_eq(encode_all((size_t)n - 1, seed), -EMSGSIZE, SEED_FMT, SEED_ARG(seed));
        }
    }
}

/* 10 000 seeded sequences of page versions, each delta decoded in turn. */
Test(delta, random_version_sequences_round_trip_on_every_impl, .timeout = 120)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    static uint8_t recv_pg[LEN];
    int seq;

    for (seq = 0; seq < 10000; seq++) {
        int v, versions = 1 + (int)rng_below(&r, 4);

        if (rng_below(&r, 4) == 0) {
            memset(cur_pg, 0, LEN);
        } else {
            rng_fill(&r, cur_pg, LEN);
        }
        memcpy(recv_pg, cur_pg, LEN);
        for (v = 0; v < versions; v++) {
            ssize_t n;

            memcpy(old_pg, cur_pg, LEN);
            mutate_page(&r, cur_pg, LEN);
            n = encode_all(BOUND, seed);
            cr_assert(n >= 0, "encode %zd at sequence %d " SEED_FMT, n, seq, SEED_ARG(seed));
            cr_assert_eq(n == 0, memcmp(old_pg, cur_pg, LEN) == 0, SEED_FMT, SEED_ARG(seed));
            decode_all_expect((size_t)n, cur_pg, seed);
            /* The receiver's copy follows along, decoding in place. */
            cr_assert_eq(rdmax_delta_decode(recv_pg, LEN, recv_pg, enc, (size_t)n), (ssize_t)LEN);
            cr_assert(memcmp(recv_pg, cur_pg, LEN) == 0, "sequence %d version %d " SEED_FMT, seq, v,
                      SEED_ARG(seed));
        }
    }
}

Test(delta, other_page_lengths_round_trip)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    static const size_t lens[] = {64, 128, 1024, 4160, RDMAX_DELTA_MAX_LEN};
    static uint8_t o[RDMAX_DELTA_MAX_LEN], c[RDMAX_DELTA_MAX_LEN], d[RDMAX_DELTA_MAX_LEN];
    static uint8_t e1[RDMAX_DELTA_BOUND(RDMAX_DELTA_MAX_LEN)];
    static uint8_t e2[RDMAX_DELTA_BOUND(RDMAX_DELTA_MAX_LEN)];
    size_t l, i;
    int it;

    for (l = 0; l < sizeof(lens) / sizeof(lens[0]); l++) {
        for (it = 0; it < 300; it++) {
            ssize_t n0, n;

            rng_fill(&r, o, lens[l]);
            memcpy(c, o, lens[l]);
            mutate_page(&r, c, lens[l]);
            n0 = impls[0]->encode(e1, RDMAX_DELTA_BOUND(lens[l]), o, c, lens[l]);
            cr_assert(n0 >= 0, SEED_FMT, SEED_ARG(seed));
            for (i = 0; i < n_impls; i++) {
                n = impls[i]->encode(e2, RDMAX_DELTA_BOUND(lens[l]), o, c, lens[l]);
                cr_assert_eq(n, n0, "%s len %zu " SEED_FMT, impls[i]->name, lens[l],
                             SEED_ARG(seed));
                cr_assert(memcmp(e1, e2, (size_t)n) == 0);
                cr_assert_eq(impls[i]->decode(d, lens[l], o, e1, (size_t)n0), (ssize_t)lens[l]);
                cr_assert(memcmp(d, c, lens[l]) == 0, "%s len %zu " SEED_FMT, impls[i]->name,
                          lens[l], SEED_ARG(seed));
            }
        }
    }
}

Test(delta, bad_lengths_are_einval)
{
    static const size_t bad[] = {0, 63, 4095, 4097, RDMAX_DELTA_MAX_LEN + 64};
    static uint8_t big[RDMAX_DELTA_MAX_LEN + 64];
    size_t i, b;

    for (i = 0; i < n_impls; i++) {
        for (b = 0; b < sizeof(bad) / sizeof(bad[0]); b++) {
            cr_assert_eq(impls[i]->encode(enc, BOUND, big, big, bad[b]), -EINVAL);
            cr_assert_eq(impls[i]->decode(big, bad[b], big, enc, 0), -EINVAL);
        }
    }
}

/* Hand-made malformed deltas: each must be -EBADMSG on every implementation. */
Test(delta, malformed_input_is_ebadmsg)
{
    static const struct {
        const char *what;
        uint8_t bytes[8];
        size_t len;
    } cases[] = {
        {"zrun without nzrun", {5}, 1},
        {"nzrun length without data", {0, 2, 0xaa}, 3},
        {"zero-length nzrun", {0, 0}, 2},
        {"second zrun of 0", {0, 1, 0xaa, 0, 1, 0xbb}, 6},
        {"second zrun of 1 (would have been folded)", {0, 1, 0xaa, 1, 1, 0xbb}, 6},
        {"second zrun of 2 (would have been folded)", {0, 1, 0xaa, 2, 1, 0xbb}, 6},
        {"non-minimal varint", {0x80, 0x00, 1, 0xaa}, 4},
        {"three-byte varint", {0x80, 0x80, 0x01, 1, 0xaa}, 5},
        {"truncated two-byte varint", {0x85}, 1},
        {"zrun past the end", {0x81, 0x20, 1, 0xaa}, 4},        /* 4097 */
        {"nzrun past the end", {0xff, 0x1f, 2, 0xaa, 0xbb}, 5}, /* 4095 + 2 */
        {"token after the page is covered", {0xff, 0x1f, 1, 0xaa, 3, 1, 0xbb}, 7},
    };
    size_t c;

    memset(old_pg, 0x11, LEN);
    for (c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        size_t i;

        for (i = 0; i < n_impls; i++) {
            cr_assert_eq(impls[i]->decode(out_pg, LEN, old_pg, cases[c].bytes, cases[c].len),
                         -EBADMSG, "%s: %s", impls[i]->name, cases[c].what);
        }
    }
}

Test(delta, boundary_cases_that_are_valid_decode)
{
    static const uint8_t last[] = {0xff, 0x1f, 1, 0xaa};    /* byte 4095 */
    static const uint8_t gap3[] = {0, 1, 0xaa, 3, 1, 0xbb}; /* bytes 0 and 4 */
    static const uint8_t maxrun[] = {0, 0x80, 0x20};        /* + 4096 bytes */
    static uint8_t full[3 + LEN];

    memset(old_pg, 0, LEN);
    cr_assert_eq(decode_all_agree(last, sizeof(last), 0), (ssize_t)LEN);
    cr_assert_eq(decode_all_agree(gap3, sizeof(gap3), 0), (ssize_t)LEN);
    memcpy(full, maxrun, 3);
    memset(full + 3, 0x5a, LEN);
    cr_assert_eq(decode_all_agree(full, sizeof(full), 0), (ssize_t)LEN);
    cr_assert_eq(decode_all_agree(full, sizeof(full) - 1, 0), -EBADMSG);
}

/*
 * Every prefix of valid deltas and random corruptions of them: no
 * implementation crashes (run under ASan in CI), reads or writes outside
 * its buffers, or disagrees with the oracle on the verdict or the page.
 */
Test(delta, truncated_or_corrupted_input_never_escapes_and_impls_agree, .timeout = 120)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    int it;

    for (it = 0; it < 3000; it++) {
        ssize_t n;
        size_t cut, k;
        uint8_t *copy;

        rng_fill(&r, old_pg, LEN);
        memcpy(cur_pg, old_pg, LEN);
        mutate_page(&r, cur_pg, LEN);
        n = encode_all(BOUND, seed);
        if (n <= 0) {
            continue;
        }
        /* Exact-size heap copies, so ASan sees any over-read. */
        for (k = 0; k < 4; k++) {
            cut = (size_t)rng_below(&r, (uint64_t)n);
            copy = malloc(cut ? cut : 1);
            memcpy(copy, enc, cut);
            decode_all_agree(copy, cut, seed);
            free(copy);
        }
        copy = malloc((size_t)n);
        memcpy(copy, enc, (size_t)n);
        for (k = 0; k < 1 + rng_below(&r, 3); k++) {
            copy[rng_below(&r, (uint64_t)n)] ^= rng_nonzero_byte(&r);
        }
        decode_all_agree(copy, (size_t)n, seed);
        free(copy);
    }
}

/* Pure noise as input: never crashes; impls agree. */
Test(delta, random_bytes_as_input_impls_agree)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    int it;

    memset(old_pg, 0x3c, LEN);
    for (it = 0; it < 20000; it++) {
        size_t n = (size_t)rng_below(&r, 64);
        uint8_t *src = malloc(n ? n : 1);

        rng_fill(&r, src, n);
        /* Bias towards small varints so some inputs get deep. */
        if (n && rng_below(&r, 2)) {
            size_t i;

            for (i = 0; i < n; i++) {
                src[i] &= 0x7f;
            }
        }
        decode_all_agree(src, n, seed);
        free(src);
    }
}

Test(delta, output_is_never_longer_than_qemu_xbzrle_in_total)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    uint64_t ours = 0, qemu = 0;
    int it;

    for (it = 0; it < 3000; it++) {
        ssize_t a, b;

        rng_fill(&r, old_pg, LEN);
        memcpy(cur_pg, old_pg, LEN);
        mutate_page(&r, cur_pg, LEN);
        a = rdmax_delta_encode(enc, BOUND, old_pg, cur_pg, LEN);
        b = rdmax_xbzrle_ref_encode(enc2, 2 * LEN, old_pg, cur_pg, LEN);
        cr_assert(a >= 0 && b >= 0);
        cr_assert_eq(a == 0, b == 0);
        ours += (uint64_t)a;
        qemu += (uint64_t)b;
    }
    cr_assert_leq(ours, qemu, "ours %" PRIu64 " vs QEMU format %" PRIu64 " " SEED_FMT, ours, qemu,
                  SEED_ARG(seed));
}

Test(delta, impl_names_parse_and_select)
{
    enum rdmax_delta_impl impl;
    size_t i;

    cr_assert_eq(rdmax_delta_impl_parse("nope", &impl), -EINVAL);
    for (i = 0; i < n_impls; i++) {
        cr_assert_eq(rdmax_delta_impl_parse(impls[i]->name, &impl), 0);
        cr_assert_eq(impl, impls[i]->impl);
        cr_assert_eq(rdmax_delta_select(impl), 0);
        cr_assert_eq(rdmax_delta_ops_get(RDMAX_DELTA_AUTO), impls[i]);
    }
    cr_assert_eq(rdmax_delta_select(RDMAX_DELTA_AUTO), 0);
    cr_assert_null(rdmax_delta_ops_get(RDMAX_DELTA_IMPL_COUNT));
}
