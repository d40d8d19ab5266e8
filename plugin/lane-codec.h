/*
 * Lane codec: turns the pages routed to one lane into batches for the wire,
 * and back. One encoder per sending lane thread, one decoder per receiving
 * lane thread; neither is shared between threads.
 *
 * The page cache is mirrored: the decoder applies exactly the insertions
 * and evictions the encoder applied, in the same order, so a delta is always
 * decoded against the version it was encoded against. Both sides must be
 * created with the same struct rdmax_codec_config (negotiated in the
 * handshake).
 *
 * The batch format is documented in docs/wire-protocol.md ("Lane batches").
 */
#ifndef RDMAX_LANE_CODEC_H
#define RDMAX_LANE_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#define RDMAX_PAGE_SIZE 4096u
#define RDMAX_BATCH_MAX_PAGES 64u

/* Identity of a page: block index as interned by the stream parser, byte offset. */
struct rdmax_page_key {
    uint32_t block;
    uint64_t offset;
};

struct rdmax_codec_config {
    uint64_t cache_bytes; /* page cache per lane, 0 = none */
    int zstd_level;       /* 0 = adaptive, <0 = never compress, >0 fixed */
};

/*
 * How one page travels in a batch (docs/wire-protocol.md, "Lane batches").
 * The values are the wire's tier field.
 */
enum rdmax_page_tier {
    RDMAX_TIER_UNCHANGED = 0, /* equal to the cached version: no payload */
    RDMAX_TIER_ZERO = 1,      /* all zero: no payload */
    RDMAX_TIER_DELTA = 2,     /* XOR runs against the cached version (delta.h) */
    RDMAX_TIER_FULL = 3,      /* whole page, in the batch's zstd or raw part */
    RDMAX_TIER_COUNT,
};

/* Counters of one lane; written by the lane thread, read by stats (relaxed). */
struct rdmax_lane_stats {
    uint64_t pages;
    uint64_t batches;
    uint64_t bytes_raw;  /* page bytes in */
    uint64_t bytes_wire; /* batch bytes out */
    /* Encoder only, from here on. */
    uint64_t tier_pages[RDMAX_TIER_COUNT];
    /*
     * Batch bytes per tier: its page's descriptor and delta bytes before the
     * descriptor part's own compression; FULL also gets the (compressed or
     * raw) full-page part. Batch headers and the descriptor part's zstd
     * savings are in no tier, so the sum differs a little from bytes_wire.
     */
    uint64_t tier_bytes[RDMAX_TIER_COUNT];
    uint64_t cache_hits;        /* pages whose key was cached (whatever tier they took) */
    uint64_t cache_misses;      /* pages whose key was not */
    uint64_t full_zstd_batches; /* batches whose full-page part went compressed */
    uint64_t full_raw_batches;  /* ... went raw (incompressible, or raw chosen) */
    uint64_t encode_ns;         /* from each batch's first add() to its flush()'s end */
    uint64_t level_changes;     /* adaptive steps taken (up or down) */
    uint64_t uncached_pages;    /* FULL pages sent without a cache insert (level -1) */
    int zstd_level;             /* level of the last batch's full part, 0 = raw */
    int level;                  /* the adaptive level now: -1 uncached, 0 raw, 1.. zstd */
};

struct rdmax_lane_encoder;
struct rdmax_lane_decoder;

int rdmax_lane_encoder_create(const struct rdmax_codec_config *cfg,
                              struct rdmax_lane_encoder **out);
void rdmax_lane_encoder_destroy(struct rdmax_lane_encoder *e);

/*
 * Queue one page into the current batch. The page is copied; valid until
 * return. The page's tier is chosen here and the page cache updated, so
 * pages are encoded in the order they are added (a key may repeat within a
 * batch). Returns 0, -ENOSPC when RDMAX_BATCH_MAX_PAGES are pending (flush
 * first), -EINVAL for an offset that is not a multiple of RDMAX_PAGE_SIZE.
 */
int rdmax_lane_encoder_add(struct rdmax_lane_encoder *e, struct rdmax_page_key key,
                           const uint8_t *page);

/*
 * As add(), but the caller offers to keep page readable and unchanged
 * until the batch that holds it was sent (until it is done with the iov
 * of the flush_iovs() that ends the batch, or that flush's return for the
 * other flushes). Returns 1 when the encoder took the offer: a FULL page
 * of a batch that is likely to go raw then leaves from page itself, not
 * from a copy (flush gathers it when the batch compresses after all).
 * Returns 0 when the encoder needs page no longer than add() does (the
 * caller may release it now), or add()'s errors.
 */
int rdmax_lane_encoder_add_ref(struct rdmax_lane_encoder *e, struct rdmax_page_key key,
                               const uint8_t *page);

