/*
 * Lane codec: tiers, mirrored caches, seeded random round trips through
 * encoder and decoder, every delta implementation producing the same
 * batches, and malformed batches (hand-made, truncated, corrupted).
 */
#include <criterion/criterion.h>
#include <errno.h>

#include "codec-test-util.h"
#include "delta.h"
#include "lane-codec.h"

#define PS RDMAX_PAGE_SIZE
#define MAXP RDMAX_BATCH_MAX_PAGES

/* What the decoder handed to the callback. */
struct sink {
    unsigned n;
    struct rdmax_page_key keys[MAXP];
    uint8_t pages[MAXP][PS];
    int fail_at; /* return -EIO at this page; -1 never */
};

static int sink_cb(void *arg, struct rdmax_page_key key, const uint8_t *page)
{
    struct sink *s = arg;

    if ((int)s->n == s->fail_at) {
        return -EIO;
    }
    cr_assert_lt(s->n, MAXP);
    s->keys[s->n] = key;
    memcpy(s->pages[s->n], page, PS);
    s->n++;
    return 0;
}

struct pair {
    struct rdmax_lane_encoder *enc;
    struct rdmax_lane_decoder *dec;
    uint8_t *out;
    size_t cap;
    /* Pages of the pending batch, as added. */
    unsigned n;
    struct rdmax_page_key keys[MAXP];
    uint8_t pages[MAXP][PS];
};

static struct pair *pair_new(uint64_t cache_bytes, int level)
{
    struct rdmax_codec_config cfg = {.cache_bytes = cache_bytes, .zstd_level = level};
    struct pair *p = calloc(1, sizeof(*p));

    cr_assert_not_null(p);
    cr_assert_eq(rdmax_lane_encoder_create(&cfg, &p->enc), 0);
    cr_assert_eq(rdmax_lane_decoder_create(&cfg, &p->dec), 0);
    p->cap = rdmax_lane_encoder_bound();
    p->out = malloc(p->cap);
    cr_assert_not_null(p->out);
    return p;
}

static void pair_free(struct pair *p)
{
    rdmax_lane_encoder_destroy(p->enc);
    rdmax_lane_decoder_destroy(p->dec);
    free(p->out);
    free(p);
}

static void pair_add(struct pair *p, struct rdmax_page_key key, const uint8_t *page)
{
    cr_assert_eq(rdmax_lane_encoder_add(p->enc, key, page), 0);
    p->keys[p->n] = key;
    memcpy(p->pages[p->n], page, PS);
    p->n++;
}

/* Flush, decode, check the pages came out as they went in; returns the length. */
static size_t pair_flush_check(struct pair *p, uint64_t seed)
{
    static struct sink s;
    ssize_t len = rdmax_lane_encoder_flush(p->enc, p->out, p->cap);
    unsigned i;

    cr_assert_gt(len, 0, "flush %zd " SEED_FMT, len, SEED_ARG(seed));
    cr_assert_leq((size_t)len, rdmax_lane_encoder_bound());
    memset(&s, 0, sizeof(s));
    s.fail_at = -1;
    cr_assert_eq(rdmax_lane_decoder_decode(p->dec, p->out, (size_t)len, sink_cb, &s), (int)p->n,
                 SEED_FMT, SEED_ARG(seed));
    cr_assert_eq(s.n, p->n);
    for (i = 0; i < p->n; i++) {
        cr_assert_eq(s.keys[i].block, p->keys[i].block, SEED_FMT, SEED_ARG(seed));
        cr_assert_eq(s.keys[i].offset, p->keys[i].offset, SEED_FMT, SEED_ARG(seed));
        cr_assert(memcmp(s.pages[i], p->pages[i], PS) == 0,
                  "page %u of the batch differs " SEED_FMT, i, SEED_ARG(seed));
    }
    p->n = 0;
    return (size_t)len;
}

static struct rdmax_page_key key_of(uint32_t block, uint64_t page)
{
    return (struct rdmax_page_key){.block = block, .offset = page * PS};
}

static const struct rdmax_lane_stats *stats(struct pair *p)
{
    return rdmax_lane_encoder_stats(p->enc);
}

/* ---- tiers --------------------------------------------------------------- */

Test(lane_codec, zero_page_is_the_zero_tier_and_costs_a_byte_or_two)
{
    struct pair *p = pair_new(1u << 20, 1);
    static uint8_t zero[PS];
    size_t len;

    pair_add(p, key_of(0, 0), zero);
    len = pair_flush_check(p, 0);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_ZERO], 1);
    cr_assert_leq(len, 16 + 1, "header and one tag");
    pair_free(p);
}

