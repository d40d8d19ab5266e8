/*
 * rdmax-hostile: a peer that speaks just enough of the wire protocol to get
 * past the handshake and then does its worst, to measure that the other
 * side stays bounded in memory and ends with a reason (docs/security.md).
 *
 *   rdmax-hostile send HOST:PORT MODE [LANES [CACHE_BYTES_PER_LANE]]
 *       plays a sender against `rdma-x recv` (no PSK: an attacker who
 *       holds the key is a sender like any other). MODE:
 *         stall  handshake on every lane, then silence
 *         flood  4 MiB frames of garbage (valid CRC) on every connection
 *                at once, PAGES on lanes, zstd CTRL on control
 *         flood-max  the same with lane frames of the largest size a lane
 *                may carry (the batch encoder's bound), so they are read
 *         bomb   one CTRL frame: a zstd stream of a QEMU stream header
 *                and 1 GiB of zeros (a decompression bomb)
 *         disk-bomb  one disk connection (role DISK), then one DISK_DATA
 *                frame: a zstd frame of 1 GiB of zeros
 *         disk-zero  one disk connection, then DISK_ZERO claiming 4 GiB
 *         disk-flood one disk connection, then 4 MiB DISK_DATA frames
 *   rdmax-hostile recv PORT MODE
 *       plays a receiver against `rdma-x send`. MODE:
 *         stall  acknowledge every connection, then read nothing
 *         flood  4 MiB RP frames (return-path bytes) as fast as it can,
 *                reading nothing
 * Exits 0 when it did what it was asked (the peer's reaction is the
 * caller's to judge), 1 on a setup error.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>
#include <zstd.h>

#include "lane-codec.h"
#include "transport.h"
#include "wire.h"

static const char *mode;
static struct rdmax_wire conns[RDMAX_LANES_MAX + 1];
static unsigned nconns;
static uint8_t *junk;

static int hello(struct rdmax_wire *w, uint16_t type, uint16_t role, uint16_t lane, uint16_t lanes,
                 uint64_t session, uint64_t cache)
{
    struct rdmax_hello h = {.magic = RDMAX_WIRE_MAGIC,
                            .version = RDMAX_WIRE_VERSION,
                            .role = role,
                            .lane = lane,
                            .lanes = lanes,
                            .page_size = 4096,
                            .session = session,
                            .cache_bytes = cache};
    uint8_t b[RDMAX_HELLO_LEN];

    if (getrandom(h.nonce, sizeof(h.nonce), 0) < 0) {
        return -errno;
    }
    rdmax_hello_encode(b, &h);
    return rdmax_wire_send(w, (uint8_t)type, 0, role == RDMAX_ROLE_LANE ? lane : 0, b, sizeof(b));
}

static int expect(struct rdmax_wire *w, uint8_t type)
{
    static uint8_t buf[1024];
    struct rdmax_frame_hdr h;
    int r = rdmax_wire_recv(w, &h, buf, sizeof(buf) - 1, 10000);

    if (r < 0) {
        return r;
    }
    if (h.type != type) {
        buf[h.len] = 0;
        fprintf(stderr, "rdmax-hostile: got %s: %s\n", rdmax_frame_type_name(h.type),
                h.type == RDMAX_F_ERROR ? (char *)buf : "");
        return -EPROTO;
    }
    return 0;
}

static void *flood_main(void *arg)
{
    struct rdmax_wire *w = arg;
    unsigned idx = (unsigned)(w - conns);
    uint8_t type = idx == 0 ? RDMAX_F_CTRL : RDMAX_F_PAGES;
    uint8_t flags = idx == 0 ? RDMAX_FF_ZSTD : 0;
    size_t len = RDMAX_FRAME_MAX;

    if (!strcmp(mode, "flood-max") && idx) {
        len = rdmax_lane_encoder_bound();
    }

    if (!strcmp(mode, "flood-rp")) {
        type = RDMAX_F_RP;
        flags = 0;
        idx = 0;
    }
    for (int i = 0; i < 64; i++) {
        if (rdmax_wire_send(w, type, flags, (uint16_t)idx, junk, len) < 0) {
            break; /* the peer gave up: expected */
        }
    }
    return NULL;
}

