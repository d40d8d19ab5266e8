/*
 * Mirrored page cache: a preallocated array of page slots, a CLOCK over them
 * for eviction, and an open-addressing (linear probing) hash index from key
 * to slot. See page-cache.h for the contract.
 *
 * Determinism: slots are handed out in order 0, 1, 2... until full, then by
 * the clock; the index is a pure function of the insert/delete sequence
 * (linear probing with backward-shift deletion, no tombstones, no rehash,
 * no randomized hash seed). So two caches fed the same store() sequence are
 * bit-identical, which rdmax_page_cache_digest checks.
 */
#define _GNU_SOURCE /* SCHED_IDLE */
#include "page-cache.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

struct cache_entry {
    uint64_t offset;
    uint32_t block;
    uint32_t ref; /* CLOCK reference bit: stored again since the hand passed */
};

struct rdmax_page_cache {
    size_t capacity; /* slots; set at create */
    size_t count;    /* slots in use (0..count) */
    size_t hand;     /* CLOCK hand, once full */
    uint32_t *index; /* slot + 1, 0 = empty; index_mask + 1 cells */
    size_t index_mask;
    struct cache_entry *entries; /* capacity */
    uint8_t *data;               /* capacity pages, mmap()ed */
    size_t data_len;
    uint64_t footprint;
    struct rdmax_page_cache_stats stats;
    /* Background population (rdmax_page_cache_populate_start). */
    _Atomic size_t used_hint; /* count, for the populating thread */
    _Atomic bool populate_stop;
    bool populating;
    size_t populate_ahead; /* bytes ahead of the slots in use */
    pthread_t populate_thread;
};

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#define POPULATE_CHUNK (2u << 20) /* one huge page */

/* Index cells for n slots: a power of two, load factor <= 1/2. */
static size_t cache_index_cells(size_t n)
{
    size_t t = 16;

    if (n == 0) {
        return 0;
    }
    while (t < 2 * n) {
        t <<= 1;
    }
    return t;
}

static uint64_t cache_footprint_for(size_t n)
{
    return sizeof(struct rdmax_page_cache) + (uint64_t)n * sizeof(struct cache_entry) +
           (uint64_t)cache_index_cells(n) * sizeof(uint32_t) + (uint64_t)n * RDMAX_PAGE_SIZE;
}

/* The most slots whose footprint fits in budget (0 if not even one). */
static size_t cache_slots_for(uint64_t budget)
{
    uint64_t lo = 0, hi = budget / RDMAX_PAGE_SIZE + 1;

    if (hi > UINT32_MAX - 1) {
        hi = UINT32_MAX - 1; /* slot + 1 must fit the uint32_t index */
    }
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo + 1) / 2;

        if (cache_footprint_for(mid) <= budget) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    return lo;
}

/*
 * Fibonacci hashing of (block, page number). The keys come from the guest's
 * RAM layout, not from an adversary, and must hash the same on both sides.
 */
static size_t cache_hash(const struct rdmax_page_cache *c, struct rdmax_page_key key)
{
    uint64_t h = (key.offset >> 12) ^ ((uint64_t)key.block << 44) ^ (key.offset << 52);

    h *= UINT64_C(0x9e3779b97f4a7c15);
    return (size_t)(h ^ (h >> 29)) & c->index_mask;
}

static bool cache_key_eq(const struct cache_entry *e, struct rdmax_page_key key)
{
    return e->offset == key.offset && e->block == key.block;
}

/* Index cell holding key, or the empty cell where it would go. */
static size_t cache_find(const struct rdmax_page_cache *c, struct rdmax_page_key key)
{
    size_t i = cache_hash(c, key);

    for (;;) {
        uint32_t v = c->index[i];

        if (v == 0 || cache_key_eq(&c->entries[v - 1], key)) {
            return i;
        }
        i = (i + 1) & c->index_mask;
    }
}

/* Backward-shift deletion: keeps every probe chain unbroken, no tombstones. */
static void cache_index_delete(struct rdmax_page_cache *c, size_t hole)
{
    size_t i = hole;

    for (;;) {
        size_t home;
        uint32_t v;

        i = (i + 1) & c->index_mask;
        v = c->index[i];
        if (v == 0) {
            break;
        }
        home = cache_hash(c, (struct rdmax_page_key){.block = c->entries[v - 1].block,
                                                     .offset = c->entries[v - 1].offset});
        /* Move v into the hole unless its home lies cyclically in (hole, i]. */
        if (((i - home) & c->index_mask) >= ((i - hole) & c->index_mask)) {
            c->index[hole] = v;
            hole = i;
        }
    }
    c->index[hole] = 0;
}