Test(lane_codec, resent_unchanged_page_costs_only_its_descriptor)
{
    struct pair *p = pair_new(1u << 20, 1);
    static uint8_t page[PS];
    struct test_rng r = {1};
    size_t len;

    rng_fill(&r, page, PS);
    pair_add(p, key_of(1, 5), page);
    pair_flush_check(p, 0);
    pair_add(p, key_of(1, 5), page);
    len = pair_flush_check(p, 0);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_UNCHANGED], 1);
    cr_assert_eq(len, 16 + 3, "header, tag, block, offset: %zu", len);
    pair_free(p);
}

Test(lane_codec, last_byte_change_is_a_small_delta)
{
    struct pair *p = pair_new(1u << 20, 1);
    static uint8_t page[PS];
    struct test_rng r = {2};
    size_t len;

    rng_fill(&r, page, PS);
    pair_add(p, key_of(0, 0), page);
    pair_flush_check(p, 0);
    page[PS - 1] ^= 0x80;
    pair_add(p, key_of(0, 0), page);
    len = pair_flush_check(p, 0);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_DELTA], 1);
    cr_assert_eq(len, 16 + 1 + 1 + 4, "header, tag, length, 4-byte delta: %zu", len);
    pair_free(p);
}

Test(lane_codec, every_byte_changed_goes_full)
{
    struct pair *p = pair_new(1u << 20, -1);
    static uint8_t page[PS];
    struct test_rng r = {3};
    size_t i;

    rng_fill(&r, page, PS);
    pair_add(p, key_of(0, 0), page);
    pair_flush_check(p, 0);
    for (i = 0; i < PS; i++) {
        page[i] = (uint8_t)~page[i];
    }
    pair_add(p, key_of(0, 0), page);
    cr_assert_eq(pair_flush_check(p, 0), 16 + 1 + PS);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_FULL], 2);
    cr_assert_eq(stats(p)->cache_hits, 1);
    pair_free(p);
}

Test(lane_codec, no_cache_means_full_or_zero_only)
{
    struct pair *p = pair_new(0, 1);
    static uint8_t page[PS];
    struct test_rng r = {4};

    rng_fill(&r, page, PS);
    pair_add(p, key_of(0, 0), page);
    pair_add(p, key_of(0, 0), page);
    pair_flush_check(p, 0);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_FULL], 2);
    cr_assert_eq(rdmax_lane_encoder_cache_digest(p->enc), 0);
    pair_free(p);
}

Test(lane_codec, cache_too_small_for_a_page_still_works)
{
    struct pair *p = pair_new(100, 1);
    static uint8_t page[PS];
    struct test_rng r = {5};

    rng_fill(&r, page, PS);
    pair_add(p, key_of(0, 3), page);
    pair_add(p, key_of(0, 3), page);
    pair_flush_check(p, 0);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_FULL], 2);
    pair_free(p);
}

Test(lane_codec, api_limits)
{
    struct pair *p = pair_new(1u << 20, 1);
    static uint8_t page[PS];
    unsigned i;

    cr_assert_eq(rdmax_lane_encoder_flush(p->enc, p->out, p->cap), 0, "nothing pending");
    cr_assert_eq(rdmax_lane_encoder_add(p->enc, (struct rdmax_page_key){0, 100}, page), -EINVAL);
    for (i = 0; i < MAXP; i++) {
        cr_assert_eq(rdmax_lane_encoder_add(p->enc, key_of(0, i), page), 0);
    }
    cr_assert_eq(rdmax_lane_encoder_add(p->enc, key_of(0, MAXP), page), -ENOSPC);
    cr_assert_eq(rdmax_lane_encoder_pending(p->enc), MAXP);
    cr_assert_eq(rdmax_lane_encoder_flush(p->enc, p->out, p->cap - 1), -EMSGSIZE);
    cr_assert_gt(rdmax_lane_encoder_flush(p->enc, p->out, p->cap), 0);
    cr_assert_eq(rdmax_lane_encoder_pending(p->enc), 0);
    pair_free(p);
}

Test(lane_codec, keys_far_apart_and_in_many_blocks_round_trip)
{
    struct pair *p = pair_new(1u << 20, 1);
    static uint8_t page[PS];
    static const struct rdmax_page_key keys[] = {
        {0, 0},          {0, UINT64_MAX - PS + 1}, {UINT32_MAX, 0}, {UINT32_MAX, 4096},
        {7, 1ull << 40}, {7, (1ull << 40) - PS},   {0, PS},
    };
    size_t i;

    memset(page, 0x5a, PS);
    for (i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
        page[0] = (uint8_t)i;
        pair_add(p, keys[i], page);
    }
    pair_flush_check(p, 0);
    pair_free(p);
}

