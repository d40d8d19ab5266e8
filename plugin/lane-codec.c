/*
 * Lane codec: tiers per page (unchanged, zero, delta against the mirrored
 * page cache, full), full pages zstd-compressed per batch at an adaptively
 * chosen level or stored raw.
 *
 * Batch format (docs/wire-protocol.md, "Lane batches"; all fixed-width
 * fields big-endian, varints LEB128 little-endian groups of 7 bits):
 *
 *   batch    := header desc full
 *   header   := u8 version (= 2) | u8 flags | be16 count          -- 1..64
 *               be32 desc_len | be32 desc_raw_len | be32 full_len  -- 16 bytes
 *   flags    := bit 0 DESC_ZSTD: desc is one zstd frame of desc_raw_len
 *                                bytes, else desc_len == desc_raw_len
 *               bit 1 FULL_ZSTD: full is one zstd frame of nfull * 4096
 *                                bytes, else full_len == nfull * 4096
 *               (other bits 0)
 *   desc     := page{count}                    -- exactly desc_raw_len bytes
 *   page     := tag [block] [offset] [delta]
 *   tag      := u8: bits 0-1 tier (0 UNCHANGED, 1 ZERO, 2 DELTA, 3 FULL)
 *                   bit 2 BLK: block follows, else block = previous page's
 *                   bit 3 OFS: offset follows, else index = previous + 1
 *                   bit 4 NOCACHE: FULL only, key not cached, and it stays so
 *                   bits 5-7 zero
 *   block    := varint (< 2^32)
 *   offset   := varint zigzag(index - (previous index + 1)), where
 *               index = byte offset / 4096 (< 2^52); before the first page
 *               "previous" is block 0, index -1
 *   delta    := varint len (1..RDMAX_DELTA_BOUND(4096)) byte[len]
 *                                              -- for DELTA only, delta.c
 *   full     := the FULL pages' 4096 bytes, in page order
 *
 * Cache rules, applied page by page in order on both sides (mirroring):
 *   UNCHANGED  key must be cached; store(key) (its contents stay)
 *   ZERO       if key is cached, store(key) and zero it; else no change
 *   DELTA      key must be cached; store(key), apply the delta in place
 *   FULL       store(key) (inserting, maybe evicting), copy the page in;
 *              with NOCACHE: key must not be cached; no change
 * so the cache always holds the last version sent of the keys it holds.
 *
 * Tier choice (encoder only; the decoder does not need to know why): zero
 * pages are ZERO; a cached page is UNCHANGED or DELTA when its delta is at
 * most `delta_cap` bytes, about what a FULL page costs at the current zstd
 * ratio; otherwise FULL.
 *
 * Level (cfg.zstd_level 0 = adaptive): -1 uncached (raw, no new cache
 * inserts: NOCACHE), 0 raw, 1-2 zstd, as the pipe's controller
 * (plugin/level.c) sets it with rdmax_lane_encoder_set_level: lanes share
 * the link, so one level for the whole pipe.
 * Pages that do not compress by 1/16 (over 64 batches) go raw whatever
 * the level, with a probe at level 1 now and then to notice when they do
 * again. At any level, a batch whose full
 * part did not compress makes the next 1, 2, 4 or 8 batches skip the try.
 */
#include "lane-codec.h"
#include "page-copy.h"
#include "be.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zstd.h>

#include "delta.h"
#include "page-cache.h"

#define BATCH_VERSION 2u
#define BATCH_HDR 16u
#define BF_DESC_ZSTD 0x01u
#define BF_FULL_ZSTD 0x02u

#define TAG_TIER 0x03u
#define TAG_BLK 0x04u
#define TAG_OFS 0x08u
#define TAG_NOCACHE 0x10u
#define TAG_RESERVED 0xe0u

#define PS RDMAX_PAGE_SIZE
#define DELTA_MAX RDMAX_DELTA_BOUND(PS)
#define INDEX_LIMIT (UINT64_C(1) << 52) /* index * 4096 fits 64 bits */

