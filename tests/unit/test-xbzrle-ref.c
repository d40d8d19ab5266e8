/*
 * QEMU-format XBZRLE reference codec: the example record from the format
 * notes, round trips, QEMU's overflow behaviour and its decoder's checks.
 */
#include <criterion/criterion.h>
#include <errno.h>

#include "codec-test-util.h"
#include "xbzrle-ref.h"

#define LEN 4096u

static uint8_t old_pg[LEN], cur_pg[LEN], out_pg[LEN], enc[2 * LEN];

Test(xbzrle_ref, decodes_the_example_record_from_the_format_notes)
{
    static const uint8_t rec[] = {0x00, 0x01, 0x12}; /* zrun 0, 1 byte: 0x12 */

    memset(out_pg, 0xee, LEN);
    cr_assert_eq(rdmax_xbzrle_ref_decode(out_pg, LEN, rec, sizeof(rec)), (ssize_t)LEN);
    cr_assert_eq(out_pg[0], 0x12);
    cr_assert_eq(out_pg[1], 0xee);
}

Test(xbzrle_ref, encode_identical_page_returns_zero)
{
    memset(old_pg, 3, LEN);
    memcpy(cur_pg, old_pg, LEN);
    cr_assert_eq(rdmax_xbzrle_ref_encode(enc, LEN, old_pg, cur_pg, LEN), 0);
}

Test(xbzrle_ref, carries_new_bytes_and_does_not_fold_gaps)
{
    static const uint8_t want[] = {10, 1, 0xaa, 1, 1, 0xbb};

    memset(old_pg, 0, LEN);
    memcpy(cur_pg, old_pg, LEN);
    cur_pg[10] = 0xaa;
    cur_pg[12] = 0xbb;
    cr_assert_eq(rdmax_xbzrle_ref_encode(enc, LEN, old_pg, cur_pg, LEN), 6);
    cr_assert(memcmp(enc, want, sizeof(want)) == 0);
}

Test(xbzrle_ref, every_other_byte_overflows_a_page)
{
    size_t i;

    memset(old_pg, 0, LEN);
    memset(cur_pg, 0, LEN);
    for (i = 0; i < LEN; i += 2) {
        cur_pg[i] = 1;
    }
    cr_assert_eq(rdmax_xbzrle_ref_encode(enc, LEN, old_pg, cur_pg, LEN), -EMSGSIZE);
    cr_assert_eq(rdmax_xbzrle_ref_encode(enc, sizeof(enc), old_pg, cur_pg, LEN), 6144);
}

Test(xbzrle_ref, random_pages_round_trip)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    int it;

    for (it = 0; it < 10000; it++) {
        ssize_t n;

        rng_fill(&r, old_pg, LEN);
        memcpy(cur_pg, old_pg, LEN);
        mutate_page(&r, cur_pg, LEN);
        n = rdmax_xbzrle_ref_encode(enc, sizeof(enc), old_pg, cur_pg, LEN);
        cr_assert_geq(n, 0, SEED_FMT, SEED_ARG(seed));
        memcpy(out_pg, old_pg, LEN);
        cr_assert_eq(rdmax_xbzrle_ref_decode(out_pg, LEN, enc, (size_t)n), (ssize_t)LEN);
        cr_assert(memcmp(out_pg, cur_pg, LEN) == 0, SEED_FMT, SEED_ARG(seed));
    }
}

Test(xbzrle_ref, decoder_keeps_qemus_checks)
{
    static const struct {
        const char *what;
        uint8_t bytes[6];
        size_t len;
    } cases[] = {
        {"one byte left for a token", {5}, 1},
        {"zero zrun after the first token", {0, 1, 0xaa, 0, 1, 0xbb}, 6},
        {"zero nzrun", {0, 0}, 2},
        {"nzrun data missing", {0, 3, 0xaa}, 3},
        {"three-byte uleb", {0x80, 0x80, 0x01, 1, 0xaa}, 5},
        {"zrun past the page", {0x81, 0x20, 1, 0xaa}, 4},
    };
    size_t c;

    for (c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        cr_assert_eq(rdmax_xbzrle_ref_decode(out_pg, LEN, cases[c].bytes, cases[c].len), -EBADMSG,
                     "%s", cases[c].what);
    }
}

Test(xbzrle_ref, corrupt_input_never_escapes)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    int it;

    for (it = 0; it < 20000; it++) {
        size_t n = (size_t)rng_below(&r, 48);
        uint8_t *src = malloc(n ? n : 1);
        ssize_t res;

        rng_fill(&r, src, n);
        res = rdmax_xbzrle_ref_decode(out_pg, LEN, src, n);
        cr_assert(res == (ssize_t)LEN || res == -EBADMSG, SEED_FMT, SEED_ARG(seed));
        free(src);
    }
}