/* ---- random round trips --------------------------------------------------- */

/*
 * A lane's life: keys in a few blocks, a hot set re-sent often and a cold
 * tail, each send a mutation of the key's current version; batches of random
 * size. Checks every page out equals the page in, and the two caches end up
 * identical.
 */
static void run_lane(uint64_t seed, uint64_t cache_bytes, int level, unsigned nkeys, unsigned sends)
{
    struct test_rng r = {seed};
    struct pair *p = pair_new(cache_bytes, level);
    uint8_t *ver = calloc(nkeys, PS); /* current version per key */
    unsigned i, batch = 1 + (unsigned)rng_below(&r, MAXP);

    cr_assert_not_null(ver);
    for (i = 0; i < nkeys; i++) {
        if (rng_below(&r, 3)) {
            rng_fill(&r, ver + (size_t)i * PS, PS);
        }
    }
    for (i = 0; i < sends; i++) {
        unsigned k = rng_below(&r, 3) ? (unsigned)rng_below(&r, nkeys / 8 + 1)
                                      : (unsigned)rng_below(&r, nkeys);
        uint8_t *v = ver + (size_t)k * PS;

        mutate_page(&r, v, PS);
        pair_add(p, key_of(k % 3, k / 3 + (k % 3) * 1000), v);
        if (p->n == batch) {
            pair_flush_check(p, seed);
            batch = 1 + (unsigned)rng_below(&r, MAXP);
        }
    }
    if (p->n) {
        pair_flush_check(p, seed);
    }
    cr_assert_eq(rdmax_lane_encoder_cache_digest(p->enc), rdmax_lane_decoder_cache_digest(p->dec),
                 "caches diverged " SEED_FMT, SEED_ARG(seed));
    free(ver);
    pair_free(p);
}

/*
 * 10 000 keys' version sequences (about 4 versions each) per configuration:
 * caches that hold everything, that evict constantly, none; zstd fixed,
 * adaptive, off.
 */
Test(lane_codec, random_version_sequences_round_trip_and_caches_mirror, .timeout = 300)
{
    uint64_t seed = test_seed();
    static const struct {
        uint64_t cache;
        int level;
    } cfgs[] = {
        {64u << 20, 1}, {64u << 20, 0}, {200 * (PS + 64), 0}, {16 * (PS + 64), -1}, {0, 3},
    };
    size_t c;

    for (c = 0; c < sizeof(cfgs) / sizeof(cfgs[0]); c++) {
        run_lane(seed + c, cfgs[c].cache, cfgs[c].level, 10000, 80000);
    }
}

Test(lane_codec, every_delta_impl_produces_the_same_batches)
{
    uint64_t seed = test_seed();
    uint8_t *ref = NULL;
    size_t ref_len = 0;
    int impl;

    for (impl = RDMAX_DELTA_SCALAR; impl < RDMAX_DELTA_IMPL_COUNT; impl++) {
        struct test_rng r = {seed};
        struct rdmax_codec_config cfg = {.cache_bytes = 8u << 20, .zstd_level = 1};
        struct rdmax_lane_encoder *e;
        static uint8_t ver[256][PS];
        uint8_t *out;
        size_t cap = rdmax_lane_encoder_bound(), len = 0, i;

        if (rdmax_delta_select((enum rdmax_delta_impl)impl) < 0) {
            continue;
        }
        cr_assert_eq(rdmax_lane_encoder_create(&cfg, &e), 0);
        out = malloc(64 * cap);
        for (i = 0; i < 256; i++) {
            rng_fill(&r, ver[i], PS);
        }
        for (i = 0; i < 64 * MAXP; i++) {
            unsigned k = (unsigned)rng_below(&r, 256);

            mutate_page(&r, ver[k], PS);
            cr_assert_eq(rdmax_lane_encoder_add(e, key_of(0, k), ver[k]), 0);
            if (rdmax_lane_encoder_pending(e) == MAXP) {
                ssize_t n = rdmax_lane_encoder_flush(e, out + len, cap);

                cr_assert_gt(n, 0);
                len += (size_t)n;
            }
        }
        if (!ref) {
            ref = out;
            ref_len = len;
        } else {
            cr_assert_eq(len, ref_len, "%s " SEED_FMT, rdmax_delta_impl_name(impl), SEED_ARG(seed));
            cr_assert(memcmp(out, ref, len) == 0, "%s " SEED_FMT, rdmax_delta_impl_name(impl),
                      SEED_ARG(seed));
            free(out);
        }
        rdmax_lane_encoder_destroy(e);
    }
    free(ref);
    rdmax_delta_select(RDMAX_DELTA_AUTO);
}

