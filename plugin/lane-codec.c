/*
 * Lane codec, first tier set: every page travels whole, the batch body
 * zstd-compressed when that pays.
 *
 * batch := be16 count, u8 flags, u8 0, be32 body_len
 *          count x (be32 block, be64 offset)
 *          body   (count x 4096 page bytes; zstd frame when flags & 1)
 */
#include "lane-codec.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#define BATCH_HDR 8u
#define ENTRY_LEN 12u
#define BF_ZSTD 0x01

struct rdmax_lane_encoder {
    struct rdmax_codec_config cfg;
    ZSTD_CCtx *cctx;
    unsigned n;
    struct rdmax_page_key keys[RDMAX_BATCH_MAX_PAGES];
    uint8_t *pages; /* RDMAX_BATCH_MAX_PAGES pages */
    struct rdmax_lane_stats stats;
};

struct rdmax_lane_decoder {
    struct rdmax_codec_config cfg;
    ZSTD_DCtx *dctx;
    uint8_t *pages;
};

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

int rdmax_lane_encoder_create(const struct rdmax_codec_config *cfg,
                              struct rdmax_lane_encoder **out)
{
    struct rdmax_lane_encoder *e = calloc(1, sizeof(*e));

    if (!e) {
        return -ENOMEM;
    }
    e->cfg = *cfg;
    e->cctx = ZSTD_createCCtx();
    e->pages = malloc((size_t)RDMAX_BATCH_MAX_PAGES * RDMAX_PAGE_SIZE);
    if (!e->cctx || !e->pages) {
        rdmax_lane_encoder_destroy(e);
        return -ENOMEM;
    }
    *out = e;
    return 0;
}

void rdmax_lane_encoder_destroy(struct rdmax_lane_encoder *e)
{
    if (!e) {
        return;
    }
    ZSTD_freeCCtx(e->cctx);
    free(e->pages);
    free(e);
}

int rdmax_lane_encoder_add(struct rdmax_lane_encoder *e, struct rdmax_page_key key,
                           const uint8_t *page)
{
    if (e->n == RDMAX_BATCH_MAX_PAGES) {
        return -ENOSPC;
    }
    e->keys[e->n] = key;
    memcpy(e->pages + (size_t)e->n * RDMAX_PAGE_SIZE, page, RDMAX_PAGE_SIZE);
    e->n++;
    return 0;
}

unsigned rdmax_lane_encoder_pending(const struct rdmax_lane_encoder *e)
{
    return e->n;
}

size_t rdmax_lane_encoder_bound(void)
{
    return BATCH_HDR + RDMAX_BATCH_MAX_PAGES * ENTRY_LEN +
           ZSTD_compressBound((size_t)RDMAX_BATCH_MAX_PAGES * RDMAX_PAGE_SIZE);
}

ssize_t rdmax_lane_encoder_flush(struct rdmax_lane_encoder *e, uint8_t *out, size_t cap)
{
    size_t raw = (size_t)e->n * RDMAX_PAGE_SIZE;
    size_t head = BATCH_HDR + (size_t)e->n * ENTRY_LEN;
    size_t body = raw;
    uint8_t flags = 0;

    if (cap < rdmax_lane_encoder_bound()) {
        return -EMSGSIZE;
    }
    out[0] = (uint8_t)(e->n >> 8);
    out[1] = (uint8_t)e->n;
    out[3] = 0;
    for (unsigned i = 0; i < e->n; i++) {
        uint8_t *p = out + BATCH_HDR + (size_t)i * ENTRY_LEN;
        put_be32(p, e->keys[i].block);
        put_be32(p + 4, (uint32_t)(e->keys[i].offset >> 32));
        put_be32(p + 8, (uint32_t)e->keys[i].offset);
    }
    if (e->cfg.zstd_level >= 0 && raw) {
        int level = e->cfg.zstd_level ? e->cfg.zstd_level : 1;
        size_t z = ZSTD_compressCCtx(e->cctx, out + head, cap - head, e->pages, raw, level);
        /* Keep it only when it saves something worth a decompression. */
        if (!ZSTD_isError(z) && z < raw - raw / 16) {
            body = z;
            flags |= BF_ZSTD;
        }
    }
    if (!(flags & BF_ZSTD)) {
        memcpy(out + head, e->pages, raw);
    }
    out[2] = flags;
    put_be32(out + 4, (uint32_t)body);
    e->stats.pages += e->n;
    e->stats.batches++;
    e->stats.bytes_raw += raw;
    e->stats.bytes_wire += head + body;
    e->n = 0;
    return (ssize_t)(head + body);
}

const struct rdmax_lane_stats *rdmax_lane_encoder_stats(const struct rdmax_lane_encoder *e)
{
    return &e->stats;
}

int rdmax_lane_decoder_create(const struct rdmax_codec_config *cfg,
                              struct rdmax_lane_decoder **out)
{
    struct rdmax_lane_decoder *d = calloc(1, sizeof(*d));

    if (!d) {
        return -ENOMEM;
    }
    d->cfg = *cfg;
    d->dctx = ZSTD_createDCtx();
    d->pages = malloc((size_t)RDMAX_BATCH_MAX_PAGES * RDMAX_PAGE_SIZE);
    if (!d->dctx || !d->pages) {
        rdmax_lane_decoder_destroy(d);
        return -ENOMEM;
    }
    *out = d;
    return 0;
}

void rdmax_lane_decoder_destroy(struct rdmax_lane_decoder *d)
{
    if (!d) {
        return;
    }
    ZSTD_freeDCtx(d->dctx);
    free(d->pages);
    free(d);
}

int rdmax_lane_decoder_decode(struct rdmax_lane_decoder *d, const uint8_t *in, size_t len,
                              rdmax_page_cb cb, void *arg)
{
    unsigned n;
    size_t head, body, raw;
    const uint8_t *pages;

    if (len < BATCH_HDR) {
        return -EBADMSG;
    }
    n = (unsigned)in[0] << 8 | in[1];
    body = get_be32(in + 4);
    if (n == 0 || n > RDMAX_BATCH_MAX_PAGES || (in[2] & ~BF_ZSTD) || in[3] != 0) {
        return -EBADMSG;
    }
    head = BATCH_HDR + (size_t)n * ENTRY_LEN;
    raw = (size_t)n * RDMAX_PAGE_SIZE;
    if (len < head || len - head != body) {
        return -EBADMSG;
    }
    if (in[2] & BF_ZSTD) {
        size_t z = ZSTD_decompressDCtx(d->dctx, d->pages, raw, in + head, body);
        if (ZSTD_isError(z) || z != raw) {
            return -EBADMSG;
        }
        pages = d->pages;
    } else {
        if (body != raw) {
            return -EBADMSG;
        }
        pages = in + head;
    }
    for (unsigned i = 0; i < n; i++) {
        const uint8_t *p = in + BATCH_HDR + (size_t)i * ENTRY_LEN;
        struct rdmax_page_key key = {
            .block = get_be32(p),
            .offset = (uint64_t)get_be32(p + 4) << 32 | get_be32(p + 8),
        };
        int r;
        if (key.offset % RDMAX_PAGE_SIZE) {
            return -EBADMSG;
        }
        r = cb(arg, key, pages + (size_t)i * RDMAX_PAGE_SIZE);
        if (r < 0) {
            return r;
        }
    }
    return (int)n;
}
