/*
 * Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/)
 * from the real encoders, so the fuzzers start from valid inputs and mutate
 * their way into the corners. Run by hand when a format changes:
 *
 *   build/tests/fuzz/fuzz-make-seeds tests/fuzz/corpus STREAM...
 *
 * STREAM: decompressed QEMU migration streams (e.g. from
 * ../shared/testdata/qemu-10.0); their heads seed the parser, FULL and
 * ELIDED (page payloads cut out, as the receiver sees them).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "crypt.h"
#include "delta.h"
#include "lane-codec.h"
#include "stream.h"
#include "wire.h"

static const char *top;

static void put(const char *target, const char *name, const uint8_t *a, size_t alen,
                const uint8_t *b, size_t blen)
{
    char path[4096];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", top, target);
    mkdir(path, 0755);
    snprintf(path, sizeof(path), "%s/%s/%s", top, target, name);
    f = fopen(path, "wb");
    if (!f || fwrite(a, 1, alen, f) != alen || (blen && fwrite(b, 1, blen, f) != blen)) {
        perror(path);
        exit(1);
    }
    fclose(f);
}

static uint32_t rng = 12345;

static uint8_t rnd(void)
{
    rng = rng * 1103515245u + 12345u;
    return (uint8_t)(rng >> 16);
}

/* ---- wire: a fake connection that records what is sent */

struct rec_conn {
    struct rdmax_conn base;
    uint8_t buf[1 << 20];
    size_t len;
};

static int rec_send(struct rdmax_conn *c, const struct iovec *iov, int iovcnt)
{
    struct rec_conn *r = (struct rec_conn *)c;

    for (int i = 0; i < iovcnt; i++) {
        memcpy(r->buf + r->len, iov[i].iov_base, iov[i].iov_len);
        r->len += iov[i].iov_len;
    }
    return 0;
}

static void rec_close(struct rdmax_conn *c)
{
}

static const struct rdmax_transport_ops rec_ops = {
    .name = "rec",
    .send = rec_send,
    .close = rec_close,
};

static const uint8_t fuzz_key[RDMAX_KEY_LEN] = "rdma-x fuzz key, not a secret!!";