/* ---- levels set by the pipe ------------------------------------------------ */

static size_t mk_batch(uint8_t *out, uint8_t version, uint8_t flags, unsigned count,
                       const uint8_t *desc, size_t desc_len, size_t desc_raw, const uint8_t *full,
                       size_t full_len);

Test(lane_codec, set_level_moves_the_full_part_between_zstd_and_raw)
{
    struct pair *p = pair_new(1u << 20, 0);
    static uint8_t page[PS];
    unsigned i;

    for (int level = 2; level >= 0; level--) {
        rdmax_lane_encoder_set_level(p->enc, level);
        for (i = 0; i < 8; i++) {
            memset(page, 'a' + (int)i, PS);
            page[17] = (uint8_t)level;
            pair_add(p, key_of(2, 100 * (unsigned)level + i), page);
        }
        pair_flush_check(p, 0);
        cr_assert_eq(stats(p)->level, level);
    }
    cr_assert_eq(stats(p)->full_zstd_batches, 2, "levels 2 and 1 compress");
    cr_assert_eq(stats(p)->full_raw_batches, 1, "level 0 does not");
    pair_free(p);
}

Test(lane_codec, a_fixed_level_ignores_set_level)
{
    struct pair *p = pair_new(1u << 20, 3);

    rdmax_lane_encoder_set_level(p->enc, -1);
    cr_assert_eq(stats(p)->level, 3);
    pair_free(p);
}

Test(lane_codec, uncached_level_skips_new_inserts_and_the_caches_still_mirror)
{
    struct pair *p = pair_new(4u << 20, 0);
    static uint8_t page[PS];
    unsigned i, b;

    /* Keys 0..15 cached while the lane is at level 1. */
    for (i = 0; i < 16; i++) {
        memset(page, (int)i + 1, PS);
        pair_add(p, key_of(3, i), page);
    }
    pair_flush_check(p, 0);
    rdmax_lane_encoder_set_level(p->enc, -1);
    for (b = 0; b < 4; b++) {
        for (i = 0; i < 32; i++) {
            memset(page, (int)i + 1, PS);
            page[5] = (uint8_t)(b + 100);
            /* Keys 0..15 are cached: deltas; 16..31 are not: NOCACHE, every time. */
            pair_add(p, key_of(3, i), page);
        }
        pair_flush_check(p, 0);
    }
    cr_assert_eq(stats(p)->uncached_pages, 4 * 16);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_DELTA], 4 * 16);
    cr_assert_eq(rdmax_lane_encoder_cache_digest(p->enc), rdmax_lane_decoder_cache_digest(p->dec),
                 "NOCACHE pages change neither cache");
    /* Back to raw: the same new keys are inserted now, on both sides. */
    rdmax_lane_encoder_set_level(p->enc, 0);
    for (i = 16; i < 32; i++) {
        memset(page, (int)i, PS);
        pair_add(p, key_of(3, i), page);
    }
    pair_flush_check(p, 0);
    cr_assert_eq(stats(p)->uncached_pages, 4 * 16);
    cr_assert_eq(rdmax_lane_encoder_cache_digest(p->enc), rdmax_lane_decoder_cache_digest(p->dec));
    pair_free(p);
}

Test(lane_codec, nocache_for_a_cached_key_breaks_the_decoder)
{
    static uint8_t buf[16 + 1 + PS], page[PS];
    static const uint8_t desc[] = {0x13}; /* FULL | NOCACHE, key (0, 0) */
    struct pair *p = pair_new(1u << 20, 1);
    struct sink s = {.fail_at = -1};
    size_t len;

    memset(page, 5, PS);
    pair_add(p, key_of(0, 0), page);
    pair_flush_check(p, 0);
    len = mk_batch(buf, 2, 0, 1, desc, 1, 1, page, PS);
    cr_assert_eq(rdmax_lane_decoder_decode(p->dec, buf, len, sink_cb, &s), -EBADMSG,
                 "the cache would keep a stale version");
    pair_free(p);
}

Test(lane_codec, incompressible_pages_go_raw_under_a_fixed_level_too)
{
    struct pair *p = pair_new(0, 3);
    struct test_rng r = {8};
    static uint8_t page[PS];
    size_t len;
    unsigned i;

    for (i = 0; i < 8; i++) {
        rng_fill(&r, page, PS);
        pair_add(p, key_of(0, i), page);
    }
    len = pair_flush_check(p, 0);
    cr_assert_eq(len, 16 + 8 + 8 * PS, "8 tags (keys implied) and raw pages: %zu", len);
    cr_assert_eq(stats(p)->full_raw_batches, 1);
    pair_free(p);
}

