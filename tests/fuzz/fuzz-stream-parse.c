/*
 * fuzz-stream-parse: the QEMU migration stream parser, both modes, over
 * input cut at fuzzer-chosen offsets (the parser must not care where reads
 * end).
 *
 * input := u8 mode (bit 0: ELIDED) | u8 cut_seed | stream bytes
 *
 * Invariants checked (abort on violation): scan never claims more bytes
 * than it was given; it always makes progress or announces a page; in FULL
 * mode the control bytes plus 4096 per page add up to the input consumed.
 */
#include <stdint.h>
#include <stdlib.h>

#include "stream.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct rdmax_stream *s;
    enum rdmax_stream_mode mode;
    uint32_t rng;
    size_t pos = 2, ctrl = 0, pages = 0, skip = 0;

    if (size < 2) {
        return 0;
    }
    mode = (data[0] & 1) ? RDMAX_STREAM_ELIDED : RDMAX_STREAM_FULL;
    rng = data[1] * 2654435761u + 1;
    s = rdmax_stream_create(mode);
    if (!s) {
        abort();
    }
    while (pos < size) {
        size_t chunk, cpos = 0;
        rng = rng * 1103515245u + 12345u;
        chunk = 1 + (rng >> 16) % 9000;
        if (chunk > size - pos) {
            chunk = size - pos;
        }
        while (cpos < chunk) {
            bool page = false;
            struct rdmax_page_key key;
            ssize_t n;
            if (skip) {
                /* FULL mode: the caller takes the payload, maybe over reads. */
                size_t k = skip < chunk - cpos ? skip : chunk - cpos;
                skip -= k;
                cpos += k;
                if (skip == 0) {
                    rdmax_stream_page_done(s);
                }
                continue;
            }
            n = rdmax_stream_scan(s, data + pos + cpos, chunk - cpos, &page, &key);
            if (n < 0) {
                goto out; /* malformed: rejected, as it must be */
            }
            if ((size_t)n > chunk - cpos) {
                abort();
            }
            if (n == 0 && !page) {
                abort(); /* no progress, no page: the caller would spin */
            }
            cpos += (size_t)n;
            ctrl += (size_t)n;
            if (page) {
                if (key.offset % RDMAX_PAGE_SIZE) {
                    abort();
                }
                if (rdmax_stream_block_name(s, key.block) == NULL) {
                    abort(); /* a page of a block the parser never named */
                }
                pages++;
                if (mode == RDMAX_STREAM_FULL) {
                    skip = RDMAX_PAGE_SIZE;
                } else {
                    rdmax_stream_page_done(s);
                }
            }
        }
        pos += chunk;
    }
    if (skip) {
        goto out; /* input ends inside a page */
    }
    if (mode == RDMAX_STREAM_FULL &&
        ctrl + pages * RDMAX_PAGE_SIZE != rdmax_stream_stats(s)->bytes) {
        abort();
    }
    (void)rdmax_stream_finish(s);
    (void)rdmax_stream_complete(s);
out:
    (void)rdmax_stream_error(s);
    rdmax_stream_destroy(s);
    return 0;
}