static void wire_seeds(void)
{
    static struct rec_conn rc = {.base = {.ops = &rec_ops}};
    struct rdmax_wire w;
    struct rdmax_hello h = {.magic = RDMAX_WIRE_MAGIC,
                            .version = RDMAX_WIRE_VERSION,
                            .role = RDMAX_ROLE_CONTROL,
                            .lanes = 4,
                            .page_size = 4096,
                            .session = 0x1122334455667788ull,
                            .features = RDMAX_FEAT_PSK,
                            .cache_bytes = 64 << 20};
    uint8_t hb[RDMAX_HELLO_LEN], big[3000];
    uint8_t opt;

    for (int enc = 0; enc < 2; enc++) {
        rc.len = 0;
        rdmax_wire_init(&w, &rc.base);
        if (enc) {
            struct rdmax_crypt *tx;
            rdmax_crypt_create(fuzz_key, true, &tx);
            rdmax_wire_crypt_start(&w, tx, NULL);
        }
        memset(h.nonce, 0xab, sizeof(h.nonce));
        rdmax_hello_encode(hb, &h);
        rdmax_wire_send(&w, RDMAX_F_HELLO, 0, 0, hb, sizeof(hb));
        h.role = RDMAX_ROLE_LANE;
        h.lane = 3;
        rdmax_hello_encode(hb, &h);
        rdmax_wire_send(&w, RDMAX_F_HELLO_ACK, 0, 4, hb, sizeof(hb));
        rdmax_wire_send(&w, RDMAX_F_AUTH, 0, 0, hb + RDMAX_HELLO_NONCE, RDMAX_MAC_LEN);
        rdmax_wire_send(&w, RDMAX_F_AUTH_OK, 0, 0, NULL, 0);
        rdmax_wire_send(&w, RDMAX_F_KEEPALIVE, 0, 0, NULL, 0);
        rdmax_wire_send(&w, RDMAX_F_CTRL, RDMAX_FF_ZSTD, 0, "\x28\xb5\x2f\xfd", 4);
        rdmax_wire_send(&w, RDMAX_F_ERROR, 0, 0, "boom", 4);
        for (size_t i = 0; i < sizeof(big); i++) {
            big[i] = rnd();
        }
        rdmax_wire_send(&w, RDMAX_F_PAGES, 0, 2, big, sizeof(big));
        rdmax_wire_send(&w, RDMAX_F_EOF, 0, 0, big, 16);
        rdmax_wire_send(&w, RDMAX_F_LANE_EOF, 0, 1, big, 8);
        opt = (uint8_t)(enc | 4); /* cap 65536 */
        put("fuzz-wire-header", enc ? "frames-encrypted" : "frames-plain", &opt, 1, rc.buf, rc.len);
        opt = (uint8_t)enc; /* cap 64: the long frames are refused */
        put("fuzz-wire-header", enc ? "frames-encrypted-cap64" : "frames-plain-cap64", &opt, 1,
            rc.buf, rc.len);
        w.conn = NULL;
        rdmax_wire_destroy(&w);
    }
    /* A bare hello, and one of wire protocol v1 (48 bytes). */
    opt = 2;
    h.role = RDMAX_ROLE_CONTROL;
    rdmax_hello_encode(hb, &h);
    put("fuzz-wire-header", "hello-bare", &opt, 1, hb, sizeof(hb));
    hb[5] = 1;
    put("fuzz-wire-header", "hello-v1", &opt, 1, hb, 48);
    put("fuzz-wire-header", "garbage", &opt, 1, (const uint8_t *)"GET / HTTP/1.1\r\n\r\n", 18);
}

/* ---- lane batches from the real encoder */

static void lane_seeds(void)
{
    static const uint64_t caches[] = {0, 16 * 4200, 256 * 4200};
    static uint8_t out[1 << 20], file[4 << 20];
    uint8_t page[RDMAX_PAGE_SIZE];

    for (int ci = 0; ci < 3; ci++) {
        struct rdmax_codec_config cfg = {.cache_bytes = caches[ci], .zstd_level = ci == 2 ? -1 : 1};
        struct rdmax_lane_encoder *e;
        size_t flen = 1;
        char name[64];

        file[0] = (uint8_t)ci;
        rdmax_lane_encoder_create(&cfg, &e);
        for (int round = 0; round < 3; round++) {
            for (unsigned i = 0; i < 12; i++) {
                struct rdmax_page_key key = {.block = i % 3, .offset = (uint64_t)i * 4096};
                switch (i % 4) {
                case 0:
                    memset(page, 0, sizeof(page)); /* zero */
                    break;
                case 1: /* compressible, a few bytes change per round */
                    memset(page, 'a' + (int)i, sizeof(page));
                    page[100 * round] = (uint8_t)round;
                    break;
                case 2: /* random once, then sparse changes: deltas */
                    for (size_t k = 0; k < sizeof(page); k++) {
                        page[k] = (uint8_t)(k * 7 + i);
                    }
                    page[8 * round] ^= 0x5a;
                    break;
                default: /* incompressible */
                    for (size_t k = 0; k < sizeof(page); k++) {
                        page[k] = rnd();
                    }
                }
                rdmax_lane_encoder_add(e, key, page);
            }
            ssize_t n = rdmax_lane_encoder_flush(e, out, sizeof(out));
            if (n < 0) {
                fprintf(stderr, "encoder: %zd\n", n);
                exit(1);
            }
            file[flen] = (uint8_t)(n >> 16);
            file[flen + 1] = (uint8_t)(n >> 8);
            file[flen + 2] = (uint8_t)n;
            memcpy(file + flen + 3, out, (size_t)n);
            flen += 3 + (size_t)n;
        }
        snprintf(name, sizeof(name), "batches-cache%d", ci);
        put("fuzz-lane-decode", name, file, flen, NULL, 0);
        rdmax_lane_encoder_destroy(e);
    }
}

