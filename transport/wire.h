/*
 * Wire protocol v1: framing and handshake (docs/wire-protocol.md).
 *
 * frame  := header payload
 * header := u8 type, u8 flags, be16 channel, be32 len, be32 crc32c
 *           (the CRC covers the first 8 header bytes and the payload)
 *
 * Every connection starts with HELLO (client) and HELLO_ACK or ERROR
 * (server). Frame lengths are capped at RDMAX_FRAME_MAX before anything is
 * allocated or read.
 */
#ifndef RDMAX_WIRE_H
#define RDMAX_WIRE_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "transport.h"

#define RDMAX_WIRE_MAGIC 0x52444d58u /* "RDMX" */
/*
 * v2: 32-byte nonce and proof in HELLO, feature bits, AUTH/AUTH_OK (PSK).
 * v3: lane batches may carry FULL pages with NOCACHE (not inserted);
 *     LANE_LOAD frames.
 */
#define RDMAX_WIRE_VERSION 3u
#define RDMAX_FRAME_HDR 12u
#define RDMAX_FRAME_MAX (4u << 20)
#define RDMAX_LANES_MAX 64u
#define RDMAX_PAYLOAD_TIMEOUT_MS 20000 /* payload after its header, when waiting forever */
#define RDMAX_HELLO_LEN 112u
#define RDMAX_HELLO_NONCE 48u /* offset of the 32-byte nonce */
#define RDMAX_HELLO_MAC 80u   /* offset of the 32-byte proof (HELLO_ACK, with a PSK) */

/* Feature bits: each must be set on both sides or the handshake is refused. */
#define RDMAX_FEAT_PSK 0x1u     /* --psk-file: mutual challenge-response */
#define RDMAX_FEAT_ENCRYPT 0x2u /* --encrypt: AES-256-GCM frames */
/*
 * The sender may open QEMU channel connections (role CHANNEL: multifd,
 * postcopy preempt; send --listen-unix). Sender only and not matched: it
 * tells the receiver to keep listening for them after the lanes.
 */
#define RDMAX_FEAT_CHANNELS 0x4u
/*
 * The control HELLO carries the guest's RAM size (bytes 40..47, else
 * reserved), for the receiver's pre-flight check. Sender only, not matched.
 */
#define RDMAX_FEAT_GUEST_RAM 0x8u
/*
 * The QEMU channels' page codecs run without a page cache (no DELTA or
 * UNCHANGED pages on them). Sender only, not matched; without it the
 * receiver decodes channel pages with the lanes' cache size (rdma-x before).
 */
#define RDMAX_FEAT_CHAN_NOCACHE 0x10u
#define RDMAX_FEAT_KNOWN                                                                           \
    (RDMAX_FEAT_PSK | RDMAX_FEAT_ENCRYPT | RDMAX_FEAT_CHANNELS | RDMAX_FEAT_GUEST_RAM |            \
     RDMAX_FEAT_CHAN_NOCACHE)
/* QEMU channels besides the main one (multifd channels + the preempt channel). */
#define RDMAX_CHAN_MAX 64u
/* Disk (NBD) connections open at once (libvirt opens one per migrated disk). */
#define RDMAX_DISK_MAX 64u

enum rdmax_frame_type {
    RDMAX_F_HELLO = 1,       /* client -> server, first frame of a connection */
    RDMAX_F_HELLO_ACK = 2,   /* server -> client */
    RDMAX_F_CTRL = 3,        /* control bytes of the QEMU stream (zstd stream) */
    RDMAX_F_PAGES = 4,       /* one lane batch */
    RDMAX_F_RP = 5,          /* return-path bytes, destination -> source */
    RDMAX_F_EOF = 6,         /* sender: end of the QEMU stream, with totals */
    RDMAX_F_FIN_ACK = 7,     /* receiver: every byte reached the destination QEMU */
    RDMAX_F_ERROR = 8,       /* one-line reason; the connection ends */
    RDMAX_F_KEEPALIVE = 9,   /* nothing to say, still alive */
    RDMAX_F_RP_EOF = 10,     /* the destination QEMU closed the return path */
    RDMAX_F_LANE_EOF = 11,   /* sender lane: no more batches, with page count */
    RDMAX_F_AUTH = 12,       /* client -> server: its PSK proof (32 bytes) */
    RDMAX_F_AUTH_OK = 13,    /* server -> client: proof accepted */
    RDMAX_F_LANE_LOAD = 14,  /* receiver, on control: lane k's decoding is (not) the bottleneck */
    RDMAX_F_CHAN_DATA = 15,  /* QEMU channel connection: the next bytes of that channel */
    RDMAX_F_CHAN_EOF = 16,   /* QEMU channel connection: the channel closed, be64 bytes */
    RDMAX_F_CHAN_PAGES = 17, /* QEMU channel connection: the next pages, one lane batch */
    RDMAX_F_DISK_DATA = 18,  /* disk connection: the next bytes of that NBD connection */
    RDMAX_F_DISK_ZERO = 19,  /* disk connection: be32 n, the next n bytes are zero */
    RDMAX_F_DISK_EOF = 20,   /* disk connection: this direction closed, be64 bytes */
    RDMAX_F_TYPE_MAX = 20,
};

#define RDMAX_FF_ZSTD 0x01 /* payload is (part of) a zstd stream */