/* Largest descriptor of one page: tag, 5-byte block, 10-byte offset, 2-byte len. */
#define DESC_PAGE_HDR_MAX (1u + 5u + 10u + 2u)
#define DESC_MAX (RDMAX_BATCH_MAX_PAGES * (DESC_PAGE_HDR_MAX + DELTA_MAX))
#define FULL_MAX ((size_t)RDMAX_BATCH_MAX_PAGES * PS)

/* Adaptive control. */
#define ADAPT_WINDOW_BATCHES 64u /* compressibility is judged over this many batches */
#define ADAPT_PROBE_EVERY 64u    /* raw for incompressibility: probe batches */
#define DESC_ZSTD_MIN 512u       /* smaller descriptor parts are not worth a frame */

#ifndef MIN
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#endif

struct rdmax_lane_encoder {
    struct rdmax_codec_config cfg;
    ZSTD_CCtx *cctx;
    struct rdmax_page_cache *cache; /* NULL when cfg.cache_bytes is 0 */
    unsigned n, nfull;
    uint8_t *desc; /* DESC_MAX: the descriptor part being built */
    size_t desc_len;
    uint8_t *full; /* FULL_MAX: full pages of this batch copied by add() */
    /*
     * Where each FULL page of this batch lies, in order: in full[], or
     * the caller's own page when add_ref() took a reference (the caller
     * keeps it unchanged until the batch is sent). nref: how many do.
     */
    const uint8_t *fullp[RDMAX_BATCH_MAX_PAGES];
    unsigned nref;
    uint32_t prev_block;
    uint64_t prev_index;
    size_t delta_cap; /* a delta above this goes FULL */
    /* Adaptive level: see the top comment. */
    int level;                        /* 0 = raw, -1 = raw without new cache inserts */
    bool incompressible;              /* raw because pages did not compress */
    unsigned probe_in;                /* batches until the next probe */
    unsigned desc_skip;               /* batches to send the descriptor raw without trying */
    unsigned desc_backoff;            /* next desc_skip after a try that did not pay */
    unsigned full_skip, full_backoff; /* the same for the full-page part */
    uint64_t batch_start_ns;          /* first add() of the pending batch */
    int want;                         /* the level the pipe asked for (set_level) */
    unsigned win_batches;
    uint8_t *out; /* rdmax_lane_encoder_bound(): header, descriptor, compressed full part */
    uint64_t win_full_in, win_full_out; /* compressed batches in the window */
    struct rdmax_lane_stats stats;
};

struct rdmax_lane_decoder {
    struct rdmax_codec_config cfg;
    ZSTD_DCtx *dctx;
    struct rdmax_page_cache *cache;
    uint8_t *desc; /* DESC_MAX */
    uint8_t *full; /* FULL_MAX */
    uint8_t *zero; /* one zero page */
    bool broken;   /* an error desynchronized the cache: refuse everything */
};

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void enc_apply_level(struct rdmax_lane_encoder *e)
{
    int level = e->incompressible && e->want > 0 ? 0 : e->want;

    if (level < 0 && !e->cache) {
        level = 0;
    }
    if (level != e->level) {
        e->level = level;
        e->stats.level = level;
        e->stats.level_changes++;
    }
}

void rdmax_lane_encoder_set_level(struct rdmax_lane_encoder *e, int level)
{
    if (e->cfg.zstd_level != 0 || level == e->want) {
        return;
    }
    e->want = level;
    enc_apply_level(e);
}

static size_t varint_put(uint8_t *p, uint64_t v)
{
    size_t n = 0;

    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* At most 10 bytes, minimal, fits 64 bits; false otherwise. */
static bool varint_get(const uint8_t *p, size_t len, size_t *pos, uint64_t *v)
{
    uint64_t r = 0;
    unsigned shift = 0;

    for (;;) {
        uint8_t b;

        if (*pos >= len || shift > 63) {
            return false;
        }
        b = p[(*pos)++];
        if (shift == 63 && b > 1) {
            return false;
        }
        r |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            if (b == 0 && shift != 0) {
                return false; /* non-minimal */
            }
            *v = r;
            return true;
        }
        shift += 7;
    }
}

