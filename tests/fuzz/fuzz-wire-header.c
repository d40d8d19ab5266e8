/*
 * fuzz-wire-header: what a peer sends before and around the handshake.
 *
 * input := u8 opts | peer bytes
 *   opts bit 0: the connection is encrypted (AES-256-GCM with a fixed test
 *               key, so the corpus can hold valid encrypted frames)
 *   opts bits 1-2: receive buffer cap: 64, 512, 65536 or RDMAX_FRAME_MAX
 *   opts bit 3: receive by lending (rdmax_wire_recv_lend over a transport
 *               with rx_next/rx_release that lends the peer bytes in place)
 *
 * The peer bytes go through rdmax_wire_recv (header decode, length caps,
 * CRC, decryption) frame by frame, as a receiver reads them; HELLO payloads
 * go through rdmax_hello_decode. Also the first 12 and the first 112 bytes
 * are decoded directly. Invariants: a frame is never longer than the cap;
 * a hello that decodes re-encodes to the same bytes.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "crypt.h"
#include "wire.h"

struct fake_conn {
    struct rdmax_conn base; /* first */
    const uint8_t *p;
    size_t left;
};

static int fake_recv(struct rdmax_conn *c, void *buf, size_t len, int timeout_ms)
{
    struct fake_conn *f = (struct fake_conn *)c;

    if (f->left < len) {
        return -ECONNRESET;
    }
    memcpy(buf, f->p, len);
    f->p += len;
    f->left -= len;
    return 0;
}

static int fake_send(struct rdmax_conn *c, const struct iovec *iov, int iovcnt)
{
    return 0;
}

static void fake_close(struct rdmax_conn *c)
{
}

/* Lends the peer bytes where they lie (a writable copy: the wire decrypts in place). */
static int fake_rx_next(struct rdmax_conn *c, size_t len, uint8_t **p, int timeout_ms)
{
    struct fake_conn *f = (struct fake_conn *)c;

    if (f->left < len) {
        return -ECONNRESET;
    }
    *p = (uint8_t *)f->p;
    return 0;
}

static void fake_rx_release(struct rdmax_conn *c, size_t len)
{
    struct fake_conn *f = (struct fake_conn *)c;

    if (len > f->left) {
        abort(); /* the wire gave back more than it was lent */
    }
    f->p += len;
    f->left -= len;
}

static const struct rdmax_transport_ops fake_ops = {
    .name = "fuzz",
    .send = fake_send,
    .recv = fake_recv,
    .close = fake_close,
};

static const struct rdmax_transport_ops fake_lend_ops = {
    .name = "fuzz-lend",
    .send = fake_send,
    .recv = fake_recv,
    .rx_next = fake_rx_next,
    .rx_release = fake_rx_release,
    .close = fake_close,
};

/* The key the seed generator encrypted its frames with. */
static const uint8_t fuzz_key[RDMAX_KEY_LEN] = "rdma-x fuzz key, not a secret!!";

static void check_hello(const uint8_t *p, size_t n)
{
    struct rdmax_hello h;
    uint8_t again[RDMAX_HELLO_LEN];
    char err[200];

    if (rdmax_hello_decode(p, n, &h, err, sizeof(err)) == 0) {
        if (n != RDMAX_HELLO_LEN) {
            abort();
        }
        rdmax_hello_encode(again, &h);
        if (memcmp(again, p, RDMAX_HELLO_LEN) != 0) {
            abort();
        }
    } else if (memchr(err, '\0', sizeof(err)) == NULL) {
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const size_t caps[] = {64, 512, 65536, RDMAX_FRAME_MAX};
    struct fake_conn fc = {.base = {.ops = &fake_ops}};
    struct rdmax_wire w;
    struct rdmax_frame_hdr h;
    uint8_t *buf;
    size_t cap;

    if (size < 1) {
        return 0;
    }
    cap = caps[(data[0] >> 1) & 3];
    if (size - 1 >= RDMAX_FRAME_HDR) {
        (void)rdmax_frame_hdr_decode(data + 1, &h);
    }
    check_hello(data + 1, size - 1);

    bool lend = data[0] & 8;
    uint8_t *copy = malloc(size); /* the loan is writable */
    if (!copy) {
        abort();
    }
    memcpy(copy, data + 1, size - 1);
    fc.p = copy;
    fc.left = size - 1;
    if (lend) {
        fc.base.ops = &fake_lend_ops;
    }
    rdmax_wire_init(&w, &fc.base);
    if (data[0] & 1) {
        struct rdmax_crypt *rx;
        if (rdmax_crypt_create(fuzz_key, false, &rx) < 0) {
            abort();
        }
        rdmax_wire_crypt_start(&w, NULL, rx);
    }
    buf = malloc(cap); /* exactly the cap: a longer frame would overflow */
    if (!buf) {
        abort();
    }
    for (int i = 0; i < 64; i++) {
        uint8_t *pl = buf;
        int r =
            lend ? rdmax_wire_recv_lend(&w, &h, &pl, cap, 0) : rdmax_wire_recv(&w, &h, buf, cap, 0);
        if (r < 0) {
            break;
        }
        if (h.len > cap || h.type == 0 || h.type > RDMAX_F_TYPE_MAX) {
            abort();
        }
        if (lend && (pl < copy || pl + h.len > copy + size - 1)) {
            abort(); /* the payload lies inside what was lent */
        }
        if (h.type == RDMAX_F_HELLO || h.type == RDMAX_F_HELLO_ACK) {
            check_hello(pl, h.len);
        }
    }
    rdmax_wire_recv_release(&w);
    free(buf);
    free(copy);
    w.conn = NULL;
    rdmax_wire_destroy(&w);
    return 0;
}
