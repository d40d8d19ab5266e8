/*
 * Tests: read a recorded migration stream into memory, decompressing it
 * when its name ends in .zst (the QEMU 10.0 vectors are stored so, with
 * frames up to a 128 MiB window). NULL when the file cannot be opened;
 * any other failure fails the test.
 */
#ifndef RDMAX_TEST_STREAM_FILE_H
#define RDMAX_TEST_STREAM_FILE_H

#include <criterion/criterion.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

static uint8_t *load_stream(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    uint8_t *data;
    long n;

    if (!f) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    data = malloc((size_t)n);
    cr_assert_eq(fread(data, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    if (n > 4 && strcmp(path + strlen(path) - 4, ".zst") == 0) {
        unsigned long long size = ZSTD_getFrameContentSize(data, (size_t)n);
        uint8_t *out;
        ZSTD_DCtx *d = ZSTD_createDCtx();
        cr_assert(size != ZSTD_CONTENTSIZE_ERROR && size != ZSTD_CONTENTSIZE_UNKNOWN);
        out = malloc(size);
        ZSTD_DCtx_setParameter(d, ZSTD_d_windowLogMax, 27);
        ZSTD_inBuffer in = {data, (size_t)n, 0};
        ZSTD_outBuffer o = {out, size, 0};
        while (in.pos < in.size) {
            size_t r = ZSTD_decompressStream(d, &o, &in);
            cr_assert(!ZSTD_isError(r), "%s: %s", path, ZSTD_getErrorName(r));
        }
        cr_assert_eq(o.pos, size);
        ZSTD_freeDCtx(d);
        free(data);
        *len = size;
        return out;
    }
    *len = (size_t)n;
    return data;
}

#endif