static uint64_t zigzag(int64_t v)
{
    return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
}

static int64_t unzigzag(uint64_t v)
{
    return (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
}

/* Most pages are not zero and differ from zero in their first bytes. */
static bool page_is_zero(const uint8_t *p)
{
    size_t i, j;

    for (i = 0; i < PS; i += 64) {
        uint64_t acc = 0;

        for (j = 0; j < 64; j += 8) {
            uint64_t w;

            memcpy(&w, p + i + j, sizeof(w)); /* callers' pages need no alignment */
            acc |= w;
        }
        if (acc) {
            return false;
        }
    }
    return true;
}

/* ---- encoder ------------------------------------------------------------ */

static void enc_reset_batch(struct rdmax_lane_encoder *e)
{
    e->n = 0;
    e->nfull = 0;
    e->nref = 0;
    e->desc_len = 0;
    e->prev_block = 0;
    e->prev_index = UINT64_MAX; /* "-1": the first page's expected index is 0 */
}

int rdmax_lane_encoder_create(const struct rdmax_codec_config *cfg, struct rdmax_lane_encoder **out)
{
    struct rdmax_lane_encoder *e = calloc(1, sizeof(*e));
    int r = -ENOMEM;

    if (!e) {
        return -ENOMEM;
    }
    e->cfg = *cfg;
    e->cctx = ZSTD_createCCtx();
    e->desc = malloc(DESC_MAX);
    e->full = malloc(FULL_MAX);
    e->out = malloc(rdmax_lane_encoder_bound());
    if (!e->cctx || !e->desc || !e->full || !e->out) {
        goto err;
    }
    if (cfg->cache_bytes) {
        r = rdmax_page_cache_create(cfg->cache_bytes, &e->cache);
        if (r < 0) {
            goto err;
        }
    }
    if (cfg->zstd_level > 0) {
        e->level = cfg->zstd_level;
    } else if (cfg->zstd_level == 0) {
        e->level = 1;
    }
    e->want = e->level;
    e->delta_cap = PS - 1;
    e->probe_in = ADAPT_PROBE_EVERY;
    e->stats.zstd_level = e->level;
    e->stats.level = e->level;
    enc_reset_batch(e);
    *out = e;
    return 0;

err:
    rdmax_lane_encoder_destroy(e);
    return r;
}

void rdmax_lane_encoder_destroy(struct rdmax_lane_encoder *e)
{
    if (!e) {
        return;
    }
    ZSTD_freeCCtx(e->cctx);
    rdmax_page_cache_destroy(e->cache);
    free(e->desc);
    free(e->full);
    free(e->out);
    free(e);
}

/*
 * by_ref: the caller offers to keep page until the batch is sent. Returns
 * 1 when the encoder took the offer, 0 when it copied what it needs.
 */
static int enc_add(struct rdmax_lane_encoder *e, struct rdmax_page_key key, const uint8_t *page,
                   bool by_ref)
{
    uint64_t index = key.offset / PS;
    uint8_t *d, tag;
    const uint8_t *old = NULL;
    size_t h = 0;
    enum rdmax_page_tier tier;
    int ref = 0;

    if (e->n == RDMAX_BATCH_MAX_PAGES) {
        return -ENOSPC;
    }
    if (key.offset % PS || index >= INDEX_LIMIT) {
        return -EINVAL;
    }
    if (e->n == 0) {
        e->batch_start_ns = now_ns();
    }

    /* Descriptor header: tag (filled below), then the key if unexpected. */
    d = e->desc + e->desc_len;
    tag = 0;
    h = 1;
    if (key.block != e->prev_block) {
        tag |= TAG_BLK;
        h += varint_put(d + h, key.block);
    }
    if (index != e->prev_index + 1) {
        tag |= TAG_OFS;
        h += varint_put(d + h, zigzag((int64_t)(index - (e->prev_index + 1))));
    }
    e->prev_block = key.block;
    e->prev_index = index;

    if (e->cache) {
        old = rdmax_page_cache_lookup(e->cache, key);
    }
    if (page_is_zero(page)) {
        tier = RDMAX_TIER_ZERO;
        if (old) {
            memset(rdmax_page_cache_store(e->cache, key, NULL), 0, PS);
        }
    } else {
        tier = RDMAX_TIER_FULL;
        if (old) {
            /* Room for a 2-byte length; moved back a byte if it needs one. */
            ssize_t n = rdmax_delta_encode(d + h + 2, e->delta_cap, old, page, PS);

            if (n == 0) {
                tier = RDMAX_TIER_UNCHANGED;
                (void)rdmax_page_cache_store(e->cache, key, NULL);
            } else if (n > 0) {
                tier = RDMAX_TIER_DELTA;
                if (n < 0x80) {
                    d[h] = (uint8_t)n;
                    memmove(d + h + 1, d + h + 2, (size_t)n);
                    h += 1 + (size_t)n;
                } else {
                    varint_put(d + h, (uint64_t)n);
                    h += 2 + (size_t)n;
                }
                rdmax_page_copy(rdmax_page_cache_store(e->cache, key, NULL), page);
            }
        }
        if (tier == RDMAX_TIER_FULL) {
            uint8_t *slot = NULL;

            if (e->cache && !old && e->level < 0) {
                tag |= TAG_NOCACHE;
                e->stats.uncached_pages++;
            } else if (e->cache) {
                slot = rdmax_page_cache_store(e->cache, key, NULL);
            }
            /*
             * A batch that will likely go raw leaves its pages from where
             * the caller has them (flush_iov gathers them if it compresses
             * after all); else they are copied now, while cache-hot.
             */
            if (by_ref && (e->level <= 0 || e->full_skip > 0)) {
                e->fullp[e->nfull] = page;
                e->nref++;
                ref = 1;
            } else {
                e->fullp[e->nfull] = e->full + (size_t)e->nfull * PS;
                rdmax_page_copy(e->full + (size_t)e->nfull * PS, page);
            }
            e->nfull++;
            if (slot) { /* NULL: a cache of capacity 0 */
                rdmax_page_copy(slot, page);
            }
        }
    }
    d[0] = tag | (uint8_t)tier;
    e->desc_len += h;
    e->n++;

    e->stats.tier_pages[tier]++;
    e->stats.tier_bytes[tier] += h;
    if (old) {
        e->stats.cache_hits++;
    } else {
        e->stats.cache_misses++;
    }
    return ref;
}

int rdmax_lane_encoder_add(struct rdmax_lane_encoder *e, struct rdmax_page_key key,
                           const uint8_t *page)
{
    return enc_add(e, key, page, false);
}

int rdmax_lane_encoder_add_ref(struct rdmax_lane_encoder *e, struct rdmax_page_key key,
                               const uint8_t *page)
{
    return enc_add(e, key, page, true);
}

/* Copy the FULL pages add_ref() left where they were into full[]: it holds them all then. */
static void enc_gather(struct rdmax_lane_encoder *e)
{
    for (unsigned i = 0; e->nref && i < e->nfull; i++) {
        uint8_t *dst = e->full + (size_t)i * PS;

        if (e->fullp[i] != dst) {
            rdmax_page_copy(dst, e->fullp[i]);
            e->fullp[i] = dst;
            e->nref--;
        }
    }
}

unsigned rdmax_lane_encoder_pending(const struct rdmax_lane_encoder *e)
{
    return e->n;
}

size_t rdmax_lane_encoder_bound(void)
{
    /* Parts are kept compressed only when smaller than raw. */
    return BATCH_HDR + DESC_MAX + FULL_MAX;
}

/*
 * Compress src into dst when that saves at least 1/den of it; returns the
 * compressed length, or 0 to store raw.
 */
static size_t enc_try_zstd(struct rdmax_lane_encoder *e, uint8_t *dst, const uint8_t *src,
                           size_t len, int level, size_t den)
{
    size_t z;

    ZSTD_CCtx_setParameter(e->cctx, ZSTD_c_compressionLevel, level);
    z = ZSTD_compress2(e->cctx, dst, len - len / den, src, len);
    if (ZSTD_isError(z)) {
        /* dstSize_tooSmall: not worth it. Anything else: send raw too. */
        return 0;
    }
    return z;
}

/* Every ADAPT_WINDOW_BATCHES: did the compressed parts pay? See the top comment. */
static void enc_adapt(struct rdmax_lane_encoder *e)
{
    if (e->cfg.zstd_level != 0 || ++e->win_batches < ADAPT_WINDOW_BATCHES) {
        return;
    }
    if (e->win_full_in && e->win_full_out * 16 > e->win_full_in * 15) {
        e->incompressible = true;
        enc_apply_level(e);
    }
    e->win_batches = 0;
    e->win_full_in = e->win_full_out = 0;
}

/*
 * The raw full-page part as iov[1..): one entry per run of pages that lie
 * back to back (all of full[] when add() copied them), appended to *iovcnt.
 * When the runs need more than iov_max entries, they are gathered into
 * full[] first.
 */
static void enc_full_iov(struct rdmax_lane_encoder *e, struct iovec *iov, int iov_max, int *iovcnt)
{
    int n;

    for (;;) {
        n = *iovcnt;
        for (unsigned i = 0; i < e->nfull && n <= iov_max; i++) {
            if (n > *iovcnt &&
                (const uint8_t *)iov[n - 1].iov_base + iov[n - 1].iov_len == e->fullp[i]) {
                iov[n - 1].iov_len += PS;
                continue;
            }
            if (n < iov_max) {
                iov[n].iov_base = (void *)e->fullp[i];
                iov[n].iov_len = PS;
            }
            n++;
        }
        if (n <= iov_max || e->nref == 0) {
            break;
        }
        enc_gather(e); /* now one run */
    }
    *iovcnt = n;
}

ssize_t rdmax_lane_encoder_flush_iov(struct rdmax_lane_encoder *e, struct iovec iov[2], int *iovcnt)
{
    return rdmax_lane_encoder_flush_iovs(e, iov, 2, iovcnt);
}

ssize_t rdmax_lane_encoder_flush_iovs(struct rdmax_lane_encoder *e, struct iovec *iov, int iov_max,
                                      int *iovcnt)
{
    size_t full_raw = (size_t)e->nfull * PS;
    size_t desc_len = e->desc_len, full_len = full_raw, pos, z;
    uint8_t flags = 0, *out = e->out;
    int level = e->level;
    bool probe = false;

    *iovcnt = 0;
    if (e->n == 0) {
        return 0;
    }

    /* A raw lane probes now and then whether pages compress again. */
    if (level == 0 && e->cfg.zstd_level == 0 && e->incompressible && e->want > 0 && full_raw &&
        --e->probe_in == 0) {
        e->probe_in = ADAPT_PROBE_EVERY;
        level = 1;
        probe = true;
    }

    pos = BATCH_HDR;
    z = 0;
    if (level > 0 && desc_len >= DESC_ZSTD_MIN) {
        /*
         * Deltas of scattered random bytes do not compress, and trying costs
         * as much as the delta encoding: after a try that does not pay, skip
         * 1, 2, 4 ... 64 batches before the next.
         */
        if (e->desc_skip) {
            e->desc_skip--;
        } else {
            z = enc_try_zstd(e, out + pos, e->desc, desc_len, level, 8);
            e->desc_backoff = z ? 0 : e->desc_backoff ? MIN(e->desc_backoff * 2, 64u) : 1;
            e->desc_skip = e->desc_backoff;
        }
    }
    if (z) {
        flags |= BF_DESC_ZSTD;
        desc_len = z;
    } else {
        memcpy(out + pos, e->desc, desc_len);
    }
    pos += desc_len;

    z = 0;
    if (level > 0 && full_raw) {
        /*
         * On incompressible pages a try costs about as much as zstd -1's
         * whole run and still ends in a raw copy: after a try that does not
         * pay, store 1, 2, 4, 8 batches raw before the next (at any level).
         */
        if (e->full_skip && !probe) {
            e->full_skip--;
        } else {
            enc_gather(e);
            z = enc_try_zstd(e, out + pos, e->full, full_raw, level, 16);
            e->win_full_in += full_raw;
            e->win_full_out += z ? z : full_raw;
            if (probe && z) {
                e->incompressible = false;
                enc_apply_level(e);
            }
            e->full_backoff = z ? 0 : e->full_backoff ? MIN(e->full_backoff * 2, 8u) : 1;
            e->full_skip = e->full_backoff;
        }
    }
    iov[0].iov_base = out;
    if (z) {
        flags |= BF_FULL_ZSTD;
        full_len = z;
        e->stats.full_zstd_batches++;
        iov[0].iov_len = pos + full_len;
        *iovcnt = 1;
    } else {
        /* Raw pages leave from where add() put them or add_ref() found them. */
        iov[0].iov_len = pos;
        *iovcnt = 1;
        if (full_raw) {
            enc_full_iov(e, iov, iov_max, iovcnt);
            e->stats.full_raw_batches++;
        }
    }
    pos += full_len;

    out[0] = BATCH_VERSION;
    out[1] = flags;
    rdmax_put_be16(out + 2, (uint16_t)e->n);
    rdmax_put_be32(out + 4, (uint32_t)desc_len);
    rdmax_put_be32(out + 8, (uint32_t)e->desc_len);
    rdmax_put_be32(out + 12, (uint32_t)full_len);

    /* A delta pays while it is below what a full page costs at this ratio. */
    if (full_raw) {
        size_t per_page = full_len / e->nfull;

        e->delta_cap = per_page < 256 ? 256 : per_page >= PS ? PS - 1 : per_page;
    }

    e->stats.pages += e->n;
    e->stats.batches++;
    e->stats.bytes_raw += (uint64_t)e->n * PS;
    e->stats.bytes_wire += pos;
    e->stats.tier_bytes[RDMAX_TIER_FULL] += full_len;
    e->stats.zstd_level = full_raw ? (flags & BF_FULL_ZSTD ? level : 0) : e->stats.zstd_level;
    enc_reset_batch(e);

    e->stats.encode_ns += now_ns() - e->batch_start_ns;
    enc_adapt(e);
    return (ssize_t)pos;
}

ssize_t rdmax_lane_encoder_flush(struct rdmax_lane_encoder *e, uint8_t *out, size_t cap)
{
    struct iovec iov[RDMAX_LANE_IOV_MAX];
    int n;
    ssize_t len;
    size_t pos = 0;

    if (cap < rdmax_lane_encoder_bound()) {
        return -EMSGSIZE;
    }
    len = rdmax_lane_encoder_flush_iovs(e, iov, RDMAX_LANE_IOV_MAX, &n);
    for (int i = 0; i < n; i++) {
        memcpy(out + pos, iov[i].iov_base, iov[i].iov_len);
        pos += iov[i].iov_len;
    }
    return len;
}

const struct rdmax_lane_stats *rdmax_lane_encoder_stats(const struct rdmax_lane_encoder *e)
{
    return &e->stats;
}

int rdmax_lane_encoder_populate(struct rdmax_lane_encoder *e, size_t ahead)
{
    return rdmax_page_cache_populate_start(e->cache, ahead);
}

int rdmax_lane_decoder_populate(struct rdmax_lane_decoder *d, size_t ahead)
{
    return rdmax_page_cache_populate_start(d->cache, ahead);
}

uint64_t rdmax_lane_encoder_cache_digest(const struct rdmax_lane_encoder *e)
{
    return e->cache ? rdmax_page_cache_digest(e->cache) : 0;
}

/* ---- decoder ------------------------------------------------------------ */

int rdmax_lane_decoder_create(const struct rdmax_codec_config *cfg, struct rdmax_lane_decoder **out)
{
    struct rdmax_lane_decoder *d = calloc(1, sizeof(*d));
    int r = -ENOMEM;

    if (!d) {
        return -ENOMEM;
    }
    d->cfg = *cfg;
    d->dctx = ZSTD_createDCtx();
    d->desc = malloc(DESC_MAX);
    d->full = malloc(FULL_MAX);
    d->zero = calloc(1, PS);
    if (!d->dctx || !d->desc || !d->full || !d->zero) {
        goto err;
    }
    /* Our frames are at most FULL_MAX; refuse windows that would need more. */
    ZSTD_DCtx_setParameter(d->dctx, ZSTD_d_windowLogMax, 20);
    if (cfg->cache_bytes) {
        r = rdmax_page_cache_create(cfg->cache_bytes, &d->cache);
        if (r < 0) {
            goto err;
        }
    }
    *out = d;
    return 0;

err:
    rdmax_lane_decoder_destroy(d);
    return r;
}

void rdmax_lane_decoder_destroy(struct rdmax_lane_decoder *d)
{
    if (!d) {
        return;
    }
    ZSTD_freeDCtx(d->dctx);
    rdmax_page_cache_destroy(d->cache);
    free(d->desc);
    free(d->full);
    free(d->zero);
    free(d);
}

/* One page's descriptor, parsed. */
struct dec_page {
    struct rdmax_page_key key;
    enum rdmax_page_tier tier;
    bool nocache;                  /* FULL: not to be inserted */
    uint32_t delta_pos, delta_len; /* in the descriptor part */
};

/* Decompress exactly `want` bytes from src into dst; false on any mismatch. */
static bool dec_zstd_exact(struct rdmax_lane_decoder *d, uint8_t *dst, size_t want,
                           const uint8_t *src, size_t len)
{
    size_t z = ZSTD_decompressDCtx(d->dctx, dst, want, src, len);

    return !ZSTD_isError(z) && z == want;
}

/*
 * Parses and checks the whole descriptor part (every field, every length)
 * into pages[]; counts the FULL pages. Nothing is applied yet.
 */
static int dec_parse(const uint8_t *desc, size_t len, unsigned count, struct dec_page *pages,
                     unsigned *nfull)
{
    uint32_t block = 0;
    uint64_t index = UINT64_MAX;
    size_t pos = 0;
    unsigned i;

    *nfull = 0;
    for (i = 0; i < count; i++) {
        struct dec_page *pg = &pages[i];
        uint64_t v;
        uint8_t tag;

        if (pos >= len) {
            return -EBADMSG;
        }
        tag = desc[pos++];
        if (tag & TAG_RESERVED) {
            return -EBADMSG;
        }
        if (tag & TAG_BLK) {
            if (!varint_get(desc, len, &pos, &v) || v > UINT32_MAX || v == block) {
                return -EBADMSG;
            }
            block = (uint32_t)v;
        }
        index += 1; /* UINT64_MAX + 1 == 0 for the first page */
        if (tag & TAG_OFS) {
            if (!varint_get(desc, len, &pos, &v) || v == 0) {
                return -EBADMSG;
            }
            index += (uint64_t)unzigzag(v);
        }
        if (index >= INDEX_LIMIT) {
            return -EBADMSG;
        }
        pg->key.block = block;
        pg->key.offset = index * PS;
        pg->tier = (enum rdmax_page_tier)(tag & TAG_TIER);
        pg->nocache = (tag & TAG_NOCACHE) != 0;
        if (pg->nocache && pg->tier != RDMAX_TIER_FULL) {
            return -EBADMSG;
        }
        pg->delta_pos = pg->delta_len = 0;
        if (pg->tier == RDMAX_TIER_DELTA) {
            if (!varint_get(desc, len, &pos, &v) || v == 0 || v > DELTA_MAX || v > len - pos) {
                return -EBADMSG;
            }
            pg->delta_pos = (uint32_t)pos;
            pg->delta_len = (uint32_t)v;
            pos += (size_t)v;
        } else if (pg->tier == RDMAX_TIER_FULL) {
            (*nfull)++;
        }
    }
    return pos == len ? 0 : -EBADMSG; /* nothing may trail */
}

int rdmax_lane_decoder_decode(struct rdmax_lane_decoder *d, const uint8_t *in, size_t len,
                              rdmax_page_cb cb, void *arg)
{
    struct dec_page pages[RDMAX_BATCH_MAX_PAGES];
    const uint8_t *desc, *full;
    unsigned count, nfull, i, f = 0;
    uint8_t flags;
    size_t desc_len, desc_raw, full_len;
    int r;

    if (d->broken || len < BATCH_HDR || in[0] != BATCH_VERSION) {
        return -EBADMSG;
    }
    flags = in[1];
    count = (unsigned)in[2] << 8 | in[3];
    desc_len = rdmax_get_be32(in + 4);
    desc_raw = rdmax_get_be32(in + 8);
    full_len = rdmax_get_be32(in + 12);
    if ((flags & ~(BF_DESC_ZSTD | BF_FULL_ZSTD)) || count == 0 || count > RDMAX_BATCH_MAX_PAGES ||
        desc_raw > DESC_MAX || desc_len > len - BATCH_HDR ||
        full_len != len - BATCH_HDR - desc_len) {
        return -EBADMSG;
    }

    desc = in + BATCH_HDR;
    if (flags & BF_DESC_ZSTD) {
        if (!dec_zstd_exact(d, d->desc, desc_raw, desc, desc_len)) {
            return -EBADMSG;
        }
        desc = d->desc;
    } else if (desc_len != desc_raw) {
        return -EBADMSG;
    }
    if (dec_parse(desc, desc_raw, count, pages, &nfull) < 0) {
        return -EBADMSG;
    }

    full = in + BATCH_HDR + desc_len;
    if (flags & BF_FULL_ZSTD) {
        if (nfull == 0 || !dec_zstd_exact(d, d->full, (size_t)nfull * PS, full, full_len)) {
            return -EBADMSG;
        }
        full = d->full;
    } else if (full_len != (size_t)nfull * PS) {
        return -EBADMSG;
    }

    /*
     * Apply in order. From here an error leaves the cache partly updated,
     * no longer a mirror of the encoder's: the decoder refuses all else.
     */
    for (i = 0; i < count; i++) {
        const struct dec_page *pg = &pages[i];
        const uint8_t *page;
        uint8_t *slot;

        switch (pg->tier) {
        case RDMAX_TIER_UNCHANGED:
            if (!d->cache || !rdmax_page_cache_lookup(d->cache, pg->key)) {
                goto bad;
            }
            page = rdmax_page_cache_store(d->cache, pg->key, NULL);
            break;
        case RDMAX_TIER_ZERO:
            page = d->zero;
            if (d->cache && rdmax_page_cache_lookup(d->cache, pg->key)) {
                slot = rdmax_page_cache_store(d->cache, pg->key, NULL);
                memset(slot, 0, PS);
                page = slot;
            }
            break;
        case RDMAX_TIER_DELTA:
            if (!d->cache || !rdmax_page_cache_lookup(d->cache, pg->key)) {
                goto bad;
            }
            slot = rdmax_page_cache_store(d->cache, pg->key, NULL);
            if (rdmax_delta_decode(slot, PS, slot, desc + pg->delta_pos, pg->delta_len) < 0) {
                goto bad;
            }
            page = slot;
            break;
        default: /* RDMAX_TIER_FULL */
            page = full + (size_t)f++ * PS;
            if (pg->nocache) {
                if (d->cache && rdmax_page_cache_lookup(d->cache, pg->key)) {
                    goto bad; /* the cache would keep a stale version */
                }
                break;
            }
            slot = d->cache ? rdmax_page_cache_store(d->cache, pg->key, NULL) : NULL;
            if (slot) { /* NULL: a cache of capacity 0 */
                memcpy(slot, page, PS);
                page = slot;
            }
            break;
        }
        r = cb(arg, pg->key, page);
        if (r < 0) {
            d->broken = true; /* the rest of the batch was not applied */
            return r;
        }
    }
    return (int)count;

bad:
    d->broken = true;
    return -EBADMSG;
}

uint64_t rdmax_lane_decoder_cache_digest(const struct rdmax_lane_decoder *d)
{
    return d->cache ? rdmax_page_cache_digest(d->cache) : 0;
}
