/*
 * The multifd channel splitter (plugin/multifd.c): the pages of
 * uncompressed packets come out with their keys, everything else as opaque
 * bytes, together the channel byte for byte, however the reads split it.
 */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "be.h"
#include "multifd.h"

struct out {
    uint8_t b[1 << 20];
    size_t len;
    unsigned pages;
    struct rdmax_page_key keys[64];
};

static int put(void *arg, const uint8_t *b, size_t n)
{
    struct out *o = arg;

    cr_assert_leq(o->len + n, sizeof(o->b));
    memcpy(o->b + o->len, b, n);
    o->len += n;
    return 0;
}

static int page(void *arg, struct rdmax_page_key key, const uint8_t *pg)
{
    struct out *o = arg;

    if (o->pages < 64) {
        o->keys[o->pages] = key;
    }
    o->pages++;
    return put(arg, pg, RDMAX_PAGE_SIZE);
}

static const struct rdmax_mfd_sink sink = {.bytes = put, .page = page};

/* A packet header: 64 fixed bytes, the block name, 128 offset slots. */
static size_t header(uint8_t *h, uint32_t flags, uint32_t pages_alloc, uint32_t normal,
                     uint32_t next_size, uint32_t zero, const char *block, const uint64_t *offs)
{
    size_t len = 64 + 256 + 8 * 128;

    memset(h, 0, len);
    rdmax_put_be32(h, 0x11223344u);
    rdmax_put_be32(h + 4, 1);
    rdmax_put_be32(h + 8, flags);
    rdmax_put_be32(h + 12, pages_alloc);
    rdmax_put_be32(h + 16, normal);
    rdmax_put_be32(h + 20, next_size);
    rdmax_put_be32(h + 32, zero);
    strcpy((char *)h + 64, block);
    for (uint32_t i = 0; i < normal + zero && i < 128; i++) {
        rdmax_put_be64(h + 320 + 8 * i, offs[i]);
    }
    return len;
}

/* init, a 3-page packet, a 10.x header-only SYNC, a zstd packet, a 1-page packet in another block.
 */
static size_t sample(uint8_t *s)
{
    static const uint64_t offs[] = {0x1000, 0x5000, 0x2000, 0x9000};
    size_t n = 0;

    memset(s, 0, 64);
    rdmax_put_be32(s, 0x11223344u);
    rdmax_put_be32(s + 4, 1);
    s[24] = 1; /* channel id */
    n = 64;
    n += header(s + n, 0, 128, 3, 3 * 4096, 1, "pc.ram", offs);
    for (int i = 0; i < 3 * 4096; i++) {
        s[n + i] = (uint8_t)(i * 7 + 1);
    }
    n += 3 * 4096;
    n += header(s + n, 1, 0, 0, 0, 0, "", offs); /* SYNC, pages_alloc 0 (9.0+) */
    n += header(s + n, 0x4, 128, 2, 100, 0, "pc.ram", offs);
    memset(s + n, 0xab, 100);
    n += 100;
    n += header(s + n, 0, 128, 1, 4096, 0, "vga.vram", offs + 3);
    memset(s + n, 0x5a, 4096);
    n += 4096;
    return n;
}

Test(multifd, pages_and_bytes_at_every_split)
{
    static uint8_t s[64 << 10];
    size_t n = sample(s);

    for (size_t chunk = 1; chunk <= n; chunk = chunk < 64 ? chunk + 1 : chunk * 3) {
        struct out *o = calloc(1, sizeof(*o));
        struct rdmax_mfd_parser *p = rdmax_mfd_create();
        for (size_t i = 0; i < n; i += chunk) {
            cr_assert_eq(rdmax_mfd_feed(p, s + i, n - i < chunk ? n - i : chunk, &sink, o), 0);
        }
        cr_assert_eq(o->len, n, "chunk %zu: %zu of %zu bytes", chunk, o->len, n);
        cr_assert_eq(memcmp(o->b, s, n), 0, "chunk %zu", chunk);
        cr_assert_eq(o->pages, 4, "chunk %zu: %u pages", chunk, o->pages);
        cr_assert_eq(o->keys[0].offset, 0x1000);
        cr_assert_eq(o->keys[2].offset, 0x2000);
        cr_assert_eq(o->keys[0].block, o->keys[2].block);
        cr_assert_neq(o->keys[3].block, o->keys[0].block, "another block, another id");
        cr_assert_eq(o->keys[3].offset, 0x9000);
        cr_assert_null(rdmax_mfd_opaque_reason(p));
        rdmax_mfd_destroy(p);
        free(o);
    }
}

Test(multifd, not_multifd_passes_through)
{
    static uint8_t s[20000];
    struct out *o = calloc(1, sizeof(*o));
    struct rdmax_mfd_parser *p = rdmax_mfd_create();

    for (size_t i = 0; i < sizeof(s); i++) {
        s[i] = (uint8_t)(i * 31);
    }
    cr_assert_eq(rdmax_mfd_feed(p, s, sizeof(s), &sink, o), 0);
    cr_assert_eq(o->len, sizeof(s));
    cr_assert_eq(memcmp(o->b, s, sizeof(s)), 0);
    cr_assert_eq(o->pages, 0);
    cr_assert_str_eq(rdmax_mfd_opaque_reason(p), "not a multifd channel");
    rdmax_mfd_destroy(p);
    free(o);
}

Test(multifd, device_state_and_bad_counts_go_opaque)
{
    static uint8_t s[64 << 10];
    static uint64_t offs[128] = {0x1000};
    uint32_t bad[][2] = {{0x40, 1}, {0, 129}}; /* device state; more pages than slots */

    for (int k = 0; k < 2; k++) {
        size_t n = sample(s);
        n += header(s + n, bad[k][0], 128, bad[k][1], 4096, 0, "pc.ram", offs);
        memset(s + n, 0x11, 4096);
        n += 4096;
        struct out *o = calloc(1, sizeof(*o));
        struct rdmax_mfd_parser *p = rdmax_mfd_create();
        cr_assert_eq(rdmax_mfd_feed(p, s, n, &sink, o), 0);
        cr_assert_eq(o->len, n);
        cr_assert_eq(memcmp(o->b, s, n), 0);
        cr_assert_eq(o->pages, 4, "the pages before it still count");
        cr_assert_not_null(rdmax_mfd_opaque_reason(p));
        rdmax_mfd_destroy(p);
        free(o);
    }
}
