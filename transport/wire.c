/*
 * Wire protocol v1: frames and handshake. See wire.h and
 * docs/wire-protocol.md. Pure: talks to the peer only through the
 * connection's ops table.
 */
#include "wire.h"
#include "be.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <stdlib.h>

#include "crc32c.h"
#include "crypt.h"

void rdmax_wire_init(struct rdmax_wire *w, struct rdmax_conn *c)
{
    memset(w, 0, sizeof(*w));
    w->conn = c;
    pthread_mutex_init(&w->send_lock, NULL);
}

void rdmax_wire_destroy(struct rdmax_wire *w)
{
    if (w->conn) {
        w->conn->ops->close(w->conn);
        w->conn = NULL;
    }
    rdmax_crypt_destroy(w->tx);
    rdmax_crypt_destroy(w->rx);
    free(w->seal_buf);
    free(w->rx_buf);
    w->tx = w->rx = NULL;
    w->seal_buf = NULL;
    w->rx_buf = NULL;
    pthread_mutex_destroy(&w->send_lock);
}

void rdmax_wire_crypt_start(struct rdmax_wire *w, struct rdmax_crypt *tx, struct rdmax_crypt *rx)
{
    pthread_mutex_lock(&w->send_lock);
    w->tx = tx;
    pthread_mutex_unlock(&w->send_lock);
    w->rx = rx;
}

/* Encrypt the payload into w->seal_buf; iov then points at it. send_lock held. */
static int wire_seal_locked(struct rdmax_wire *w, const uint8_t hdr8[8], const struct iovec *iov,
                            int iovcnt, size_t len, struct iovec *out)
{
    int r;

    if (w->seal_cap < len + RDMAX_TAG_LEN) {
        /* Grows to the largest frame this side sends, never the peer's choice. */
        uint8_t *b = realloc(w->seal_buf, len + RDMAX_TAG_LEN);
        if (!b) {
            return -ENOMEM;
        }
        w->seal_buf = b;
        w->seal_cap = len + RDMAX_TAG_LEN;
    }
    r = rdmax_crypt_seal(w->tx, hdr8, 8, iov, iovcnt, w->seal_buf);
    if (r < 0) {
        return r;
    }
    out->iov_base = w->seal_buf;
    out->iov_len = len + RDMAX_TAG_LEN;
    return 0;
}

void rdmax_frame_hdr_encode(uint8_t out[RDMAX_FRAME_HDR], const struct rdmax_frame_hdr *h)
{
    out[0] = h->type;
    out[1] = h->flags;
    rdmax_put_be16(out + 2, h->channel);
    rdmax_put_be32(out + 4, h->len);
    rdmax_put_be32(out + 8, h->crc);
}

int rdmax_frame_hdr_decode(const uint8_t in[RDMAX_FRAME_HDR], struct rdmax_frame_hdr *h)
{
    h->type = in[0];
    h->flags = in[1];
    h->channel = rdmax_get_be16(in + 2);
    h->len = rdmax_get_be32(in + 4);
    h->crc = rdmax_get_be32(in + 8);
    if (h->type == 0 || h->type > RDMAX_F_TYPE_MAX) {
        return -EPROTO;
    }
    if (h->flags & ~RDMAX_FF_ZSTD) {
        return -EPROTO;
    }
    if (h->len > RDMAX_FRAME_MAX) {
        return -EPROTO;
    }
    if (h->channel > RDMAX_LANES_MAX) {
        return -EPROTO;
    }
    return 0;
}

