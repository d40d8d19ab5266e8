/*
 * Streaming parser of the QEMU migration main channel (QEMU 7.2 .. 10.x),
 * per ../shared/reference/qemu-migration-stream.md.
 *
 * It splits the stream into control bytes (everything QEMU wrote except
 * the 4 KiB payloads of RAM PAGE records) and page payloads with their
 * identity. The same parser runs on both sides:
 *  - on the sender over the whole stream (RDMAX_STREAM_FULL): page payloads
 *    are in the input and the caller takes them out;
 *  - on the receiver over the control bytes only (RDMAX_STREAM_ELIDED): at
 *    each page slot the caller inserts the page from its lane.
 * Input may be cut at any byte; the parser keeps what it needs.
 * Anything it does not understand is carried as control bytes from there
 * to the end of the stream ("opaque tail"): less acceleration, never a
 * wrong byte.
 */
#ifndef RDMAX_STREAM_H
#define RDMAX_STREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "lane-codec.h"

enum rdmax_stream_mode {
    RDMAX_STREAM_FULL,   /* page payloads present in the input */
    RDMAX_STREAM_ELIDED, /* page payloads removed from the input */
};

#define RDMAX_STREAM_MAX_BLOCKS 1024

struct rdmax_stream_stats {
    uint64_t bytes;      /* input bytes consumed (control + page) */
    uint64_t pages;      /* PAGE records (payload slots) */
    uint64_t zero_pages; /* ZERO records */
    uint64_t xbzrle;     /* QEMU's own XBZRLE records, passed through */
    uint64_t sections;   /* section headers */
    uint64_t ram_total;  /* bytes announced by MEM_SIZE (guest RAM incl. ROMs) */
    bool opaque;         /* entered the opaque tail */
};

struct rdmax_stream;

struct rdmax_stream *rdmax_stream_create(enum rdmax_stream_mode mode);
void rdmax_stream_destroy(struct rdmax_stream *s);

/*
 * Scan in[0..len). Returns n >= 0: in[0..n) are control bytes. If
 * *page is then true, a page payload with identity *key comes next: in FULL
 * mode the next RDMAX_PAGE_SIZE input bytes are its payload (the caller
 * takes them, possibly over several reads, and then calls
 * rdmax_stream_page_done); in ELIDED mode the caller inserts the page and
 * calls rdmax_stream_page_done. While a page is pending, scan returns 0.
 * Returns -EBADMSG when the stream is malformed (reason: rdmax_stream_error).
 */
ssize_t rdmax_stream_scan(struct rdmax_stream *s, const uint8_t *in, size_t len, bool *page,
                          struct rdmax_page_key *key);

void rdmax_stream_page_done(struct rdmax_stream *s);

/*
 * At the end of the input: 0 when the stream ended where a QEMU stream may
 * end (QEMU's EOF marker seen, also at the end of an opaque tail), -EBADMSG
 * (truncated) otherwise.
 */
int rdmax_stream_finish(struct rdmax_stream *s);

/* True once the stream reached its end marker (EOF and, for precopy, VMDESC). */
bool rdmax_stream_complete(const struct rdmax_stream *s);

const char *rdmax_stream_error(const struct rdmax_stream *s);
const struct rdmax_stream_stats *rdmax_stream_stats(const struct rdmax_stream *s);

/* Name of block index i (interned in stream order), or NULL. */
const char *rdmax_stream_block_name(const struct rdmax_stream *s, uint32_t i);

/* Lane of a page among n lanes: the same on both sides. */
unsigned rdmax_stream_lane_of(struct rdmax_page_key key, unsigned n);

#endif