/* ---- malformed input -------------------------------------------------------- */

static size_t mk_batch(uint8_t *out, uint8_t version, uint8_t flags, unsigned count,
                       const uint8_t *desc, size_t desc_len, size_t desc_raw, const uint8_t *full,
                       size_t full_len)
{
    out[0] = version;
    out[1] = flags;
    out[2] = (uint8_t)(count >> 8);
    out[3] = (uint8_t)count;
    out[4] = (uint8_t)(desc_len >> 24);
    out[5] = (uint8_t)(desc_len >> 16);
    out[6] = (uint8_t)(desc_len >> 8);
    out[7] = (uint8_t)desc_len;
    out[8] = (uint8_t)(desc_raw >> 24);
    out[9] = (uint8_t)(desc_raw >> 16);
    out[10] = (uint8_t)(desc_raw >> 8);
    out[11] = (uint8_t)desc_raw;
    out[12] = (uint8_t)(full_len >> 24);
    out[13] = (uint8_t)(full_len >> 16);
    out[14] = (uint8_t)(full_len >> 8);
    out[15] = (uint8_t)full_len;
    memcpy(out + 16, desc, desc_len);
    if (full_len) {
        memcpy(out + 16 + desc_len, full, full_len);
    }
    return 16 + desc_len + full_len;
}

Test(lane_codec, hand_made_malformed_batches_are_ebadmsg_and_change_nothing)
{
    static const struct {
        const char *what;
        uint8_t version, flags;
        unsigned count;
        uint8_t desc[16];
        size_t desc_len;
        int desc_raw_delta; /* desc_raw = desc_len + this */
        size_t full_pages;
        int full_delta; /* full_len = full_pages * PS + this */
    } cases[] = {
        {"wrong version", 1, 0, 1, {1}, 1, 0, 0, 0},
        {"reserved flag", 2, 0x04, 1, {1}, 1, 0, 0, 0},
        {"count 0", 2, 0, 0, {0}, 0, 0, 0, 0},
        {"count 65", 2, 0, 65, {1}, 1, 0, 0, 0},
        {"raw desc with a different raw length", 2, 0, 1, {1}, 1, 1, 0, 0},
        {"desc shorter than count pages", 2, 0, 2, {1}, 1, 0, 0, 0},
        {"desc with trailing bytes", 2, 0, 1, {1, 0}, 2, 0, 0, 0},
        {"tag reserved bits", 2, 0, 1, {0x21}, 1, 0, 0, 0},
        {"NOCACHE on a ZERO page", 2, 0, 1, {0x11}, 1, 0, 0, 0},
        {"NOCACHE on an UNCHANGED page", 2, 0, 1, {0x10}, 1, 0, 0, 0},
        {"explicit block equal to the implied one", 2, 0, 1, {0x05, 0}, 2, 0, 0, 0},
        {"explicit offset delta of 0", 2, 0, 1, {0x09, 0}, 2, 0, 0, 0},
        {"non-minimal varint", 2, 0, 1, {0x09, 0x82, 0x00}, 3, 0, 0, 0},
        {"varint over 64 bits",
         2,
         0,
         1,
         {0x09, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f},
         11,
         0,
         0,
         0},
        {"index at 2^52",
         2,
         0,
         1,
         {0x09, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20},
         9,
         0,
         0,
         0},
        {"block over 32 bits", 2, 0, 1, {0x05, 0x80, 0x80, 0x80, 0x80, 0x10}, 6, 0, 0, 0},
        {"delta length 0", 2, 0, 1, {0x02, 0}, 2, 0, 0, 0},
        {"delta longer than the desc", 2, 0, 1, {0x02, 5, 1, 2}, 4, 0, 0, 0},
        {"full page missing", 2, 0, 1, {0x03}, 1, 0, 0, 0},
        {"full part one byte short", 2, 0, 1, {0x03}, 1, 0, 1, -1},
        {"full part one byte long", 2, 0, 1, {0x03}, 1, 0, 1, 1},
        {"zstd full part without full pages", 2, 0x02, 1, {0x01}, 1, 0, 0, 8},
        {"zstd desc that is not zstd", 2, 0x01, 1, {1, 2, 3, 4}, 4, -3, 0, 0},
        {"zstd full that is not zstd", 2, 0x02, 1, {0x03}, 1, 0, 0, 64},
        {"desc_raw above the maximum", 2, 0x01, 1, {1}, 1, 1 << 30, 0, 0},
    };
    static uint8_t buf[16 + 64 + 2 * PS], full[2 * PS];
    struct pair *p = pair_new(1u << 20, 1);
    struct sink s;
    size_t c;

    memset(full, 0x77, sizeof(full));
    for (c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        size_t full_len = cases[c].full_pages * PS + (size_t)(long)cases[c].full_delta;
        size_t len = mk_batch(
            buf, cases[c].version, cases[c].flags, cases[c].count, cases[c].desc, cases[c].desc_len,
            cases[c].desc_len + (size_t)(long)cases[c].desc_raw_delta, full, full_len);

        memset(&s, 0, sizeof(s));
        s.fail_at = -1;
        cr_assert_eq(rdmax_lane_decoder_decode(p->dec, buf, len, sink_cb, &s), -EBADMSG, "%s",
                     cases[c].what);
        cr_assert_eq(s.n, 0, "%s: no page may come out of a malformed batch", cases[c].what);
    }
    /* Layout errors leave the decoder usable. */
    {
        static uint8_t page[PS];

        memset(page, 9, PS);
        pair_add(p, key_of(0, 0), page);
        pair_flush_check(p, 0);
    }
    pair_free(p);
}

