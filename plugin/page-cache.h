/*
 * Mirrored page cache of one lane: page key -> the last version of that page
 * sent on the lane.
 *
 * Mirroring: the sender and the receiver each hold one and call
 * rdmax_page_cache_store() for the same keys in the same order (once per
 * page sent, whatever its tier); every decision the cache makes (where a key
 * goes, which entry is evicted) is a function of that sequence alone, so
 * both hold the same keys with the same contents at every batch boundary.
 * Lookups do not change the state, so only the sender needs to make them.
 *
 * Memory: everything is allocated at create and sized from a byte budget
 * that includes the metadata; the cache never allocates afterwards and its
 * footprint (rdmax_page_cache_footprint) never exceeds the budget.
 *
 * Eviction: CLOCK (second chance). An entry gets its reference bit when its
 * key is stored again while cached (a page QEMU re-sent: the ones deltas pay
 * for), not when first inserted, so a first-pass sweep over cold RAM evicts
 * other cold pages before re-sent ones.
 *
 * Not thread-safe: one cache per lane thread.
 */
#ifndef RDMAX_PAGE_CACHE_H
#define RDMAX_PAGE_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lane-codec.h"

/*
 * Default cap on the total cache (all lanes) when sizing from the guest RAM:
 * the smaller of this and a quarter of the host's physical memory. Both ends
 * hold a cache as large, next to a guest of that size.
 */
#define RDMAX_PAGE_CACHE_DEFAULT_CAP (UINT64_C(4) << 30)

struct rdmax_page_cache_stats {
    uint64_t lookups;   /* rdmax_page_cache_lookup calls (sender only) */
    uint64_t hits;      /* ... that found the key */
    uint64_t stores;    /* rdmax_page_cache_store calls */
    uint64_t inserts;   /* ... of a key not cached */
    uint64_t evictions; /* ... that evicted another key */
};

struct rdmax_page_cache;

/*
 * A cache whose total footprint is at most budget_bytes (the page data, the
 * per-entry metadata, the hash index and the struct itself). A budget too
 * small for one page gives a cache of capacity 0, which stores nothing (and
 * takes only its struct, about 100 bytes, whatever the budget).
 * @return 0, -ENOMEM.
 */
int rdmax_page_cache_create(uint64_t budget_bytes, struct rdmax_page_cache **out);

/* Accepts NULL. */
void rdmax_page_cache_destroy(struct rdmax_page_cache *c);

/*
 * Fault the cache's memory in from a background thread at SCHED_IDLE, in
 * the order slots are handed out, at most `ahead` bytes ahead of the slots
 * in use, so the page path seldom takes a first-touch fault. Changes
 * nothing the cache holds or decides (mirroring is unaffected); stopped by
 * destroy. 0, or -errno when no thread could start.
 */
int rdmax_page_cache_populate_start(struct rdmax_page_cache *c, size_t ahead);

/*
 * The cached version of key (RDMAX_PAGE_SIZE bytes), or NULL. Does not
 * change what the cache holds or evicts (only the lookup counters).
 * Valid until the next rdmax_page_cache_store on this cache.
 */
const uint8_t *rdmax_page_cache_lookup(struct rdmax_page_cache *c, struct rdmax_page_key key);

/*
 * Make key cached, evicting another key if full, and return its page slot
 * (RDMAX_PAGE_SIZE bytes) for the caller to fill with the version just sent
 * or received; it must be filled before the next call on this cache (its
 * contents are the old version when *hit, or undefined otherwise). NULL only
 * for a capacity-0 cache. *hit (optional) tells whether key was cached.
 * Valid until the next rdmax_page_cache_store.
 */
uint8_t *rdmax_page_cache_store(struct rdmax_page_cache *c, struct rdmax_page_key key, bool *hit);

/* Pages the cache can hold; pages it holds. */
size_t rdmax_page_cache_capacity(const struct rdmax_page_cache *c);
size_t rdmax_page_cache_count(const struct rdmax_page_cache *c);

/* Bytes allocated at create (<= the budget). */
uint64_t rdmax_page_cache_footprint(const struct rdmax_page_cache *c);

const struct rdmax_page_cache_stats *rdmax_page_cache_stats(const struct rdmax_page_cache *c);

/*
 * A 64-bit digest of everything that decides future behaviour (keys, their
 * slots, contents, reference bits, clock hand): equal digests on both sides
 * mean the mirrors agree. O(capacity); for tests and debug cross-checks.
 */
uint64_t rdmax_page_cache_digest(const struct rdmax_page_cache *c);

/*
 * Sizing policy: the budget of each of `lanes` caches for a guest of
 * ram_bytes (the MEM_SIZE record at the start of the stream).
 *
 *   total = min(ram_bytes + ram_bytes / 32, cap_total);  per lane = total / lanes
 *
 * The 1/32 covers the metadata (< 1%) and the uneven spread of pages over
 * lanes by hash, so a guest that fits is cached whole: a cache smaller than
 * the guest's dirty working set misses nearly always (QEMU's 64 MiB XBZRLE
 * default misses ~99% of pages on a busy guest of a few GiB), and a miss
 * costs a full page. cap_total 0 means rdmax_page_cache_default_cap().
 * Returns 0 (no cache) when lanes is 0.
 */
uint64_t rdmax_page_cache_budget(uint64_t ram_bytes, unsigned lanes, uint64_t cap_total);

/* min(RDMAX_PAGE_CACHE_DEFAULT_CAP, physical memory / 4). */
uint64_t rdmax_page_cache_default_cap(void);

#endif
