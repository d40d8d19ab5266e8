/*
 * fuzz-delta-decode: the delta decoder (untrusted XOR-run encoding), every
 * implementation this CPU has, differentially.
 *
 * input := u8 len_sel (page length = (len_sel % 128 + 1) * 64)
 *          old page (len bytes, zero-padded when the input is short)
 *          src (the rest: the encoding to decode)
 *
 * Invariants (abort): all implementations return the same value and, on
 * success, the same page; decoding in place (page == old) gives the same
 * page as decoding into a separate buffer; a decoded page re-encodes into
 * something that decodes back to it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "delta.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t len, have, src_len;
    uint8_t *old, *ref, *page, *src, *enc;
    const struct rdmax_delta_ops *scalar = rdmax_delta_ops_get(RDMAX_DELTA_SCALAR);
    ssize_t r0;

    if (size < 1 || !scalar) {
        return 0;
    }
    len = (size_t)(data[0] % 128 + 1) * 64;
    have = size - 1 < len ? size - 1 : len;
    old = calloc(1, len);
    ref = malloc(len);
    page = malloc(len);
    memcpy(old, data + 1, have);
    src_len = size - 1 - have;
    src = malloc(src_len ? src_len : 1); /* exactly sized: overreads are caught */
    memcpy(src, data + 1 + have, src_len);
    enc = malloc(RDMAX_DELTA_BOUND(len));

    r0 = scalar->decode(ref, len, old, src, src_len);
    if (r0 != (ssize_t)len && r0 != -EBADMSG) {
        abort();
    }
    for (int i = RDMAX_DELTA_SCALAR; i < RDMAX_DELTA_IMPL_COUNT; i++) {
        const struct rdmax_delta_ops *o = rdmax_delta_ops_get((enum rdmax_delta_impl)i);
        ssize_t r;
        if (!o) {
            continue;
        }
        r = o->decode(page, len, old, src, src_len);
        if (r != r0 || (r0 >= 0 && memcmp(page, ref, len) != 0)) {
            abort();
        }
        /* In place: page starts as old. */
        memcpy(page, old, len);
        r = o->decode(page, len, page, src, src_len);
        if (r != r0 || (r0 >= 0 && memcmp(page, ref, len) != 0)) {
            abort();
        }
    }
    if (r0 >= 0) {
        ssize_t e = rdmax_delta_encode(enc, RDMAX_DELTA_BOUND(len), old, ref, len);
        if (e < 0) {
            abort();
        }
        if (rdmax_delta_decode(page, len, old, enc, (size_t)e) != (ssize_t)len ||
            memcmp(page, ref, len) != 0) {
            abort();
        }
    }
    free(enc);
    free(src);
    free(page);
    free(ref);
    free(old);
    return 0;
}
