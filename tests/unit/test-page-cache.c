/*
 * Page cache: the budget bound, CLOCK eviction against a naive model,
 * index integrity under churn, and mirroring (same operations, same state).
 */
#include <criterion/criterion.h>
#include <errno.h>

#include "codec-test-util.h"
#include "page-cache.h"

#define PS RDMAX_PAGE_SIZE

static struct rdmax_page_key key_of(uint32_t block, uint64_t page)
{
    return (struct rdmax_page_key){.block = block, .offset = page * PS};
}

static void fill_tag(uint8_t *slot, uint64_t tag)
{
    size_t i;

    for (i = 0; i < PS; i += 8) {
        uint64_t v = tag * 0x9e3779b97f4a7c15u + i;

        memcpy(slot + i, &v, 8);
    }
}

static bool has_tag(const uint8_t *slot, uint64_t tag)
{
    uint8_t want[PS];

    fill_tag(want, tag);
    return memcmp(slot, want, PS) == 0;
}

Test(page_cache, footprint_never_exceeds_budget_and_capacity_is_maximal)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    int it;

    for (it = 0; it < 200; it++) {
        uint64_t budget = rng_below(&r, 64u << 20);
        struct rdmax_page_cache *c;

        if (it < 3) {
            budget = (uint64_t[]){0, 1, 4096}[it];
        }
        cr_assert_eq(rdmax_page_cache_create(budget, &c), 0);
        cr_assert_leq(rdmax_page_cache_footprint(c), budget < 256 ? 256 : budget,
                      "budget %" PRIu64 " " SEED_FMT, budget, SEED_ARG(seed));
        /*
         * One more page would not have fitted: a slot costs the page, 16
         * bytes of entry and at most 16 of index (load >= 1/4), plus the
         * struct and the smallest index.
         */
        cr_assert_lt(budget, (rdmax_page_cache_capacity(c) + 1) * (PS + 32) + 256,
                     "budget %" PRIu64 " wasted: capacity %zu " SEED_FMT, budget,
                     rdmax_page_cache_capacity(c), SEED_ARG(seed));
        rdmax_page_cache_destroy(c);
    }
}

Test(page_cache, tiny_budget_gives_capacity_zero_that_stores_nothing)
{
    struct rdmax_page_cache *c;
    bool hit = true;

    cr_assert_eq(rdmax_page_cache_create(4096, &c), 0);
    cr_assert_eq(rdmax_page_cache_capacity(c), 0);
    cr_assert_null(rdmax_page_cache_store(c, key_of(0, 1), &hit));
    cr_assert_not(hit);
    cr_assert_null(rdmax_page_cache_lookup(c, key_of(0, 1)));
    rdmax_page_cache_destroy(c);
    rdmax_page_cache_destroy(NULL);
}

Test(page_cache, store_then_lookup_returns_the_stored_version)
{
    struct rdmax_page_cache *c;
    uint8_t *slot;
    bool hit;

    cr_assert_eq(rdmax_page_cache_create(1u << 20, &c), 0);
    cr_assert_null(rdmax_page_cache_lookup(c, key_of(2, 7)));
    slot = rdmax_page_cache_store(c, key_of(2, 7), &hit);
    cr_assert_not_null(slot);
    cr_assert_not(hit);
    fill_tag(slot, 1);
    cr_assert(has_tag(rdmax_page_cache_lookup(c, key_of(2, 7)), 1));
    cr_assert_null(rdmax_page_cache_lookup(c, key_of(3, 7)), "block is part of the key");
    cr_assert_null(rdmax_page_cache_lookup(c, key_of(2, 8)));

    slot = rdmax_page_cache_store(c, key_of(2, 7), &hit);
    cr_assert(hit);
    cr_assert(has_tag(slot, 1), "a hit returns the old version to overwrite");
    fill_tag(slot, 2);
    cr_assert(has_tag(rdmax_page_cache_lookup(c, key_of(2, 7)), 2));
    cr_assert_eq(rdmax_page_cache_count(c), 1);
    cr_assert_eq(rdmax_page_cache_stats(c)->stores, 2);
    cr_assert_eq(rdmax_page_cache_stats(c)->inserts, 1);
    cr_assert_eq(rdmax_page_cache_stats(c)->hits, 2);
    rdmax_page_cache_destroy(c);
}

