/*
 * fuzz-multifd-parse: the multifd channel splitter (plugin/multifd.c) on
 * untrusted QEMU channel bytes.
 *
 * input := u8 chunk_sel (feed in chunks of chunk_sel % 64 * 97 + 1 bytes)
 *          the channel's bytes (the rest)
 *
 * Invariants (abort): the opaque bytes and pages it hands out are the
 * input, byte for byte and in order; every page key is page-aligned; it
 * never fails.
 */
#include <stdlib.h>
#include <string.h>

#include "multifd.h"

struct out {
    uint8_t *b;
    size_t len, cap;
};

static int put(void *arg, const uint8_t *b, size_t n)
{
    struct out *o = arg;

    if (o->len + n > o->cap) {
        abort();
    }
    memcpy(o->b + o->len, b, n);
    o->len += n;
    return 0;
}

static int page(void *arg, struct rdmax_page_key key, const uint8_t *pg)
{
    if (key.offset % RDMAX_PAGE_SIZE) {
        abort();
    }
    return put(arg, pg, RDMAX_PAGE_SIZE);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const struct rdmax_mfd_sink sink = {.bytes = put, .page = page};
    struct rdmax_mfd_parser *p;
    struct out o;
    size_t chunk, n;

    if (size < 1) {
        return 0;
    }
    chunk = (size_t)(data[0] % 64) * 97 + 1;
    data++;
    size--;
    p = rdmax_mfd_create();
    o.cap = size;
    o.len = 0;
    o.b = malloc(size ? size : 1);
    if (!p || !o.b) {
        abort();
    }
    for (size_t i = 0; i < size; i += n) {
        n = size - i < chunk ? size - i : chunk;
        if (rdmax_mfd_feed(p, data + i, n, &sink, &o) != 0) {
            abort();
        }
    }
    /* A page or a header cut short by the end stays inside the parser: the rest must match. */
    if (o.len > size || memcmp(o.b, data, o.len) != 0) {
        abort();
    }
    free(o.b);
    rdmax_mfd_destroy(p);
    return 0;
}
