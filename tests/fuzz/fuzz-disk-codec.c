/*
 * fuzz-disk-codec: the disks channel's frame codec (plugin/disk-codec.c).
 *
 * input := u8 mode
 *   mode even: u8 chunk_sel, then bytes QEMU wrote. They are encoded in
 *              reads of chunk_sel * 1031 % 262144 + 1 bytes and every frame
 *              decoded again: the output must be the input, byte for byte.
 *   mode odd:  frames from a hostile peer: repeated u8 type, u8 flags,
 *              be16 len, len bytes. Decoding never crashes and never
 *              hands out more than RDMAX_DISK_CHUNK bytes per frame.
 */
#include <stdlib.h>
#include <string.h>

#include "be.h"
#include "disk-codec.h"
#include "wire.h"

struct rt {
    struct rdmax_disk_dec *dec;
    const uint8_t *want;
    size_t want_len, got;
};

static int frame(void *arg, uint8_t type, uint8_t flags, const void *b, size_t n)
{
    struct rt *t = arg;
    const uint8_t *out;
    size_t len;
    uint64_t eof;
    char err[200];

    if (rdmax_disk_dec_frame(t->dec, type, flags, b, n, &out, &len, &eof, err, sizeof(err)) != 0) {
        abort(); /* the encoder's own frames always decode */
    }
    if (t->got + len > t->want_len || memcmp(out, t->want + t->got, len) != 0) {
        abort();
    }
    t->got += len;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct rdmax_disk_dec *dec;

    if (size < 2) {
        return 0;
    }
    dec = rdmax_disk_dec_create();
    if (!dec) {
        abort();
    }
    if (data[0] % 2 == 0) {
        struct rdmax_disk_enc *enc = rdmax_disk_enc_create();
        size_t chunk = (size_t)data[1] * 1031 % RDMAX_DISK_CHUNK + 1;
        struct rt t = {.dec = dec, .want = data + 2, .want_len = size - 2};

        if (!enc) {
            abort();
        }
        for (size_t i = 0; i < t.want_len; i += chunk) {
            size_t n = t.want_len - i < chunk ? t.want_len - i : chunk;
            if (rdmax_disk_enc_chunk(enc, t.want + i, n, frame, &t) != 0) {
                abort();
            }
        }
        if (t.got != t.want_len) {
            abort();
        }
        rdmax_disk_enc_destroy(enc);
    } else {
        for (size_t i = 1; i + 4 <= size;) {
            uint8_t type = data[i], flags = data[i + 1];
            size_t len = rdmax_get_be16(data + i + 2);
            const uint8_t *out;
            size_t n;
            uint64_t eof;
            char err[200];

            i += 4;
            if (len > size - i) {
                len = size - i;
            }
            int r = rdmax_disk_dec_frame(dec, type, flags, data + i, len, &out, &n, &eof, err,
                                         sizeof(err));
            if (r == 0 && (n > RDMAX_DISK_CHUNK || (n && !out))) {
                abort();
            }
            if (r == 0 && n) {
                volatile uint8_t x = out[0] ^ out[n - 1]; /* readable, all of it */
                (void)x;
            }
            i += len;
        }
    }
    rdmax_disk_dec_destroy(dec);
    return 0;
}