Test(page_cache, clock_evicts_first_inserted_unless_stored_again)
{
    struct rdmax_page_cache *c;
    size_t cap, i;

    cr_assert_eq(rdmax_page_cache_create(16 * (PS + 64), &c), 0);
    cap = rdmax_page_cache_capacity(c);
    cr_assert_geq(cap, 4);
    for (i = 0; i < cap; i++) {
        fill_tag(rdmax_page_cache_store(c, key_of(0, i), NULL), i);
    }
    /* Page 0 is re-sent: it gets its second chance; page 1 goes instead. */
    fill_tag(rdmax_page_cache_store(c, key_of(0, 0), NULL), 100);
    fill_tag(rdmax_page_cache_store(c, key_of(0, cap), NULL), cap);
    cr_assert_not_null(rdmax_page_cache_lookup(c, key_of(0, 0)));
    cr_assert_null(rdmax_page_cache_lookup(c, key_of(0, 1)));
    cr_assert(has_tag(rdmax_page_cache_lookup(c, key_of(0, cap)), cap));
    cr_assert_eq(rdmax_page_cache_stats(c)->evictions, 1);
    rdmax_page_cache_destroy(c);
}

/* The CLOCK policy written as plainly as possible, to check the real one. */
struct model {
    size_t cap, count, hand;
    struct rdmax_page_key keys[64];
    bool ref[64];
    uint64_t tag[64];
};

static void model_store(struct model *m, struct rdmax_page_key k, uint64_t tag)
{
    size_t i;

    for (i = 0; i < m->count; i++) {
        if (m->keys[i].block == k.block && m->keys[i].offset == k.offset) {
            m->ref[i] = true;
            m->tag[i] = tag;
            return;
        }
    }
    if (m->count < m->cap) {
        i = m->count++;
    } else {
        while (m->ref[m->hand]) {
            m->ref[m->hand] = false;
            m->hand = (m->hand + 1) % m->cap;
        }
        i = m->hand;
        m->hand = (m->hand + 1) % m->cap;
    }
    m->keys[i] = k;
    m->ref[i] = false;
    m->tag[i] = tag;
}

Test(page_cache, matches_a_naive_clock_model_under_churn)
{
    uint64_t seed = test_seed();
    struct test_rng r = {seed};
    struct rdmax_page_cache *c;
    static struct model m;
    int op;

    cr_assert_eq(rdmax_page_cache_create(40 * (PS + 64), &c), 0);
    m.cap = rdmax_page_cache_capacity(c);
    cr_assert(m.cap >= 32 && m.cap <= 64);
    for (op = 0; op < 200000; op++) {
        /* A hot set and a cold tail, in three blocks. */
        uint64_t page = rng_below(&r, 4) ? rng_below(&r, 40) : rng_below(&r, 5000);
        struct rdmax_page_key k = key_of((uint32_t)rng_below(&r, 3), page);
        uint64_t tag = rng_next(&r);
        bool hit, in_model = false;
        size_t i;

        for (i = 0; i < m.count; i++) {
            in_model |= m.keys[i].block == k.block && m.keys[i].offset == k.offset;
        }
        cr_assert_eq(rdmax_page_cache_lookup(c, k) != NULL, in_model, "op %d " SEED_FMT, op,
                     SEED_ARG(seed));
        fill_tag(rdmax_page_cache_store(c, k, &hit), tag);
        cr_assert_eq(hit, in_model, "op %d " SEED_FMT, op, SEED_ARG(seed));
        model_store(&m, k, tag);
        if (op % 1000 == 999) {
            cr_assert_eq(rdmax_page_cache_count(c), m.count);
            for (i = 0; i < m.count; i++) {
                const uint8_t *p = rdmax_page_cache_lookup(c, m.keys[i]);

                cr_assert_not_null(p, "op %d " SEED_FMT, op, SEED_ARG(seed));
                cr_assert(has_tag(p, m.tag[i]), "op %d " SEED_FMT, op, SEED_ARG(seed));
            }
        }
    }
    rdmax_page_cache_destroy(c);
}