enum rdmax_role {
    RDMAX_ROLE_CONTROL = 0,
    RDMAX_ROLE_LANE = 1,
    RDMAX_ROLE_CHANNEL = 2, /* lane field: the QEMU channel's index, in the source's accept order */
    /*
     * A disk (NBD) connection of storage migration (send --listen-disks-unix):
     * bytes both ways, independent of any migration (it opens before the
     * migration and closes after it). lane field: its number, for messages.
     */
    RDMAX_ROLE_DISK = 3,
};

struct rdmax_frame_hdr {
    uint8_t type;
    uint8_t flags;
    uint16_t channel;
    uint32_t len;
    uint32_t crc;
};

struct rdmax_hello {
    uint32_t magic;
    uint16_t version;
    uint16_t role;
    uint16_t lane;
    uint16_t lanes;
    uint32_t page_size;
    uint64_t session;
    uint32_t features;
    uint64_t cache_bytes;
    int32_t zstd_level;
    uint64_t guest_ram; /* with RDMAX_FEAT_GUEST_RAM: the guest's RAM in bytes, else 0 */
    uint8_t nonce[32];  /* fresh random per connection and side */
    uint8_t mac[32];    /* HELLO_ACK with a PSK: the server's proof, else 0 */
};

struct rdmax_crypt;

/* A connection with its frame-level state. */
struct rdmax_wire {
    struct rdmax_conn *conn;   /* owned */
    pthread_mutex_t send_lock; /* serialises senders */
    uint64_t bytes_sent;       /* protected by send_lock */
    uint64_t bytes_received;   /* owned by the receiving thread */
    struct rdmax_crypt *tx;    /* --encrypt: owned, protected by send_lock */
    struct rdmax_crypt *rx;    /* --encrypt: owned by the receiving thread */
    uint8_t *seal_buf;         /* ciphertext of the frame being sent (send_lock) */
    size_t seal_cap;
    /*
     * rdmax_wire_recv_lend: owned by the receiving thread. lent: bytes of
     * the frame on loan from the transport (header included) until
     * rdmax_wire_recv_release, 0 when none. rx_buf/rx_cap: the frame's
     * bytes when the transport has no rx_next (grows to the largest cap
     * asked for, never the peer's choice).
     */
    size_t lent;
    uint8_t *rx_buf;
    size_t rx_cap;
};

void rdmax_wire_init(struct rdmax_wire *w, struct rdmax_conn *c);
void rdmax_wire_destroy(struct rdmax_wire *w);

void rdmax_frame_hdr_encode(uint8_t out[RDMAX_FRAME_HDR], const struct rdmax_frame_hdr *h);
/* Validates type and length (not the CRC). Returns 0 or -EPROTO. */
int rdmax_frame_hdr_decode(const uint8_t in[RDMAX_FRAME_HDR], struct rdmax_frame_hdr *h);

/*
 * From now on encrypt every frame sent and decrypt every frame received
 * (--encrypt, after the handshake). Takes ownership of tx and rx.
 */
void rdmax_wire_crypt_start(struct rdmax_wire *w, struct rdmax_crypt *tx, struct rdmax_crypt *rx);

/* Payload entries of one frame: the connection's, less the frame header's. */
#define RDMAX_WIRE_IOV_MAX (RDMAX_CONN_IOV_MAX - 1)

/*
 * Send one frame (payload from iov, at most RDMAX_WIRE_IOV_MAX entries,
 * only read until return). Thread-safe. 0 or -errno (-EINVAL: too many).
 */
int rdmax_wire_sendv(struct rdmax_wire *w, uint8_t type, uint8_t flags, uint16_t channel,
                     const struct iovec *iov, int iovcnt);
int rdmax_wire_send(struct rdmax_wire *w, uint8_t type, uint8_t flags, uint16_t channel,
                    const void *p, size_t len);

/*
 * Receive one frame into buf[0..cap). Returns 0, -EPROTO (bad header or a
 * frame larger than cap), -EBADMSG (checksum mismatch), -EKEYREJECTED
 * (encrypted frame that fails authentication), or the transport's -errno
 * (-ECONNRESET, -ETIMEDOUT). With encryption h->len is the plaintext length.
 */
int rdmax_wire_recv(struct rdmax_wire *w, struct rdmax_frame_hdr *h, uint8_t *buf, size_t cap,
                    int timeout_ms);

/*
 * Receive one frame without copying it: *payload points at its payload
 * (h->len bytes, plaintext: checked and decrypted in place) where the
 * transport received it (transport.h rx_next; a wire buffer when the
 * transport cannot lend). The receiving thread owns those bytes until
 * rdmax_wire_recv_release(w), which must come before the next receive
 * on w; they may be modified. Errors as rdmax_wire_recv (a frame larger
 * than cap: -EPROTO, checked before its payload is read); after an error
 * nothing is on loan and the connection is done.
 */
int rdmax_wire_recv_lend(struct rdmax_wire *w, struct rdmax_frame_hdr *h, uint8_t **payload,
                         size_t cap, int timeout_ms);
/* Give the frame of the last rdmax_wire_recv_lend back (nothing when none is on loan). */
void rdmax_wire_recv_release(struct rdmax_wire *w);

void rdmax_hello_encode(uint8_t out[RDMAX_HELLO_LEN], const struct rdmax_hello *h);
/*
 * Parse and check magic, version and every field (untrusted input); reason
 * in err. 0, -EPROTO or -EPROTONOSUPPORT.
 */
int rdmax_hello_decode(const uint8_t *in, size_t len, struct rdmax_hello *h, char *err,
                       size_t err_len);

/* Human-readable name of a frame type. */
const char *rdmax_frame_type_name(unsigned type);

#endif