Test(lane_codec, reference_to_an_uncached_page_breaks_the_decoder_for_good)
{
    static const uint8_t unchanged[] = {0x00};
    static const uint8_t delta[] = {0x02, 3, 0, 1, 0xaa};
    static uint8_t buf[64];
    struct pair *p = pair_new(1u << 20, 1);
    struct sink s = {.fail_at = -1};
    static uint8_t page[PS];
    size_t len;

    len = mk_batch(buf, 2, 0, 1, unchanged, 1, 1, NULL, 0);
    cr_assert_eq(rdmax_lane_decoder_decode(p->dec, buf, len, sink_cb, &s), -EBADMSG);
    /* Now broken: even a valid batch is refused. */
    memset(page, 1, PS);
    pair_add(p, key_of(0, 0), page);
    len = (size_t)rdmax_lane_encoder_flush(p->enc, p->out, p->cap);
    cr_assert_eq(rdmax_lane_decoder_decode(p->dec, p->out, len, sink_cb, &s), -EBADMSG);
    pair_free(p);

    p = pair_new(1u << 20, 1);
    len = mk_batch(buf, 2, 0, 1, delta, sizeof(delta), sizeof(delta), NULL, 0);
    cr_assert_eq(rdmax_lane_decoder_decode(p->dec, buf, len, sink_cb, &s), -EBADMSG);
    pair_free(p);
}

Test(lane_codec, callback_error_is_returned_and_breaks_the_decoder)
{
    struct pair *p = pair_new(1u << 20, 1);
    static uint8_t page[PS];
    static struct sink s;
    ssize_t len;

    memset(page, 3, PS);
    pair_add(p, key_of(0, 0), page);
    pair_add(p, key_of(0, 1), page);
    len = rdmax_lane_encoder_flush(p->enc, p->out, p->cap);
    s.fail_at = 1;
    cr_assert_eq(rdmax_lane_decoder_decode(p->dec, p->out, (size_t)len, sink_cb, &s), -EIO);
    cr_assert_eq(s.n, 1);
    s.fail_at = -1;
    cr_assert_eq(rdmax_lane_decoder_decode(p->dec, p->out, (size_t)len, sink_cb, &s), -EBADMSG);
    pair_free(p);
}

/*
 * Truncations and random corruption of real batches: never a crash or an
 * out-of-bounds access (ASan in CI); either the batch's page count or
 * -EBADMSG; a truncated batch never yields a page; a batch refused before
 * any page came out leaves the decoder in sync.
 */