Test(page_cache, same_operations_give_identical_mirrors, .timeout = 60)
{
    uint64_t seed = test_seed();
    struct test_rng ra = {seed}, rb = {seed};
    struct rdmax_page_cache *a, *b, *other;
    int op;

    cr_assert_eq(rdmax_page_cache_create(2u << 20, &a), 0);
    cr_assert_eq(rdmax_page_cache_create(2u << 20, &b), 0);
    cr_assert_eq(rdmax_page_cache_create(2u << 20, &other), 0);
    for (op = 0; op < 50000; op++) {
        uint64_t pa = rng_below(&ra, 2000), ta = rng_next(&ra);
        uint64_t pb = rng_below(&rb, 2000), tb = rng_next(&rb);

        /* The sender looks up before storing; the receiver does not. */
        (void)rdmax_page_cache_lookup(a, key_of(1, pa));
        fill_tag(rdmax_page_cache_store(a, key_of(1, pa), NULL), ta);
        fill_tag(rdmax_page_cache_store(b, key_of(1, pb), NULL), tb);
        fill_tag(rdmax_page_cache_store(other, key_of(1, (pa * 7) % 2000), NULL), ta);
    }
    cr_assert_eq(rdmax_page_cache_digest(a), rdmax_page_cache_digest(b), SEED_FMT, SEED_ARG(seed));
    cr_assert_neq(rdmax_page_cache_digest(a), rdmax_page_cache_digest(other),
                  "the digest must see a different history " SEED_FMT, SEED_ARG(seed));
    rdmax_page_cache_destroy(a);
    rdmax_page_cache_destroy(b);
    rdmax_page_cache_destroy(other);
}

Test(page_cache, unaligned_and_large_offsets_are_distinct_keys)
{
    struct rdmax_page_cache *c;
    struct rdmax_page_key k1 = {.block = 0, .offset = UINT64_C(1) << 40};
    struct rdmax_page_key k2 = {.block = 0, .offset = (UINT64_C(1) << 40) + 1};
    struct rdmax_page_key k3 = {.block = UINT32_MAX, .offset = UINT64_MAX};

    cr_assert_eq(rdmax_page_cache_create(1u << 20, &c), 0);
    fill_tag(rdmax_page_cache_store(c, k1, NULL), 1);
    fill_tag(rdmax_page_cache_store(c, k2, NULL), 2);
    fill_tag(rdmax_page_cache_store(c, k3, NULL), 3);
    cr_assert(has_tag(rdmax_page_cache_lookup(c, k1), 1));
    cr_assert(has_tag(rdmax_page_cache_lookup(c, k2), 2));
    cr_assert(has_tag(rdmax_page_cache_lookup(c, k3), 3));
    rdmax_page_cache_destroy(c);
}

Test(page_cache, sizing_policy_caps_and_splits_over_lanes)
{
    const uint64_t gib = UINT64_C(1) << 30;

    cr_assert_eq(rdmax_page_cache_budget(gib, 4, 8 * gib), (gib + gib / 32) / 4);
    cr_assert_eq(rdmax_page_cache_budget(64 * gib, 4, 8 * gib), 2 * gib);
    cr_assert_eq(rdmax_page_cache_budget(gib, 0, 8 * gib), 0);
    cr_assert_eq(rdmax_page_cache_budget(UINT64_MAX, 1, 8 * gib), 8 * gib);
    cr_assert_leq(rdmax_page_cache_budget(64 * gib, 1, 0), RDMAX_PAGE_CACHE_DEFAULT_CAP);
    cr_assert_leq(rdmax_page_cache_default_cap(), RDMAX_PAGE_CACHE_DEFAULT_CAP);
    cr_assert_gt(rdmax_page_cache_default_cap(), 0);
}