int rdmax_page_cache_create(uint64_t budget_bytes, struct rdmax_page_cache **out)
{
    struct rdmax_page_cache *c;
    size_t n = cache_slots_for(budget_bytes);
    size_t cells = cache_index_cells(n);

    c = calloc(1, sizeof(*c));
    if (!c) {
        goto err_struct;
    }
    c->capacity = n;
    if (n) {
        c->index_mask = cells - 1;
        c->index = calloc(cells, sizeof(*c->index));
        if (!c->index) {
            goto err_index;
        }
        c->entries = calloc(n, sizeof(*c->entries));
        if (!c->entries) {
            goto err_entries;
        }
        /* mmap: page aligned, and untouched slots cost no RSS until used. */
        c->data_len = n * (size_t)RDMAX_PAGE_SIZE;
        c->data =
            mmap(NULL, c->data_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (c->data == MAP_FAILED) {
            goto err_data;
        }
#ifdef MADV_HUGEPAGE
        /* Random access over GiBs: spare the TLB. Only a hint. */
        (void)madvise(c->data, c->data_len, MADV_HUGEPAGE);
#endif
    }
    c->footprint = cache_footprint_for(n);
    *out = c;
    return 0;

err_data:
    free(c->entries);
err_entries:
    free(c->index);
err_index:
    free(c);
err_struct:
    return -ENOMEM;
}

/*
 * Fault the slots in ahead of the lane, in the order they are handed out,
 * at SCHED_IDLE: a fresh anonymous page costs a zeroing fault on first
 * touch (17-40% of a side's CPU on a replay when it happened in the page
 * path), and this way it happens while the CPU would otherwise idle (QEMU
 * setting up, the link pushing back). It stays ahead of the slots in use
 * by at most what is in use and at most populate_ahead bytes, so neither a
 * guest of mostly zero pages (never cached) nor a peer that announces a
 * large cache and sends nothing gets more than twice what it used faulted
 * in.
 * MADV_POPULATE_WRITE never changes what a page holds, so it may run over
 * slots the lane already uses.
 */
static void *populate_main(void *arg)
{
    struct rdmax_page_cache *c = arg;
    struct sched_param sp = {0};
    size_t pos = 0;

    (void)pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    while (pos < c->data_len && !atomic_load_explicit(&c->populate_stop, memory_order_relaxed)) {
        size_t used =
            atomic_load_explicit(&c->used_hint, memory_order_relaxed) * (size_t)RDMAX_PAGE_SIZE;
        size_t len;

        if (pos < used) {
            pos = used & ~(size_t)(POPULATE_CHUNK - 1); /* the lane got there first */
        }
        /* Ahead by what is in use, up to populate_ahead: a peer that sends nothing gets nothing. */
        if (pos >= used + (used < c->populate_ahead ? used : c->populate_ahead)) {
            struct timespec ts = {0, 2000000};

            nanosleep(&ts, NULL);
            continue;
        }
        len = c->data_len - pos;
        if (len > POPULATE_CHUNK) {
            len = POPULATE_CHUNK;
        }
        if (len > c->populate_ahead) {
            len = c->populate_ahead;
        }
        if (madvise(c->data + pos, len, MADV_POPULATE_WRITE) != 0) {
            break; /* a kernel before 5.14, or no memory now: the page path faults as before */
        }
        pos += len;
    }
    return NULL;
}

int rdmax_page_cache_populate_start(struct rdmax_page_cache *c, size_t ahead)
{
    int r;

    ahead &= ~(size_t)(RDMAX_PAGE_SIZE - 1);
    if (!c || !c->data || c->populating || ahead == 0) {
        return 0;
    }
    c->populate_ahead = ahead;
    r = pthread_create(&c->populate_thread, NULL, populate_main, c);
    if (r != 0) {
        return -r;
    }
    c->populating = true;
    return 0;
}

void rdmax_page_cache_destroy(struct rdmax_page_cache *c)
{
    if (!c) {
        return;
    }
    if (c->populating) {
        atomic_store(&c->populate_stop, true);
        pthread_join(c->populate_thread, NULL);
    }
    if (c->data) {
        munmap(c->data, c->data_len);
    }
    free(c->entries);
    free(c->index);
    free(c);
}

const uint8_t *rdmax_page_cache_lookup(struct rdmax_page_cache *c, struct rdmax_page_key key)
{
    uint32_t v;

    c->stats.lookups++;
    if (c->capacity == 0) {
        return NULL;
    }
    v = c->index[cache_find(c, key)];
    if (v == 0) {
        return NULL;
    }
    c->stats.hits++;
    return c->data + (size_t)(v - 1) * RDMAX_PAGE_SIZE;
}

uint8_t *rdmax_page_cache_store(struct rdmax_page_cache *c, struct rdmax_page_key key, bool *hit)
{
    size_t cell, slot;
    struct cache_entry *e;
    uint32_t v;

    c->stats.stores++;
    if (hit) {
        *hit = false;
    }
    if (c->capacity == 0) {
        return NULL;
    }
    cell = cache_find(c, key);
    v = c->index[cell];
    if (v != 0) {
        c->entries[v - 1].ref = 1;
        if (hit) {
            *hit = true;
        }
        return c->data + (size_t)(v - 1) * RDMAX_PAGE_SIZE;
    }

    c->stats.inserts++;
    if (c->count < c->capacity) {
        slot = c->count++;
        atomic_store_explicit(&c->used_hint, c->count, memory_order_relaxed);
    } else {
        /* CLOCK: clear reference bits until an unreferenced slot. */
        for (;;) {
            e = &c->entries[c->hand];
            if (!e->ref) {
                break;
            }
            e->ref = 0;
            c->hand = c->hand + 1 == c->capacity ? 0 : c->hand + 1;
        }
        slot = c->hand;
        c->hand = c->hand + 1 == c->capacity ? 0 : c->hand + 1;
        cache_index_delete(
            c, cache_find(c, (struct rdmax_page_key){.block = e->block, .offset = e->offset}));
        c->stats.evictions++;
        /* The deletion may have shifted cells: find the insertion cell again. */
        cell = cache_find(c, key);
    }
    e = &c->entries[slot];
    e->offset = key.offset;
    e->block = key.block;
    e->ref = 0;
    c->index[cell] = (uint32_t)(slot + 1);
    return c->data + slot * (size_t)RDMAX_PAGE_SIZE;
}

size_t rdmax_page_cache_capacity(const struct rdmax_page_cache *c)
{
    return c->capacity;
}

size_t rdmax_page_cache_count(const struct rdmax_page_cache *c)
{
    return c->count;
}

uint64_t rdmax_page_cache_footprint(const struct rdmax_page_cache *c)
{
    return c->footprint;
}

const struct rdmax_page_cache_stats *rdmax_page_cache_stats(const struct rdmax_page_cache *c)
{
    return &c->stats;
}

static uint64_t digest_mix(uint64_t h, uint64_t v)
{
    h ^= v + UINT64_C(0x9e3779b97f4a7c15) + (h << 6) + (h >> 2);
    return h * UINT64_C(0xff51afd7ed558ccd);
}

uint64_t rdmax_page_cache_digest(const struct rdmax_page_cache *c)
{
    uint64_t h = digest_mix(0, c->capacity);
    size_t i, j;

    h = digest_mix(h, c->count);
    h = digest_mix(h, c->hand);
    for (i = 0; c->index && i <= c->index_mask; i++) {
        h = digest_mix(h, c->index[i]);
    }
    for (i = 0; i < c->count; i++) {
        const uint8_t *p = c->data + i * (size_t)RDMAX_PAGE_SIZE;

        h = digest_mix(h, c->entries[i].offset);
        h = digest_mix(h, (uint64_t)c->entries[i].block << 1 | c->entries[i].ref);
        for (j = 0; j < RDMAX_PAGE_SIZE; j += 8) {
            uint64_t w;

            memcpy(&w, p + j, sizeof(w));
            h = digest_mix(h, w);
        }
    }
    return h;
}

uint64_t rdmax_page_cache_default_cap(void)
{
    long pages = sysconf(_SC_PHYS_PAGES);
    long psize = sysconf(_SC_PAGESIZE);
    uint64_t cap = RDMAX_PAGE_CACHE_DEFAULT_CAP;

    if (pages > 0 && psize > 0) {
        uint64_t quarter = (uint64_t)pages * (uint64_t)psize / 4;

        if (quarter < cap) {
            cap = quarter;
        }
    }
    return cap;
}

uint64_t rdmax_page_cache_budget(uint64_t ram_bytes, unsigned lanes, uint64_t cap_total)
{
    uint64_t want;

    if (lanes == 0) {
        return 0;
    }
    if (cap_total == 0) {
        cap_total = rdmax_page_cache_default_cap();
    }
    want = ram_bytes + ram_bytes / 32;
    if (want < ram_bytes) { /* overflow: absurd RAM size from the stream */
        want = UINT64_MAX;
    }
    return (want < cap_total ? want : cap_total) / lanes;
}