int rdmax_wire_sendv(struct rdmax_wire *w, uint8_t type, uint8_t flags, uint16_t channel,
                     const struct iovec *iov, int iovcnt)
{
    struct iovec v[RDMAX_WIRE_IOV_MAX + 1];
    uint8_t hdr[RDMAX_FRAME_HDR];
    struct rdmax_frame_hdr h = {.type = type, .flags = flags, .channel = channel};
    uint32_t crc;
    size_t len = 0, wire_len;
    int r;

    if (iovcnt > RDMAX_WIRE_IOV_MAX) {
        return -EINVAL;
    }
    for (int i = 0; i < iovcnt; i++) {
        len += iov[i].iov_len;
    }
    pthread_mutex_lock(&w->send_lock);
    wire_len = len + (w->tx ? RDMAX_TAG_LEN : 0);
    if (wire_len > RDMAX_FRAME_MAX) {
        pthread_mutex_unlock(&w->send_lock);
        return -EMSGSIZE;
    }
    h.len = (uint32_t)wire_len;
    rdmax_frame_hdr_encode(hdr, &h);
    v[0].iov_base = hdr;
    v[0].iov_len = sizeof(hdr);
    if (w->tx) {
        r = wire_seal_locked(w, hdr, iov, iovcnt, len, &v[1]);
        if (r < 0) {
            pthread_mutex_unlock(&w->send_lock);
            return r;
        }
        iovcnt = 1;
    } else {
        memcpy(v + 1, iov, sizeof(*iov) * iovcnt);
    }
    /* Sealed frames: the GCM tag protects the payload, the CRC the header alone. */
    crc = rdmax_crc32c(0, hdr, 8);
    for (int i = 1; !w->tx && i <= iovcnt; i++) {
        crc = rdmax_crc32c(crc, v[i].iov_base, v[i].iov_len);
    }
    rdmax_put_be32(hdr + 8, crc);

    r = w->conn->ops->send(w->conn, v, iovcnt + 1);
    if (r == 0) {
        w->bytes_sent += sizeof(hdr) + wire_len;
    }
    pthread_mutex_unlock(&w->send_lock);
    return r;
}

int rdmax_wire_send(struct rdmax_wire *w, uint8_t type, uint8_t flags, uint16_t channel,
                    const void *p, size_t len)
{
    struct iovec v = {.iov_base = (void *)p, .iov_len = len};

    return rdmax_wire_sendv(w, type, flags, channel, &v, len ? 1 : 0);
}

int rdmax_wire_recv(struct rdmax_wire *w, struct rdmax_frame_hdr *h, uint8_t *buf, size_t cap,
                    int timeout_ms)
{
    uint8_t hdr[RDMAX_FRAME_HDR];
    uint32_t crc;
    int r;

    r = w->conn->ops->recv(w->conn, hdr, sizeof(hdr), timeout_ms);
    if (r < 0) {
        return r;
    }
    r = rdmax_frame_hdr_decode(hdr, h);
    if (r < 0) {
        /* A flipped bit in the header reads as a bad header: say checksum. */
        crc = rdmax_crc32c(0, hdr, 8);
        return crc == h->crc ? r : -EBADMSG;
    }
    if (h->len > cap) {
        return -EPROTO;
    }
    if (h->len) {
        /*
         * An honest peer writes a frame at once, so its payload follows its
         * header within moments, also on lanes that wait for headers
         * forever: a payload that never comes is a corrupted length. The
         * bound is twice the caller's, so a stalled peer is reported as
         * silent by the control connection first.
         */
        int pt = timeout_ms < 0 ? RDMAX_PAYLOAD_TIMEOUT_MS : 2 * timeout_ms;
        r = w->conn->ops->recv(w->conn, buf, h->len, pt);
        if (r == -ETIMEDOUT) {
            return -EBADMSG;
        }
        if (r < 0) {
            return r;
        }
    }
    crc = rdmax_crc32c(0, hdr, 8);
    if (!w->rx) {
        crc = rdmax_crc32c(crc, buf, h->len);
    }
    if (crc != h->crc) {
        return -EBADMSG;
    }
    w->bytes_received += sizeof(hdr) + h->len;
    if (w->rx) {
        /* The tag catches accidents, forgeries and replays alike: one check per byte, not two. */
        r = rdmax_crypt_open(w->rx, hdr, 8, buf, h->len);
        if (r < 0) {
            return -EKEYREJECTED;
        }
        h->len = (uint32_t)r;
    }
    return 0;
}

/* The next len bytes of the frame, without a transport that lends: into w->rx_buf. */
static int wire_fill(struct rdmax_wire *w, size_t have, size_t len, uint8_t **f, int timeout_ms)
{
    int r;

    if (w->conn->ops->rx_next) {
        return w->conn->ops->rx_next(w->conn, len, f, timeout_ms);
    }
    if (w->rx_cap < len) {
        uint8_t *b = realloc(w->rx_buf, len);
        if (!b) {
            return -ENOMEM;
        }
        w->rx_buf = b;
        w->rx_cap = len;
    }
    r = w->conn->ops->recv(w->conn, w->rx_buf + have, len - have, timeout_ms);
    *f = w->rx_buf;
    return r;
}