static void flood(void)
{
    pthread_t t[RDMAX_LANES_MAX + 1];

    for (unsigned i = 0; i < nconns; i++) {
        pthread_create(&t[i], NULL, flood_main, &conns[i]);
    }
    for (unsigned i = 0; i < nconns; i++) {
        pthread_join(t[i], NULL);
    }
}

static int bomb(void)
{
    size_t total = 1ull << 30, chunk = 1 << 20, cap = ZSTD_CStreamOutSize();
    ZSTD_CCtx *z = ZSTD_createCCtx();
    uint8_t *in = calloc(1, chunk), *out = malloc(cap);
    static const uint8_t qemu_hdr[8] = {'Q', 'E', 'V', 'M', 0, 0, 0, 3};

    memcpy(in, qemu_hdr, sizeof(qemu_hdr));
    for (size_t done = 0; done < total; done += chunk) {
        ZSTD_inBuffer ib = {in, chunk, 0};
        ZSTD_EndDirective e = done + chunk >= total ? ZSTD_e_end : ZSTD_e_continue;
        size_t rem;
        do {
            ZSTD_outBuffer ob = {out, cap, 0};
            rem = ZSTD_compressStream2(z, &ob, &ib, e);
            if (ob.pos &&
                rdmax_wire_send(&conns[0], RDMAX_F_CTRL, RDMAX_FF_ZSTD, 0, out, ob.pos) < 0) {
                return 0; /* refused part way: expected */
            }
        } while (ib.pos < ib.size || (e == ZSTD_e_end && rem));
        if (done == 0) {
            memset(in, 0, sizeof(qemu_hdr));
        }
    }
    return 0;
}

/* A disk connection's worst: decompression bomb, absurd zero run, oversized frames. */
static int disk_attack(void)
{
    if (!strcmp(mode, "disk-zero")) {
        static const uint8_t n[4] = {0xff, 0xff, 0xff, 0xff};
        return rdmax_wire_send(&conns[0], RDMAX_F_DISK_ZERO, 0, 0, n, sizeof(n));
    }
    if (!strcmp(mode, "disk-flood")) {
        for (int i = 0; i < 64; i++) {
            if (rdmax_wire_send(&conns[0], RDMAX_F_DISK_DATA, 0, 0, junk, RDMAX_FRAME_MAX) < 0) {
                break; /* the peer gave up: expected */
            }
        }
        return 0;
    }
    /* disk-bomb: one zstd frame, streamed into one wire frame's worth. */
    size_t chunk = 1 << 20, cap = RDMAX_FRAME_MAX, pos = 0;
    ZSTD_CCtx *z = ZSTD_createCCtx();
    uint8_t *in = calloc(1, chunk), *out = malloc(cap);
    for (size_t done = 0; done < (1ull << 30); done += chunk) {
        ZSTD_inBuffer ib = {in, chunk, 0};
        ZSTD_EndDirective e = done + chunk >= (1ull << 30) ? ZSTD_e_end : ZSTD_e_continue;
        size_t rem;
        do {
            ZSTD_outBuffer ob = {out, cap, pos};
            rem = ZSTD_compressStream2(z, &ob, &ib, e);
            pos = ob.pos;
        } while (ib.pos < ib.size || (e == ZSTD_e_end && rem));
    }
    return rdmax_wire_send(&conns[0], RDMAX_F_DISK_DATA, RDMAX_FF_ZSTD, 0, out, pos);
}

