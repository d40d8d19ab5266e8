/*
 * fuzz-lane-decode: the lane batch decoder (descriptors, varints, deltas
 * against the mirrored page cache, zstd parts) over a sequence of batches,
 * so the cache state a hostile sender builds up is fuzzed too.
 *
 * input := u8 cache (0: none, 1: 16 pages, 2: 256 pages, 3: 4 MiB)
 *          { be24 len | batch[len] }...
 *
 * Invariants: every page handed to the callback is 4096 readable bytes at
 * a page-aligned offset; the count returned equals the callbacks made.
 */
#include <stdlib.h>
#include <string.h>

#include "lane-codec.h"

struct seen {
    unsigned n;
    uint32_t sum;
};

static int on_page(void *arg, struct rdmax_page_key key, const uint8_t *page)
{
    struct seen *s = arg;

    if (key.offset % RDMAX_PAGE_SIZE) {
        abort();
    }
    /* Touch every byte: ASan checks the whole page is ours to read. */
    for (size_t i = 0; i < RDMAX_PAGE_SIZE; i += 64) {
        s->sum += page[i] + page[i + 63];
    }
    s->n++;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint64_t caches[] = {0, 16 * 4200, 256 * 4200, 4u << 20};
    struct rdmax_codec_config cfg = {0};
    struct rdmax_lane_decoder *d;
    size_t pos = 1;

    if (size < 1) {
        return 0;
    }
    cfg.cache_bytes = caches[data[0] & 3];
    if (rdmax_lane_decoder_create(&cfg, &d) < 0) {
        abort();
    }
    while (pos + 3 <= size) {
        size_t len = (size_t)data[pos] << 16 | (size_t)data[pos + 1] << 8 | data[pos + 2];
        uint8_t *batch;
        struct seen s = {0};
        int r;

        pos += 3;
        if (len > size - pos) {
            len = size - pos;
        }
        batch = malloc(len ? len : 1); /* exactly sized */
        memcpy(batch, data + pos, len);
        r = rdmax_lane_decoder_decode(d, batch, len, on_page, &s);
        free(batch);
        pos += len;
        if (r >= 0 && (unsigned)r != s.n) {
            abort();
        }
        if (r > (int)RDMAX_BATCH_MAX_PAGES) {
            abort();
        }
    }
    (void)rdmax_lane_decoder_cache_digest(d);
    rdmax_lane_decoder_destroy(d);
    return 0;
}