static void wire_unlend(struct rdmax_wire *w, size_t len)
{
    if (len && w->conn->ops->rx_release) {
        w->conn->ops->rx_release(w->conn, len);
    }
}

int rdmax_wire_recv_lend(struct rdmax_wire *w, struct rdmax_frame_hdr *h, uint8_t **payload,
                         size_t cap, int timeout_ms)
{
    uint8_t hdr[RDMAX_FRAME_HDR], *f;
    uint32_t crc;
    int r;

    rdmax_wire_recv_release(w);
    r = wire_fill(w, 0, sizeof(hdr), &f, timeout_ms);
    if (r < 0) {
        return r;
    }
    memcpy(hdr, f, sizeof(hdr)); /* f may move when the loan grows */
    r = rdmax_frame_hdr_decode(hdr, h);
    if (r < 0) {
        wire_unlend(w, sizeof(hdr));
        /* A flipped bit in the header reads as a bad header: say checksum. */
        crc = rdmax_crc32c(0, hdr, 8);
        return crc == h->crc ? r : -EBADMSG;
    }
    if (h->len > cap) {
        wire_unlend(w, sizeof(hdr));
        return -EPROTO;
    }
    if (h->len) {
        /* As in rdmax_wire_recv: a payload that never comes is a corrupted length. */
        int pt = timeout_ms < 0 ? RDMAX_PAYLOAD_TIMEOUT_MS : 2 * timeout_ms;
        r = wire_fill(w, sizeof(hdr), sizeof(hdr) + h->len, &f, pt);
        if (r < 0) {
            wire_unlend(w, sizeof(hdr));
            return r == -ETIMEDOUT ? -EBADMSG : r;
        }
    }
    w->lent = sizeof(hdr) + h->len;
    crc = rdmax_crc32c(0, hdr, 8);
    if (!w->rx) {
        crc = rdmax_crc32c(crc, f + sizeof(hdr), h->len);
    }
    if (crc != h->crc) {
        rdmax_wire_recv_release(w);
        return -EBADMSG;
    }
    w->bytes_received += sizeof(hdr) + h->len;
    if (w->rx) {
        r = rdmax_crypt_open(w->rx, hdr, 8, f + sizeof(hdr), h->len);
        if (r < 0) {
            rdmax_wire_recv_release(w);
            return -EKEYREJECTED;
        }
        h->len = (uint32_t)r;
    }
    *payload = f + sizeof(hdr);
    return 0;
}

void rdmax_wire_recv_release(struct rdmax_wire *w)
{
    wire_unlend(w, w->lent);
    w->lent = 0;
}

void rdmax_hello_encode(uint8_t out[RDMAX_HELLO_LEN], const struct rdmax_hello *h)
{
    memset(out, 0, RDMAX_HELLO_LEN);
    rdmax_put_be32(out + 0, h->magic);
    rdmax_put_be16(out + 4, h->version);
    rdmax_put_be16(out + 6, h->role);
    rdmax_put_be16(out + 8, h->lane);
    rdmax_put_be16(out + 10, h->lanes);
    rdmax_put_be32(out + 12, h->page_size);
    rdmax_put_be64(out + 16, h->session);
    rdmax_put_be32(out + 24, h->features);
    rdmax_put_be64(out + 28, h->cache_bytes);
    rdmax_put_be32(out + 36, (uint32_t)h->zstd_level);
    rdmax_put_be64(out + 40, h->features & RDMAX_FEAT_GUEST_RAM ? h->guest_ram : 0);
    memcpy(out + RDMAX_HELLO_NONCE, h->nonce, sizeof(h->nonce));
    memcpy(out + RDMAX_HELLO_MAC, h->mac, sizeof(h->mac));
}

