/*
 * The stream parser on synthetic edge cases and on real QEMU streams:
 * every stream must come back byte for byte through "sender parse ->
 * control bytes + pages -> receiver parse (pages elided) -> splice", for
 * any way the reads cut it.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "stream.h"
#include "stream-file.h"

/* ---- a growable byte buffer ---- */
struct buf {
    uint8_t *p;
    size_t len, cap;
};

static void put(struct buf *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        cr_assert_not_null(b->p);
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void put8(struct buf *b, uint8_t v)
{
    put(b, &v, 1);
}

static void put16(struct buf *b, uint16_t v)
{
    uint8_t x[2] = {v >> 8, (uint8_t)v};
    put(b, x, 2);
}

static void put32(struct buf *b, uint32_t v)
{
    uint8_t x[4] = {v >> 24, (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    put(b, x, 4);
}

static void put64(struct buf *b, uint64_t v)
{
    put32(b, (uint32_t)(v >> 32));
    put32(b, (uint32_t)v);
}

static void putcstr(struct buf *b, const char *s)
{
    put8(b, (uint8_t)strlen(s));
    put(b, s, strlen(s));
}

/* The stream header, then the long header of a START section. */
static void put_header_and_start(struct buf *b, uint32_t sid, const char *idstr, uint32_t version)
{
    put32(b, 0x5145564d);
    put32(b, 3);
    put8(b, 0x01);
    put32(b, sid);
    putcstr(b, idstr);
    put32(b, 0);
    put32(b, version);
}

static void page_fill(uint8_t *p, uint32_t seed)
{
    for (unsigned i = 0; i < RDMAX_PAGE_SIZE; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (uint8_t)(seed >> 16);
    }
}

/* A QEMU-7.2-shaped precopy stream touching every record kind. */
static struct buf synthetic_stream(void)
{
    struct buf b = {0};
    uint8_t page[RDMAX_PAGE_SIZE];

    put32(&b, 0x5145564d);
    put32(&b, 3);
    put8(&b, 0x07); /* configuration */
    put32(&b, 13);
    put(&b, "pc-i440fx-7.2", 13);
    put8(&b, 0x05);
    putcstr(&b, "configuration/uuid");
    put32(&b, 1);
    put(&b, "0123456789abcdef", 16);
    put8(&b, 0x08); /* OPEN_RETURN_PATH */
    put16(&b, 1);
    put16(&b, 0);
    put8(&b, 0x08); /* PING 1 */
    put16(&b, 2);
    put16(&b, 4);
    put32(&b, 1);
    /* RAM START: MEM_SIZE and the block list */
    put8(&b, 0x01);
    put32(&b, 2);
    putcstr(&b, "ram");
    put32(&b, 0);
    put32(&b, 4);
    put64(&b, 0x10002000 | 0x04);
    putcstr(&b, "pc.ram");
    put64(&b, 0x10000000);
    putcstr(&b, "pc.bios");
    put64(&b, 0x2000);
    put64(&b, 0x200); /* MULTIFD_FLUSH */
    put64(&b, 0x10);  /* EOS */
    put8(&b, 0x7e);
    put32(&b, 2);
    /* PART: pages, zero pages, QEMU XBZRLE, CONTINUE across sections */
    put8(&b, 0x02);
    put32(&b, 2);
    put64(&b, 0x0000 | 0x08);
    putcstr(&b, "pc.ram");
    page_fill(page, 1);
    put(&b, page, sizeof(page));
    put64(&b, 0x1000 | 0x08 | 0x20);
    page_fill(page, 2);
    put(&b, page, sizeof(page));
    put64(&b, 0x2000 | 0x02 | 0x20);
    put8(&b, 0);
    put64(&b, 0x3000 | 0x40 | 0x20);
    put8(&b, 1);
    put16(&b, 3);
    put(&b, "\x00\x01\x12", 3);
    put64(&b, 0x0000 | 0x08);
    putcstr(&b, "pc.bios");
    page_fill(page, 3);
    put(&b, page, sizeof(page));
    put64(&b, 0x10);
    put8(&b, 0x7e);
    put32(&b, 2);
    /* END with a page that continues pc.bios from the previous section */
    put8(&b, 0x03);
    put32(&b, 2);
    put64(&b, 0x1000 | 0x08 | 0x20);
    page_fill(page, 4);
    put(&b, page, sizeof(page));
    put64(&b, 0x10);
    put8(&b, 0x7e);
    put32(&b, 2);
    /* device state: opaque tail */
    put8(&b, 0x04);
    put32(&b, 0);
    putcstr(&b, "timer");
    put32(&b, 0);
    put32(&b, 2);
    put(&b, "\x00\x00\x00\x00\x00\x00\x00\x01\x7e\x00\x00\x00\x00", 13);
    put8(&b, 0x00); /* EOF */
    put8(&b, 0x06);
    put32(&b, 11);
    put(&b, "{\"devices\":0}", 11);
    return b;
}

struct split {
    struct buf ctrl;
    struct buf pages;
    struct rdmax_page_key keys[65536 * 4];
    size_t npages;
};

/* Sender side: feed in chunks of the given sizes (cycled). */
static int sender_split(const uint8_t *in, size_t len, const size_t *chunks, size_t nchunks,
                        struct split *out, const char **err)
{
    struct rdmax_stream *s = rdmax_stream_create(RDMAX_STREAM_FULL);
    size_t pos = 0, ci = 0, page_fill_left = 0;

    while (pos < len) {
        size_t clen = chunks[ci++ % nchunks];
        size_t end = pos + clen > len ? len : pos + clen;
        while (pos < end) {
            if (page_fill_left) {
                size_t k = end - pos < page_fill_left ? end - pos : page_fill_left;
                put(&out->pages, in + pos, k);
                pos += k;
                page_fill_left -= k;
                if (!page_fill_left) {
                    rdmax_stream_page_done(s);
                }
                continue;
            }
            bool page;
            struct rdmax_page_key key;
            ssize_t n = rdmax_stream_scan(s, in + pos, end - pos, &page, &key);
            if (n < 0) {
                *err = rdmax_stream_error(s);
                return (int)n;
            }
            put(&out->ctrl, in + pos, (size_t)n);
            pos += (size_t)n;
            if (page) {
                out->keys[out->npages++] = key;
                page_fill_left = RDMAX_PAGE_SIZE;
            }
        }
    }
    int r = page_fill_left ? -EBADMSG : rdmax_stream_finish(s);
    if (r < 0) {
        *err = rdmax_stream_error(s);
    }
    rdmax_stream_destroy(s);
    return r;
}

/* Receiver side: rebuild the stream from control bytes and pages. */
static void receiver_splice(const struct split *sp, const size_t *chunks, size_t nchunks,
                            struct buf *out)
{
    struct rdmax_stream *s = rdmax_stream_create(RDMAX_STREAM_ELIDED);
    size_t pos = 0, ci = 0, pi = 0;

    while (pos < sp->ctrl.len || pi < sp->npages) {
        size_t clen = chunks[ci++ % nchunks];
        size_t end = pos + clen > sp->ctrl.len ? sp->ctrl.len : pos + clen;
        do {
            bool page;
            struct rdmax_page_key key;
            ssize_t n = rdmax_stream_scan(s, sp->ctrl.p + pos, end - pos, &page, &key);
            cr_assert_geq(n, 0, "receiver parse: %s", rdmax_stream_error(s));
            put(out, sp->ctrl.p + pos, (size_t)n);
            pos += (size_t)n;
            if (page) {
                cr_assert_lt(pi, sp->npages, "receiver wants more pages than were sent");
                cr_assert_eq(key.block, sp->keys[pi].block);
                cr_assert_eq(key.offset, sp->keys[pi].offset);
                put(out, sp->pages.p + pi * RDMAX_PAGE_SIZE, RDMAX_PAGE_SIZE);
                pi++;
                rdmax_stream_page_done(s);
            }
        } while (pos < end);
        if (pos == sp->ctrl.len && pi == sp->npages) {
            break;
        }
    }
    cr_assert_eq(rdmax_stream_finish(s), 0, "receiver: %s", rdmax_stream_error(s));
    rdmax_stream_destroy(s);
}

static void free_split(struct split *sp)
{
    free(sp->ctrl.p);
    free(sp->pages.p);
    free(sp);
}

static void assert_roundtrip(const uint8_t *in, size_t len, const size_t *chunks, size_t n,
                             size_t *pages_out)
{
    struct split *sp = calloc(1, sizeof(*sp));
    struct buf out = {0};
    const char *err = NULL;

    cr_assert_not_null(sp);
    cr_assert_eq(sender_split(in, len, chunks, n, sp, &err), 0, "sender parse: %s", err);
    cr_assert_eq(sp->ctrl.len + sp->pages.len, len);
    receiver_splice(sp, chunks, n, &out);
    cr_assert_eq(out.len, len);
    cr_assert(memcmp(out.p, in, len) == 0, "spliced stream differs from the original");
    if (pages_out) {
        *pages_out = sp->npages;
    }
    free(out.p);
    free_split(sp);
}

Test(stream, synthetic_stream_roundtrips_whole)
{
    struct buf b = synthetic_stream();
    size_t whole[] = {b.len}, pages = 0;

    assert_roundtrip(b.p, b.len, whole, 1, &pages);
    cr_assert_eq(pages, 4, "4 PAGE records, got %zu", pages);
    free(b.p);
}

Test(stream, every_record_split_at_every_offset)
{
    struct buf b = synthetic_stream();

    for (size_t cut = 1; cut < b.len; cut++) {
        size_t chunks[] = {cut, b.len};
        assert_roundtrip(b.p, b.len, chunks, 2, NULL);
    }
    free(b.p);
}

Test(stream, byte_by_byte_reads)
{
    struct buf b = synthetic_stream();
    size_t one[] = {1};

    assert_roundtrip(b.p, b.len, one, 1, NULL);
    free(b.p);
}

Test(stream, pages_carry_block_and_offset_across_sections)
{
    struct buf b = synthetic_stream();
    struct split *sp = calloc(1, sizeof(*sp));
    size_t whole[] = {b.len};
    const char *err;
    struct rdmax_stream *s;

    cr_assert_eq(sender_split(b.p, b.len, whole, 1, sp, &err), 0);
    cr_assert_eq(sp->npages, 4);
    /* blocks are interned in stream order: pc.ram 0, pc.bios 1 */
    cr_assert_eq(sp->keys[0].block, 0);
    cr_assert_eq(sp->keys[0].offset, 0);
    cr_assert_eq(sp->keys[1].offset, 0x1000);
    cr_assert_eq(sp->keys[2].block, 1);
    cr_assert_eq(sp->keys[3].block, 1, "CONTINUE must survive the section boundary");
    cr_assert_eq(sp->keys[3].offset, 0x1000);
    s = rdmax_stream_create(RDMAX_STREAM_ELIDED);
    rdmax_stream_destroy(s);
    free_split(sp);
    free(b.p);
}

Test(stream, unknown_iterable_section_goes_opaque)
{
    struct buf b = {0};
    uint8_t page[RDMAX_PAGE_SIZE];
    struct rdmax_stream *s = rdmax_stream_create(RDMAX_STREAM_FULL);
    bool pg;
    struct rdmax_page_key key;

    put_header_and_start(&b, 7, "dirty-bitmap", 1);
    /* Bytes that would look like a PAGE record must stay opaque. */
    put64(&b, 0x08);
    putcstr(&b, "pc.ram");
    page_fill(page, 9);
    put(&b, page, sizeof(page));
    /* The section's footer and QEMU's EOF end it (postcopy-style, no VMDESC). */
    put8(&b, 0x7e);
    put32(&b, 7);
    put8(&b, 0x00);
    cr_assert_eq(rdmax_stream_scan(s, b.p, b.len, &pg, &key), (ssize_t)b.len);
    cr_assert(!pg);
    cr_assert(rdmax_stream_stats(s)->opaque);
    cr_assert_eq(rdmax_stream_finish(s), 0, "%s", rdmax_stream_error(s));
    rdmax_stream_destroy(s);
    free(b.p);
}

/* FULL-mode parse of in[0..len) (page payloads skipped); the finish result. */
static int parse_prefix(const uint8_t *in, size_t len, const size_t *chunks, size_t nchunks,
                        char *err, size_t err_len)
{
    struct rdmax_stream *s = rdmax_stream_create(RDMAX_STREAM_FULL);
    size_t pos = 0, ci = 0, skip = 0;
    int r = 0;

    while (pos < len && r == 0) {
        size_t end = pos + chunks[ci++ % nchunks];
        end = end > len ? len : end;
        while (pos < end) {
            if (skip) {
                size_t k = end - pos < skip ? end - pos : skip;
                pos += k;
                skip -= k;
                if (!skip) {
                    rdmax_stream_page_done(s);
                }
                continue;
            }
            bool page;
            struct rdmax_page_key key;
            ssize_t n = rdmax_stream_scan(s, in + pos, end - pos, &page, &key);
            if (n < 0) {
                r = (int)n;
                break;
            }
            pos += (size_t)n;
            skip = page ? RDMAX_PAGE_SIZE : 0;
        }
    }
    if (r == 0) {
        r = skip ? -EBADMSG : rdmax_stream_finish(s);
    }
    snprintf(err, err_len, "%s", rdmax_stream_error(s) ? rdmax_stream_error(s) : "");
    rdmax_stream_destroy(s);
    return r;
}

/* Offset of QEMU's EOF marker before the VMDESC that ends a precopy stream. */
static size_t find_eof_before_vmdesc(const uint8_t *p, size_t len)
{
    for (size_t i = len - 6; i > 6; i--) {
        if (p[i] == 0x06 && p[i - 1] == 0x00 && p[i + 5] == '{' &&
            i + 5 +
                    ((size_t)p[i + 1] << 24 | (size_t)p[i + 2] << 16 | (size_t)p[i + 3] << 8 |
                     p[i + 4]) ==
                len) {
            return i - 1;
        }
    }
    return 0;
}

Test(stream, stream_cut_in_the_device_tail_is_truncated)
{
    struct buf b = synthetic_stream();
    size_t eof = find_eof_before_vmdesc(b.p, b.len);
    size_t tail = eof - 8 - 5; /* the timer section's payload starts the opaque tail */
    size_t whole[] = {SIZE_MAX / 4}, one[] = {1};
    char err[200];

    cr_assert_gt(eof, 0);
    /* Every cut from the device state's first byte to the last VMDESC byte. */
    for (size_t cut = tail; cut < b.len; cut++) {
        int r = parse_prefix(b.p, cut, whole, 1, err, sizeof(err));
        if (cut == eof + 1) {
            /* footer + EOF, VMDESC not begun: how a suppress-vmdesc stream ends */
            cr_assert_eq(r, 0, "cut after EOF: %s", err);
            continue;
        }
        cr_assert_eq(r, -EBADMSG, "cut at %zu of %zu counted as complete", cut, b.len);
        cr_assert_not_null(strstr(err, "inside the device state"), "%s", err);
        cr_assert_eq(parse_prefix(b.p, cut, one, 1, err, sizeof(err)), -EBADMSG);
    }
    cr_assert_eq(parse_prefix(b.p, b.len, one, 1, err, sizeof(err)), 0, "%s", err);
    free(b.p);
}

Test(stream, truncated_stream_is_a_clear_error)
{
    struct buf b = synthetic_stream();
    /* Cut inside the PART section's second page. */
    size_t cut = 200 + RDMAX_PAGE_SIZE + 100;
    struct rdmax_stream *s = rdmax_stream_create(RDMAX_STREAM_ELIDED);
    bool pg;
    struct rdmax_page_key key;
    size_t pos = 0;

    while (pos < cut) {
        ssize_t n = rdmax_stream_scan(s, b.p + pos, cut - pos, &pg, &key);
        cr_assert_geq(n, 0);
        pos += (size_t)n;
        if (pg) {
            rdmax_stream_page_done(s);
            pos += RDMAX_PAGE_SIZE;
        }
    }
    cr_assert_eq(rdmax_stream_finish(s), -EBADMSG);
    cr_assert_not_null(strstr(rdmax_stream_error(s), "truncated"), "%s", rdmax_stream_error(s));
    rdmax_stream_destroy(s);
    free(b.p);
}

Test(stream, garbage_is_rejected_with_a_reason)
{
    struct rdmax_stream *s = rdmax_stream_create(RDMAX_STREAM_FULL);
    bool pg;
    struct rdmax_page_key key;

    cr_assert_lt(rdmax_stream_scan(s, (const uint8_t *)"GET / HTTP/1.1\r\n", 16, &pg, &key), 0);
    cr_assert_not_null(strstr(rdmax_stream_error(s), "not a QEMU migration stream"));
    rdmax_stream_destroy(s);
}

Test(stream, continue_without_a_block_is_rejected)
{
    struct buf b = {0};
    struct rdmax_stream *s = rdmax_stream_create(RDMAX_STREAM_FULL);
    bool pg;
    struct rdmax_page_key key;

    put_header_and_start(&b, 2, "ram", 4);
    put64(&b, 0x1000 | 0x08 | 0x20);
    cr_assert_lt(rdmax_stream_scan(s, b.p, b.len, &pg, &key), 0);
    rdmax_stream_destroy(s);
    free(b.p);
}

Test(stream, lanes_spread_and_agree)
{
    unsigned count[4] = {0};

    for (uint64_t off = 0; off < 4096 * 4096; off += 4096) {
        struct rdmax_page_key k = {.block = 0, .offset = off};
        unsigned lane = rdmax_stream_lane_of(k, 4);
        cr_assert_lt(lane, 4);
        cr_assert_eq(lane, rdmax_stream_lane_of(k, 4));
        count[lane]++;
    }
    for (int i = 0; i < 4; i++) {
        cr_assert_gt(count[i], 900, "lane %d got %u of 4096 pages", i, count[i]);
    }
}

/* ---- real streams ---- */

/*
 * A real stream cut inside its device tail (migrate_cancel, a crashed
 * source) must not count as complete: before the EOF marker, inside the
 * VMDESC, one byte short. A postcopy stream (no VMDESC; its device state
 * is in the PACKAGED blob) must not end anywhere in its last section.
 */
static void assert_tail_cuts_fail(const char *name, const uint8_t *data, size_t len)
{
    static const size_t odd[] = {32768, 1, 4095, 7, 65536, 4097, 13, 100000};
    size_t eof = find_eof_before_vmdesc(data, len);
    char err[200];

    if (!eof) {
        cr_assert(len > 6 && data[len - 1] == 0x00 && data[len - 6] == 0x7e,
                  "%s: ends neither with a VMDESC nor with footer + EOF", name);
        for (size_t cut = len - 6; cut < len; cut++) {
            cr_assert_eq(parse_prefix(data, cut, odd, 8, err, sizeof(err)), -EBADMSG,
                         "%s cut at %zu of %zu counted as complete", name, cut, len);
        }
        cr_assert_eq(parse_prefix(data, len, odd, 8, err, sizeof(err)), 0, "%s: %s", name, err);
        return;
    }
    cr_assert_gt(eof, 10000, "%s: EOF + VMDESC too early", name);
    const size_t cuts[] = {eof - 5000, eof - 6, eof - 1,    eof,    eof + 2,
                           eof + 4,    eof + 6, eof + 1000, len - 1};
    for (size_t i = 0; i < sizeof(cuts) / sizeof(cuts[0]); i++) {
        int r = parse_prefix(data, cuts[i], odd, sizeof(odd) / sizeof(odd[0]), err, sizeof(err));
        cr_assert_eq(r, -EBADMSG, "%s cut at %zu of %zu counted as complete", name, cuts[i], len);
        cr_assert_not_null(strstr(err, "inside the device state"), "%s: %s", name, err);
    }
    cr_assert_eq(parse_prefix(data, len, odd, sizeof(odd) / sizeof(odd[0]), err, sizeof(err)), 0,
                 "%s: %s", name, err);
}

/* Round-trips every stream file in dir; returns how many it checked. */
static int roundtrip_dir(const char *dir, const char *suffix)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int checked = 0;
    static const size_t odd[] = {32768, 1, 4095, 7, 65536, 4097, 13, 100000};
    static const size_t whole[] = {SIZE_MAX / 4};

    if (!d) {
        return -1;
    }
    while ((e = readdir(d))) {
        char path[4096];
        size_t len, pages = 0;
        uint8_t *data;
        size_t sl = strlen(e->d_name);
        if (sl < strlen(suffix) || strcmp(e->d_name + sl - strlen(suffix), suffix) != 0) {
            continue;
        }
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        data = load_stream(path, &len);
        cr_assert_not_null(data, "%s", path);
        assert_roundtrip(data, len, whole, 1, &pages);
        cr_assert_gt(pages, 0, "%s: no page found", path);
        assert_roundtrip(data, len, odd, sizeof(odd) / sizeof(odd[0]), NULL);
        assert_tail_cuts_fail(e->d_name, data, len);
        cr_log_info("%s: %zu bytes, %zu pages, identical; cuts in its tail fail", e->d_name, len,
                    pages);
        free(data);
        checked++;
    }
    closedir(d);
    return checked;
}

/* The two small QEMU 10.0 captures live in the repository (tests/data). */
Test(stream, qemu_10_0_repo_captures_roundtrip, .timeout = 300)
{
    const char *dir = getenv("RDMAX_REPO_TESTDATA");
    char path[4096];

    cr_assert_not_null(dir, "RDMAX_REPO_TESTDATA is not set (meson sets it)");
    snprintf(path, sizeof(path), "%s/qemu-10.0", dir);
    cr_assert_eq(roundtrip_dir(path, ".bin.zst"), 2, "expected the 2 QEMU 10.0 captures in %s",
                 path);
}

/* All four, the 11 MiB Linux ones included, from ../shared/testdata if present. */
Test(stream, qemu_10_0_captures_roundtrip, .timeout = 300)
{
    const char *root = getenv("RDMAX_TESTDATA");
    char dir[4096];
    int n;

    cr_assert_not_null(root, "RDMAX_TESTDATA is not set (meson sets it)");
    snprintf(dir, sizeof(dir), "%s/qemu-10.0", root);
    n = roundtrip_dir(dir, ".bin.zst");
    if (n < 0) {
        cr_skip_test("no %s: the 4 QEMU 10.0 captures are not in this checkout "
                     "(the 2 small ones in tests/data still ran); see docs/testing.md",
                     dir);
    }
    cr_assert_eq(n, 4, "expected the 4 QEMU 10.0 captures in %s", dir);
}

Test(stream, qemu_7_2_captures_roundtrip, .timeout = 300)
{
    const char *dir = getenv("RDMAX_CAPTURES");
    int n;

    if (!dir) {
        cr_skip_test("RDMAX_CAPTURES not set: run through scripts/test, which captures "
                     "QEMU 7.2 streams first");
    }
    n = roundtrip_dir(dir, ".bin");
    cr_assert_geq(n, 4, "expected at least 4 QEMU 7.2 captures in %s, found %d", dir, n);
}
