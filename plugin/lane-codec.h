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

/* Counters of one lane; written by the lane thread, read by stats (relaxed). */
struct rdmax_lane_stats {
    uint64_t pages;
    uint64_t batches;
    uint64_t bytes_raw;  /* page bytes in */
    uint64_t bytes_wire; /* batch bytes out */
};

struct rdmax_lane_encoder;
struct rdmax_lane_decoder;

int rdmax_lane_encoder_create(const struct rdmax_codec_config *cfg,
                              struct rdmax_lane_encoder **out);
void rdmax_lane_encoder_destroy(struct rdmax_lane_encoder *e);

/* Queue one page into the current batch. The page is copied; valid until return. */
int rdmax_lane_encoder_add(struct rdmax_lane_encoder *e, struct rdmax_page_key key,
                           const uint8_t *page);

/* Pages queued in the current batch. */
unsigned rdmax_lane_encoder_pending(const struct rdmax_lane_encoder *e);

/* Bytes a flush may write at most (for RDMAX_BATCH_MAX_PAGES pages). */
size_t rdmax_lane_encoder_bound(void);

/*
 * Encode the current batch into out[0..cap) and start a new one.
 * Returns the batch length, or -EMSGSIZE when cap is below the bound.
 */
ssize_t rdmax_lane_encoder_flush(struct rdmax_lane_encoder *e, uint8_t *out, size_t cap);

const struct rdmax_lane_stats *rdmax_lane_encoder_stats(const struct rdmax_lane_encoder *e);

typedef int (*rdmax_page_cb)(void *arg, struct rdmax_page_key key, const uint8_t *page);

int rdmax_lane_decoder_create(const struct rdmax_codec_config *cfg,
                              struct rdmax_lane_decoder **out);
void rdmax_lane_decoder_destroy(struct rdmax_lane_decoder *d);

/*
 * Decode one batch (untrusted input). For each page in order calls
 * cb(arg, key, page); page is valid until cb returns. Returns the number of
 * pages, -EBADMSG for corrupt input (nothing is trusted), or what cb returned
 * when it returned < 0.
 */
int rdmax_lane_decoder_decode(struct rdmax_lane_decoder *d, const uint8_t *in, size_t len,
                              rdmax_page_cb cb, void *arg);

#endif