/* Pages queued in the current batch. */
unsigned rdmax_lane_encoder_pending(const struct rdmax_lane_encoder *e);

/* Bytes a flush may write at most (for RDMAX_BATCH_MAX_PAGES pages). */
size_t rdmax_lane_encoder_bound(void);

/*
 * Encode the current batch into out[0..cap) and start a new one.
 * Returns the batch length, 0 when no page is pending (nothing to send), or
 * -EMSGSIZE when cap is below the bound. Copies the batch once more than
 * rdmax_lane_encoder_flush_iov; for tests and tools.
 */
ssize_t rdmax_lane_encoder_flush(struct rdmax_lane_encoder *e, uint8_t *out, size_t cap);

/*
 * Encode the current batch and start a new one, without copying it out:
 * iov[0..*iovcnt) (at most 2) point at the batch in the encoder's own
 * buffers, valid until the next add() or flush on e. A raw full-page part
 * goes out from where add() put the pages (pages add_ref() left in place
 * are gathered: see flush_iovs). Returns the batch length, 0 when
 * no page is pending (*iovcnt is then 0).
 */
ssize_t rdmax_lane_encoder_flush_iov(struct rdmax_lane_encoder *e, struct iovec iov[2],
                                     int *iovcnt);

/* The most entries flush_iovs() needs: the header and descriptor, then one per FULL page. */
#define RDMAX_LANE_IOV_MAX (1 + (int)RDMAX_BATCH_MAX_PAGES)

/*
 * As flush_iov, into iov[0..iov_max) (iov_max >= 2): iov[0] the header,
 * the descriptor part and a compressed full-page part; a raw full-page
 * part follows as one entry per run of pages lying back to back (in the
 * encoder's buffer, or where add_ref() found them), gathered into the
 * encoder's buffer when the runs would need more than iov_max entries.
 */
ssize_t rdmax_lane_encoder_flush_iovs(struct rdmax_lane_encoder *e, struct iovec *iov, int iov_max,
                                      int *iovcnt);

/*
 * The level the pipe's controller chose (plugin/level.h): -1 uncached (FULL
 * pages the cache does not hold go NOCACHE), 0 raw, 1.. zstd. Only with
 * cfg.zstd_level 0 (adaptive); applies from the next page. Pages found not
 * to compress keep a lane raw whatever the level (with probes).
 */
void rdmax_lane_encoder_set_level(struct rdmax_lane_encoder *e, int level);

const struct rdmax_lane_stats *rdmax_lane_encoder_stats(const struct rdmax_lane_encoder *e);

/*
 * Digest of the lane's page cache (rdmax_page_cache_digest; 0 without a
 * cache). Equal on both ends after the same batches, so a peer can send its
 * digest (say with LANE_EOF) for the other to check the mirror. O(cache).
 */
uint64_t rdmax_lane_encoder_cache_digest(const struct rdmax_lane_encoder *e);

/*
 * Fault the page cache in, at most `ahead` bytes ahead of its use, from a
 * background thread while the CPU would idle
 * (rdmax_page_cache_populate_start); for the pipelines, not needed for
 * correctness. 0 or -errno.
 */
int rdmax_lane_encoder_populate(struct rdmax_lane_encoder *e, size_t ahead);
int rdmax_lane_decoder_populate(struct rdmax_lane_decoder *d, size_t ahead);

typedef int (*rdmax_page_cb)(void *arg, struct rdmax_page_key key, const uint8_t *page);

int rdmax_lane_decoder_create(const struct rdmax_codec_config *cfg,
                              struct rdmax_lane_decoder **out);
void rdmax_lane_decoder_destroy(struct rdmax_lane_decoder *d);

/*
 * Decode one batch (untrusted input). For each page in order calls
 * cb(arg, key, page); page is valid until cb returns. Returns the number of
 * pages, -EBADMSG for corrupt input (nothing is trusted), or what cb returned
 * when it returned < 0.
 * The whole batch layout is checked before the first cb, and an error found
 * then changes nothing. A delta that does not apply, or a page that refers
 * to a version the cache does not hold, is found only when its turn comes,
 * after cb has seen the pages before it; the cache then no longer mirrors
 * the encoder's, so the decoder fails every later call with -EBADMSG (as it
 * does after cb returned < 0): end the session.
 */
int rdmax_lane_decoder_decode(struct rdmax_lane_decoder *d, const uint8_t *in, size_t len,
                              rdmax_page_cb cb, void *arg);

/* As rdmax_lane_encoder_cache_digest, for the receiving end. */
uint64_t rdmax_lane_decoder_cache_digest(const struct rdmax_lane_decoder *d);

#endif
