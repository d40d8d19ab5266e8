/*
 * rdma-x: one QEMU multifd channel's byte stream, split into the page
 * payloads of its uncompressed packets and everything else.
 *
 * QEMU 7.2-10.x (reference §5.2-5.3): a 64-byte MultiFDInit_t, then
 * packets of a 64-byte header, the 256-byte RAM block name and pages_alloc
 * be64 offsets, followed, with compression=none, by normal_pages raw pages
 * in offset order. The parser hands those pages out with their (block,
 * offset) key and every other byte (init, headers, payloads QEMU compressed
 * itself) as opaque bytes, in stream order; together they are the stream,
 * byte for byte. Anything it does not recognise (another magic, a
 * device-state packet, an out-of-range field) makes it pass the rest of the
 * channel through as opaque bytes: it never fails and never drops a byte.
 */
#ifndef RDMAX_MULTIFD_H
#define RDMAX_MULTIFD_H

#include <stddef.h>
#include <stdint.h>

#include "lane-codec.h"

struct rdmax_mfd_parser;

struct rdmax_mfd_sink {
    /* The next n stream bytes that are not a page payload. 0 or <0 to stop. */
    int (*bytes)(void *arg, const uint8_t *b, size_t n);
    /* The next RDMAX_PAGE_SIZE stream bytes: the page at key. 0 or <0 to stop. */
    int (*page)(void *arg, struct rdmax_page_key key, const uint8_t *page);
};

struct rdmax_mfd_parser *rdmax_mfd_create(void);
void rdmax_mfd_destroy(struct rdmax_mfd_parser *p);

/* Feed the next n bytes of the channel. 0, or what a sink callback returned below 0. */
int rdmax_mfd_feed(struct rdmax_mfd_parser *p, const uint8_t *b, size_t n,
                   const struct rdmax_mfd_sink *sink, void *arg);

/* Why the parser passes the channel through opaque, NULL while it parses. */
const char *rdmax_mfd_opaque_reason(const struct rdmax_mfd_parser *p);

#endif
