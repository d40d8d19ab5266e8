/* rdma-x: the disks channel's frame codec; see disk-codec.h. */
#include "disk-codec.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "be.h"
#include "wire.h"

#define DISK_ZSTD_LEVEL 1 /* a mirror job runs at disk speed: keep up with it */
#define DISK_SAMPLE 8192u /* bytes tried first after data that did not compress */
#define DISK_BLOCK 4096u  /* zero runs are whole blocks of this */

struct rdmax_disk_enc {
    ZSTD_CCtx *z;
    uint8_t *zbuf;
    size_t zcap;
    bool raw_last; /* the last data did not compress */
};

struct rdmax_disk_dec {
    ZSTD_DCtx *z;
    uint8_t *out; /* RDMAX_DISK_CHUNK */
};

static const uint8_t zeros[RDMAX_DISK_CHUNK];

struct rdmax_disk_enc *rdmax_disk_enc_create(void)
{
    struct rdmax_disk_enc *e = calloc(1, sizeof(*e));

    if (!e) {
        return NULL;
    }
    e->zcap = ZSTD_compressBound(RDMAX_DISK_CHUNK);
    e->zbuf = malloc(e->zcap);
    e->z = ZSTD_createCCtx();
    if (!e->zbuf || !e->z) {
        rdmax_disk_enc_destroy(e);
        return NULL;
    }
    return e;
}

void rdmax_disk_enc_destroy(struct rdmax_disk_enc *e)
{
    if (e) {
        ZSTD_freeCCtx(e->z);
        free(e->zbuf);
        free(e);
    }
}

static bool all_zero(const uint8_t *b, size_t n)
{
    size_t i = 0;

    /* Most data has a non-zero byte in its first words: this returns at once. */
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, b + i, sizeof(w));
        if (w) {
            return false;
        }
    }
    for (; i < n; i++) {
        if (b[i]) {
            return false;
        }
    }
    return true;
}

/*
 * Compressing random data costs more than sending it, and a mirror job
 * interleaves chunks from all over the disk (random next to text): after
 * data that did not compress, a sample from its middle decides first.
 */
static int data(struct rdmax_disk_enc *e, const uint8_t *b, size_t n, rdmax_disk_frame_fn frame,
                void *arg)
{
    size_t zn;

    if (e->raw_last && n > 2 * DISK_SAMPLE) {
        zn = ZSTD_compressCCtx(e->z, e->zbuf, e->zcap, b + n / 2, DISK_SAMPLE, DISK_ZSTD_LEVEL);
        if (ZSTD_isError(zn) || zn >= DISK_SAMPLE - DISK_SAMPLE / 10) {
            return frame(arg, RDMAX_F_DISK_DATA, 0, b, n);
        }
    }
    zn = ZSTD_compressCCtx(e->z, e->zbuf, e->zcap, b, n, DISK_ZSTD_LEVEL);
    e->raw_last = ZSTD_isError(zn) || zn >= n - n / 10;
    if (!e->raw_last) {
        return frame(arg, RDMAX_F_DISK_DATA, RDMAX_FF_ZSTD, e->zbuf, zn);
    }
    return frame(arg, RDMAX_F_DISK_DATA, 0, b, n);
}

int rdmax_disk_enc_chunk(struct rdmax_disk_enc *e, const uint8_t *b, size_t n,
                         rdmax_disk_frame_fn frame, void *arg)
{
    size_t start = 0, i = 0;
    int r;

    if (n > RDMAX_DISK_CHUNK) {
        return -EINVAL;
    }
    /* Blocks count from the read's start: an NBD write of zeroes is a 28-byte header and a run. */
    while (i + DISK_BLOCK <= n) {
        if (!all_zero(b + i, DISK_BLOCK)) {
            i += DISK_BLOCK;
            continue;
        }
        size_t j = i + DISK_BLOCK;
        while (j + DISK_BLOCK <= n && all_zero(b + j, DISK_BLOCK)) {
            j += DISK_BLOCK;
        }
        if (i > start && (r = data(e, b + start, i - start, frame, arg)) < 0) {
            return r;
        }
        uint8_t c[4];
        rdmax_put_be32(c, (uint32_t)(j - i));
        if ((r = frame(arg, RDMAX_F_DISK_ZERO, 0, c, sizeof(c))) < 0) {
            return r;
        }
        start = i = j;
    }
    if (start < n && (r = data(e, b + start, n - start, frame, arg)) < 0) {
        return r;
    }
    return 0;
}

struct rdmax_disk_dec *rdmax_disk_dec_create(void)
{
    struct rdmax_disk_dec *d = calloc(1, sizeof(*d));

    if (!d) {
        return NULL;
    }
    d->out = malloc(RDMAX_DISK_CHUNK);
    d->z = ZSTD_createDCtx();
    if (!d->out || !d->z) {
        rdmax_disk_dec_destroy(d);
        return NULL;
    }
    return d;
}

void rdmax_disk_dec_destroy(struct rdmax_disk_dec *d)
{
    if (d) {
        ZSTD_freeDCtx(d->z);
        free(d->out);
        free(d);
    }
}

int rdmax_disk_dec_frame(struct rdmax_disk_dec *d, uint8_t type, uint8_t flags,
                         const uint8_t *payload, size_t len, const uint8_t **out, size_t *out_len,
                         uint64_t *eof_bytes, char *err, size_t err_len)
{
    *out = NULL;
    *out_len = 0;
    if (type == RDMAX_F_DISK_DATA && (flags & RDMAX_FF_ZSTD)) {
        /* The bound is the output buffer: a bomb stops at 256 KiB with an error. */
        size_t dn = ZSTD_decompressDCtx(d->z, d->out, RDMAX_DISK_CHUNK, payload, len);
        if (ZSTD_isError(dn)) {
            snprintf(err, err_len, "corrupt data: %s", ZSTD_getErrorName(dn));
            return -EBADMSG;
        }
        *out = d->out;
        *out_len = dn;
        return 0;
    }
    if (type == RDMAX_F_DISK_DATA && len <= RDMAX_DISK_CHUNK && flags == 0) {
        *out = payload;
        *out_len = len;
        return 0;
    }
    if (type == RDMAX_F_DISK_ZERO && len == 4 && flags == 0) {
        uint32_t n = rdmax_get_be32(payload);
        if (n == 0 || n > RDMAX_DISK_CHUNK) {
            snprintf(err, err_len, "a zero run of %u bytes (1..%u)", n, RDMAX_DISK_CHUNK);
            return -EBADMSG;
        }
        *out = zeros;
        *out_len = n;
        return 0;
    }
    if (type == RDMAX_F_DISK_EOF && len == 8 && flags == 0) {
        *eof_bytes = rdmax_get_be64(payload);
        return 1;
    }
    snprintf(err, err_len, "unexpected %s frame (%zu bytes)", rdmax_frame_type_name(type), len);
    return -EBADMSG;
}