int rdmax_hello_decode(const uint8_t *in, size_t len, struct rdmax_hello *h, char *err,
                       size_t err_len)
{
    if (len < 8) {
        snprintf(err, err_len, "handshake of %zu bytes", len);
        return -EPROTO;
    }
    h->magic = rdmax_get_be32(in);
    h->version = rdmax_get_be16(in + 4);
    if (h->magic != RDMAX_WIRE_MAGIC) {
        snprintf(err, err_len, "peer is not rdma-x (magic 0x%08x)", h->magic);
        return -EPROTO;
    }
    if (h->version != RDMAX_WIRE_VERSION) {
        snprintf(err, err_len, "peer speaks wire protocol v%u, this rdma-x speaks v%u", h->version,
                 RDMAX_WIRE_VERSION);
        return -EPROTONOSUPPORT;
    }
    if (len != RDMAX_HELLO_LEN) {
        snprintf(err, err_len, "handshake of %zu bytes, expected %u", len, RDMAX_HELLO_LEN);
        return -EPROTO;
    }
    h->role = rdmax_get_be16(in + 6);
    h->lane = rdmax_get_be16(in + 8);
    h->lanes = rdmax_get_be16(in + 10);
    h->page_size = rdmax_get_be32(in + 12);
    h->session = rdmax_get_be64(in + 16);
    h->features = rdmax_get_be32(in + 24);
    h->cache_bytes = rdmax_get_be64(in + 28);
    h->zstd_level = (int32_t)rdmax_get_be32(in + 36);
    h->guest_ram = rdmax_get_be64(in + 40);
    memcpy(h->nonce, in + RDMAX_HELLO_NONCE, sizeof(h->nonce));
    memcpy(h->mac, in + RDMAX_HELLO_MAC, sizeof(h->mac));
    if (h->role > RDMAX_ROLE_DISK) {
        snprintf(err, err_len, "unknown connection role %u", h->role);
        return -EPROTO;
    }
    if (h->lanes == 0 || h->lanes > RDMAX_LANES_MAX) {
        snprintf(err, err_len, "%u lanes (1..%u allowed)", h->lanes, RDMAX_LANES_MAX);
        return -EPROTO;
    }
    if (h->role == RDMAX_ROLE_LANE && h->lane >= h->lanes) {
        snprintf(err, err_len, "lane %u of %u", h->lane, h->lanes);
        return -EPROTO;
    }
    if (h->role == RDMAX_ROLE_CHANNEL && h->lane >= RDMAX_CHAN_MAX) {
        snprintf(err, err_len, "QEMU channel %u (at most %u)", h->lane, RDMAX_CHAN_MAX);
        return -EPROTO;
    }
    if (h->role == RDMAX_ROLE_DISK && h->lane >= RDMAX_DISK_MAX) {
        snprintf(err, err_len, "disk connection %u (at most %u)", h->lane, RDMAX_DISK_MAX);
        return -EPROTO;
    }
    if (h->page_size != 4096) {
        snprintf(err, err_len, "page size %u (only 4096 is supported)", h->page_size);
        return -EPROTO;
    }
    /* Reserved bytes must be 0, so a later version can give them a meaning. */
    if (!(h->features & RDMAX_FEAT_GUEST_RAM) && h->guest_ram != 0) {
        snprintf(err, err_len, "reserved handshake fields are not zero");
        return -EPROTO;
    }
    if (h->guest_ram > (1ull << 46)) {
        snprintf(err, err_len, "guest RAM of %llu bytes (at most 64 TiB)",
                 (unsigned long long)h->guest_ram);
        return -EPROTO;
    }
    if (h->features & ~RDMAX_FEAT_KNOWN) {
        snprintf(err, err_len, "peer wants features 0x%x this rdma-x does not have",
                 h->features & ~RDMAX_FEAT_KNOWN);
        return -EPROTONOSUPPORT;
    }
    if ((h->features & RDMAX_FEAT_ENCRYPT) && !(h->features & RDMAX_FEAT_PSK)) {
        snprintf(err, err_len, "encryption without a pre-shared key");
        return -EPROTO;
    }
    if (h->zstd_level < -1 || h->zstd_level > 22) {
        snprintf(err, err_len, "zstd level %d", h->zstd_level);
        return -EPROTO;
    }
    return 0;
}

const char *rdmax_frame_type_name(unsigned type)
{
    static const char *const names[] = {
        "?",         "HELLO",     "HELLO_ACK", "CTRL",       "PAGES",     "RP",        "EOF",
        "FIN_ACK",   "ERROR",     "KEEPALIVE", "RP_EOF",     "LANE_EOF",  "AUTH",      "AUTH_OK",
        "LANE_LOAD", "CHAN_DATA", "CHAN_EOF",  "CHAN_PAGES", "DISK_DATA", "DISK_ZERO", "DISK_EOF",
    };

    return type <= RDMAX_F_TYPE_MAX ? names[type] : "?";
}