/* ---- deltas from the real encoder */

static void delta_seeds(void)
{
    static const size_t lens[] = {64, 4096, 8192};
    uint8_t old[8192], cur[8192], enc[RDMAX_DELTA_BOUND(8192)], sel;

    for (int li = 0; li < 3; li++) {
        size_t len = lens[li];
        for (int kind = 0; kind < 3; kind++) {
            char name[64];
            ssize_t n;
            for (size_t k = 0; k < len; k++) {
                old[k] = rnd();
                cur[k] = old[k];
            }
            for (size_t k = 0; k < len; k++) {
                if ((kind == 0 && k % 512 == 7) || (kind == 1 && k % 3 == 0) ||
                    (kind == 2 && k >= len - 9)) {
                    cur[k] ^= (uint8_t)(1 + rnd() % 255);
                }
            }
            n = rdmax_delta_encode(enc, sizeof(enc), old, cur, len);
            if (n <= 0) {
                fprintf(stderr, "delta encode: %zd\n", n);
                exit(1);
            }
            sel = (uint8_t)(len / 64 - 1);
            snprintf(name, sizeof(name), "delta-%zu-%d", len, kind);
            memcpy(cur, old, len); /* file: sel | old | encoding */
            {
                static uint8_t file[1 + 8192 + sizeof(enc)];
                file[0] = sel;
                memcpy(file + 1, old, len);
                memcpy(file + 1 + len, enc, (size_t)n);
                put("fuzz-delta-decode", name, file, 1 + len + (size_t)n, NULL, 0);
            }
        }
    }
}

/* ---- stream heads, FULL and ELIDED */

static void stream_seeds(const char *path, int idx)
{
    static uint8_t in[1 << 20], el[1 << 20];
    FILE *f = fopen(path, "rb");
    size_t n, pos = 0, elen = 2;
    struct rdmax_stream *s = rdmax_stream_create(RDMAX_STREAM_FULL);
    char name[64];
    uint8_t head[2] = {0, (uint8_t)idx};

    if (!f) {
        perror(path);
        exit(1);
    }
    n = fread(in, 1, sizeof(in), f);
    fclose(f);
    snprintf(name, sizeof(name), "full-%d", idx);
    put("fuzz-stream-parse", name, head, 2, in, n < 200000 ? n : 200000);
    /* Elided: what the receiver's parser sees. */
    el[0] = 1;
    el[1] = (uint8_t)idx;
    while (pos < n) {
        bool page = false;
        struct rdmax_page_key key;
        ssize_t c = rdmax_stream_scan(s, in + pos, n - pos, &page, &key);
        if (c < 0) {
            break;
        }
        memcpy(el + elen, in + pos, (size_t)c);
        elen += (size_t)c;
        pos += (size_t)c;
        if (page) {
            if (n - pos < RDMAX_PAGE_SIZE) {
                break;
            }
            pos += RDMAX_PAGE_SIZE;
            rdmax_stream_page_done(s);
        }
        if (elen > 150000) {
            break;
        }
    }
    rdmax_stream_destroy(s);
    snprintf(name, sizeof(name), "elided-%d", idx);
    put("fuzz-stream-parse", name, el, elen < 150000 ? elen : 150000, NULL, 0);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR [STREAM...]\n", argv[0]);
        return 2;
    }
    top = argv[1];
    mkdir(top, 0755);
    wire_seeds();
    lane_seeds();
    delta_seeds();
    for (int i = 2; i < argc; i++) {
        stream_seeds(argv[i], i - 2);
    }
    return 0;
}