int main(int argc, char **argv)
{
    const struct rdmax_transport_ops *tp = rdmax_transport_find("tcp");
    struct rdmax_transport_opts o = {.connect_timeout_ms = 5000};
    char host[256], port[32], err[200];

    if (argc < 4) {
        fprintf(stderr,
                "usage: %s send HOST:PORT stall|flood|bomb [LANES [CACHE]]\n"
                "       %s recv PORT stall|flood\n",
                argv[0], argv[0]);
        return 1;
    }
    mode = argv[3];
    junk = malloc(RDMAX_FRAME_MAX);
    for (size_t i = 0; i < RDMAX_FRAME_MAX; i++) {
        junk[i] = (uint8_t)(i * 2654435761u >> 13);
    }
    if (!strcmp(argv[1], "send")) {
        unsigned lanes = argc > 4 ? (unsigned)atoi(argv[4]) : RDMAX_LANES_MAX;
        uint64_t cache = argc > 5 ? strtoull(argv[5], NULL, 0) : 0;
        uint64_t session = 0x686f7374696c65ull;
        if (rdmax_addr_split(argv[2], host, sizeof(host), port, sizeof(port), err, sizeof(err)) <
            0) {
            fprintf(stderr, "%s\n", err);
            return 1;
        }
        if (!strncmp(mode, "disk-", 5)) {
            struct rdmax_conn *c;
            if (tp->connect(host, port, &o, &c) < 0) {
                fprintf(stderr, "rdmax-hostile: connect failed\n");
                return 1;
            }
            rdmax_wire_init(&conns[0], c);
            nconns = 1;
            if (hello(&conns[0], RDMAX_F_HELLO, RDMAX_ROLE_DISK, 0, 1, session, 0) < 0 ||
                expect(&conns[0], RDMAX_F_HELLO_ACK) < 0) {
                fprintf(stderr, "rdmax-hostile: disk handshake refused\n");
                return 1;
            }
            disk_attack();
            sleep(2);
            return 0;
        }
        for (unsigned i = 0; i <= lanes; i++) {
            struct rdmax_conn *c;
            if (tp->connect(host, port, &o, &c) < 0) {
                fprintf(stderr, "rdmax-hostile: connect %u failed\n", i);
                return 1;
            }
            rdmax_wire_init(&conns[i], c);
            if (hello(&conns[i], RDMAX_F_HELLO, i ? RDMAX_ROLE_LANE : RDMAX_ROLE_CONTROL,
                      (uint16_t)(i ? i - 1 : 0), (uint16_t)lanes, session, cache) < 0 ||
                expect(&conns[i], RDMAX_F_HELLO_ACK) < 0) {
                fprintf(stderr, "rdmax-hostile: handshake %u refused\n", i);
                return 1;
            }
            nconns++;
        }
        fprintf(stderr, "rdmax-hostile: %u connections in\n", nconns);
        if (!strncmp(mode, "flood", 5)) {
            flood();
        } else if (!strcmp(mode, "bomb")) {
            bomb();
        }
        sleep(!strcmp(mode, "stall") ? 30 : 2);
        return 0;
    }
    /* recv: accept a real sender's connections and acknowledge them. */
    {
        struct rdmax_listener *l;
        unsigned want = 1;
        if (tp->listen("127.0.0.1", argv[2], &o, &l) < 0) {
            fprintf(stderr, "rdmax-hostile: cannot listen\n");
            return 1;
        }
        while (nconns < want) {
            struct rdmax_conn *c;
            struct rdmax_frame_hdr h;
            struct rdmax_hello peer;
            uint8_t buf[512];
            if (tp->accept(l, 20000, &c) < 0) {
                return 1;
            }
            rdmax_wire_init(&conns[nconns], c);
            if (rdmax_wire_recv(&conns[nconns], &h, buf, sizeof(buf), 5000) < 0 ||
                rdmax_hello_decode(buf, h.len, &peer, err, sizeof(err)) < 0) {
                return 1;
            }
            want = peer.lanes + 1u;
            hello(&conns[nconns], RDMAX_F_HELLO_ACK, peer.role, peer.lane, peer.lanes, peer.session,
                  peer.cache_bytes);
            nconns++;
        }
        fprintf(stderr, "rdmax-hostile: %u connections in\n", nconns);
        if (!strcmp(mode, "flood")) {
            mode = "flood-rp";
            nconns = 1; /* control only */
            flood();
        }
        sleep(30);
    }
    return 0;
}