Test(lane_codec, truncated_or_corrupted_batches_fail_cleanly, .timeout = 120)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    int trial;

    for (trial = 0; trial < 300; trial++) {
        struct pair *p = pair_new(rng_below(&r, 2) ? 1u << 20 : 0, (int)rng_below(&r, 3) - 1);
        static uint8_t ver[32][PS];
        static struct sink s;
        uint8_t *copy;
        size_t len, cut, k;
        unsigned i;
        int res;

        for (i = 0; i < 32; i++) {
            rng_fill(&r, ver[i], PS);
            if (i % 4 == 0) {
                memset(ver[i], 'x', PS / 2);
            }
        }
        /* A first batch primes both caches, so the second has deltas. */
        for (i = 0; i < 32; i++) {
            pair_add(p, key_of(0, i), ver[i]);
        }
        pair_flush_check(p, seed);
        for (i = 0; i < 32; i++) {
            unsigned kk = (unsigned)rng_below(&r, 32);

            mutate_page(&r, ver[kk], PS);
            pair_add(p, key_of(0, kk), ver[kk]);
        }
        len = (size_t)rdmax_lane_encoder_flush(p->enc, p->out, p->cap);

        cut = (size_t)rng_below(&r, len);
        copy = malloc(cut ? cut : 1);
        memcpy(copy, p->out, cut);
        memset(&s, 0, sizeof(s));
        s.fail_at = -1;
        cr_assert_eq(rdmax_lane_decoder_decode(p->dec, copy, cut, sink_cb, &s), -EBADMSG,
                     "cut at %zu of %zu " SEED_FMT, cut, len, SEED_ARG(seed));
        cr_assert_eq(s.n, 0);
        free(copy);

        copy = malloc(len);
        memcpy(copy, p->out, len);
        for (k = 0; k < 1 + rng_below(&r, 4); k++) {
            size_t at = rng_below(&r, 4) == 0 ? rng_below(&r, 16 + 16) : rng_below(&r, len);

            copy[at < len ? at : len - 1] ^= rng_nonzero_byte(&r);
        }
        memset(&s, 0, sizeof(s));
        s.fail_at = -1;
        res = rdmax_lane_decoder_decode(p->dec, copy, len, sink_cb, &s);
        cr_assert(res == 32 || res == -EBADMSG, "got %d " SEED_FMT, res, SEED_ARG(seed));
        free(copy);
        if (res == -EBADMSG && s.n == 0) {
            /*
             * Refused before the first page: either up front (layout), and
             * the real batch must still decode right, or when applying the
             * first page, and the decoder must refuse everything after.
             */
            memset(&s, 0, sizeof(s));
            s.fail_at = -1;
            res = rdmax_lane_decoder_decode(p->dec, p->out, len, sink_cb, &s);
            cr_assert(res == 32 || (res == -EBADMSG && s.n == 0), SEED_FMT, SEED_ARG(seed));
            for (i = 0; res == 32 && i < 32; i++) {
                cr_assert(memcmp(s.pages[i], p->pages[i], PS) == 0, SEED_FMT, SEED_ARG(seed));
            }
        }
        p->n = 0;
        pair_free(p);
    }
}

Test(lane_codec, random_bytes_as_batches_fail_cleanly)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    struct pair *p = pair_new(1u << 20, 1);
    static struct sink s;
    int it;

    for (it = 0; it < 20000; it++) {
        size_t len = 16 + (size_t)rng_below(&r, 64);
        uint8_t *buf = malloc(len);
        uint32_t dl = (uint32_t)rng_below(&r, len - 15);
        int res;

        rng_fill(&r, buf, len);
        /* Mostly plausible headers, so parsing gets past them. */
        buf[0] = 2;
        buf[1] &= 3;
        buf[2] = 0;
        buf[3] = (uint8_t)(1 + rng_below(&r, 4));
        buf[4] = buf[5] = buf[6] = 0;
        buf[7] = (uint8_t)dl;
        buf[8] = buf[9] = buf[10] = 0;
        buf[11] = (uint8_t)(buf[1] & 1 ? rng_below(&r, 64) : dl);
        buf[12] = buf[13] = buf[14] = 0;
        buf[15] = (uint8_t)(len - 16 - dl);
        memset(&s, 0, sizeof(s));
        s.fail_at = -1;
        res = rdmax_lane_decoder_decode(p->dec, buf, len, sink_cb, &s);
        cr_assert(res == -EBADMSG || res > 0, SEED_FMT, SEED_ARG(seed));
        free(buf);
        if (res == -EBADMSG && s.n) {
            /* Got as far as a page: a fresh decoder for the next one. */
            rdmax_lane_decoder_destroy(p->dec);
            cr_assert_eq(rdmax_lane_decoder_create(
                             &(struct rdmax_codec_config){.cache_bytes = 1u << 20}, &p->dec),
                         0);
        }
    }
    pair_free(p);
}

Test(lane_codec, unaligned_page_pointers_are_fine)
{
    struct pair *p = pair_new(1u << 20, 1);
    uint8_t *buf = malloc(2 * PS + 1);
    struct test_rng r = {9};

    rng_fill(&r, buf + 1, PS);
    pair_add(p, key_of(0, 0), buf + 1);
    buf[1 + 100] ^= 1;
    pair_add(p, key_of(0, 0), buf + 1);
    memset(buf + 1, 0, PS);
    pair_add(p, key_of(0, 0), buf + 1);
    pair_flush_check(p, 0);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_FULL], 1);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_DELTA], 1);
    cr_assert_eq(stats(p)->tier_pages[RDMAX_TIER_ZERO], 1);
    free(buf);
    pair_free(p);
}

/* Concatenate a flush's iovecs, decode, and compare with what pair_add recorded. */
static void pair_decode_iov(struct pair *p, const struct iovec *iov, int cnt, ssize_t len)
{
    static struct sink s;
    size_t pos = 0;

    for (int i = 0; i < cnt; i++) {
        memcpy(p->out + pos, iov[i].iov_base, iov[i].iov_len);
        pos += iov[i].iov_len;
    }
    cr_assert_eq((ssize_t)pos, len);
    memset(&s, 0, sizeof(s));
    s.fail_at = -1;
    cr_assert_eq(rdmax_lane_decoder_decode(p->dec, p->out, pos, sink_cb, &s), (int)p->n);
    for (unsigned i = 0; i < p->n; i++) {
        cr_assert(memcmp(s.pages[i], p->pages[i], PS) == 0, "page %u differs", i);
    }
    cr_assert_eq(rdmax_lane_encoder_cache_digest(p->enc), rdmax_lane_decoder_cache_digest(p->dec));
    p->n = 0;
}

static void pair_add_ref(struct pair *p, struct rdmax_page_key key, const uint8_t *page, int want)
{
    cr_assert_eq(rdmax_lane_encoder_add_ref(p->enc, key, page), want);
    p->keys[p->n] = key;
    memcpy(p->pages[p->n], page, PS);
    p->n++;
}

Test(lane_codec, raw_pages_taken_by_reference_leave_from_where_they_lie)
{
    struct pair *p = pair_new(1 << 20, -1); /* never compress: raw */
    uint8_t *src = malloc((size_t)2 * MAXP * PS);
    struct iovec iov[RDMAX_LANE_IOV_MAX];
    int cnt;
    ssize_t len;

    for (size_t i = 0; i < (size_t)2 * MAXP * PS; i++) {
        src[i] = (uint8_t)(i * 2654435761u >> 13);
    }
    /* Every other page of src: no two lie back to back, one iovec each. */
    for (unsigned i = 0; i < MAXP; i++) {
        pair_add_ref(p, key_of(0, i), src + (size_t)2 * i * PS, 1);
    }
    len = rdmax_lane_encoder_flush_iovs(p->enc, iov, RDMAX_LANE_IOV_MAX, &cnt);
    cr_assert_eq(cnt, 1 + MAXP);
    for (unsigned i = 0; i < MAXP; i++) {
        cr_assert_eq(iov[1 + i].iov_base, src + (size_t)2 * i * PS, "page %u was copied", i);
    }
    pair_decode_iov(p, iov, cnt, len);

    /* Back to back pages make one run; a page cached before goes as a delta. */
    for (unsigned i = 0; i < 8; i++) {
        pair_add_ref(p, key_of(1, i), src + (size_t)i * PS, 1);
    }
    uint8_t changed[PS];
    memcpy(changed, src, PS); /* key (0, 0)'s page, one byte changed */
    changed[5] ^= 1;
    pair_add_ref(p, key_of(0, 0), changed, 0);
    len = rdmax_lane_encoder_flush_iovs(p->enc, iov, RDMAX_LANE_IOV_MAX, &cnt);
    cr_assert_eq(cnt, 2);
    cr_assert_eq(iov[1].iov_base, src);
    cr_assert_eq(iov[1].iov_len, 8 * PS);
    pair_decode_iov(p, iov, cnt, len);

    /* Too few iovecs for the runs: gathered into the encoder's buffer. */
    for (unsigned i = 0; i < 4; i++) {
        pair_add_ref(p, key_of(2, i), src + (size_t)2 * i * PS, 1);
    }
    len = rdmax_lane_encoder_flush_iov(p->enc, iov, &cnt);
    cr_assert_eq(cnt, 2);
    cr_assert_eq(iov[1].iov_len, 4 * PS);
    cr_assert_neq(iov[1].iov_base, src);
    pair_decode_iov(p, iov, cnt, len);
    free(src);
    pair_free(p);
}

Test(lane_codec, a_compressing_lane_copies_pages_offered_by_reference)
{
    struct pair *p = pair_new(1 << 20, 3);
    uint8_t page[PS];
    struct iovec iov[RDMAX_LANE_IOV_MAX];
    int cnt;
    ssize_t len;

    for (unsigned i = 0; i < 16; i++) {
        memset(page, 'a' + (int)i, PS);
        page[0] = (uint8_t)i;
        pair_add_ref(p, key_of(0, i), page, 0); /* copied: page may change at once */
    }
    len = rdmax_lane_encoder_flush_iovs(p->enc, iov, RDMAX_LANE_IOV_MAX, &cnt);
    cr_assert_eq(cnt, 1);
    cr_assert_eq(stats(p)->full_zstd_batches, 1);
    pair_decode_iov(p, iov, cnt, len);
    pair_free(p);
}
