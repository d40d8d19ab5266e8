/* Wire protocol: frame headers, checksums, the handshake and encryption, on real sockets. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "crc32c.h"
#include "crypt.h"
#include "wire.h"

Test(wire, header_roundtrip)
{
    struct rdmax_frame_hdr h = {.type = RDMAX_F_PAGES,
                                .flags = RDMAX_FF_ZSTD,
                                .channel = 3,
                                .len = 12345,
                                .crc = 0xdeadbeef};
    struct rdmax_frame_hdr g;
    uint8_t b[RDMAX_FRAME_HDR];

    rdmax_frame_hdr_encode(b, &h);
    cr_assert_eq(rdmax_frame_hdr_decode(b, &g), 0);
    cr_assert_eq(g.type, h.type);
    cr_assert_eq(g.flags, h.flags);
    cr_assert_eq(g.channel, h.channel);
    cr_assert_eq(g.len, h.len);
    cr_assert_eq(g.crc, h.crc);
}

Test(wire, header_rejects_hostile_fields)
{
    struct rdmax_frame_hdr h = {.type = RDMAX_F_CTRL, .len = 10};
    struct rdmax_frame_hdr g;
    uint8_t b[RDMAX_FRAME_HDR];

    h.len = RDMAX_FRAME_MAX + 1;
    rdmax_frame_hdr_encode(b, &h);
    cr_assert_eq(rdmax_frame_hdr_decode(b, &g), -EPROTO, "oversized frame accepted");
    h.len = 10;
    h.type = 0;
    rdmax_frame_hdr_encode(b, &h);
    cr_assert_eq(rdmax_frame_hdr_decode(b, &g), -EPROTO);
    h.type = RDMAX_F_TYPE_MAX + 1;
    rdmax_frame_hdr_encode(b, &h);
    cr_assert_eq(rdmax_frame_hdr_decode(b, &g), -EPROTO);
    h.type = RDMAX_F_CTRL;
    h.flags = 0x80;
    rdmax_frame_hdr_encode(b, &h);
    cr_assert_eq(rdmax_frame_hdr_decode(b, &g), -EPROTO);
    h.flags = 0;
    h.channel = RDMAX_LANES_MAX + 1;
    rdmax_frame_hdr_encode(b, &h);
    cr_assert_eq(rdmax_frame_hdr_decode(b, &g), -EPROTO);
}

/* A connection over a socketpair, through the real TCP ops' send/recv shape. */
struct sp_conn {
    struct rdmax_conn base;
    int fd;
};

static int sp_send(struct rdmax_conn *c, const struct iovec *iov, int n)
{
    for (int i = 0; i < n; i++) {
        if (write(((struct sp_conn *)c)->fd, iov[i].iov_base, iov[i].iov_len) !=
            (ssize_t)iov[i].iov_len) {
            return -EIO;
        }
    }
    return 0;
}

static int sp_recv(struct rdmax_conn *c, void *buf, size_t len, int t)
{
    size_t got = 0;

    while (got < len) {
        ssize_t r = read(((struct sp_conn *)c)->fd, (uint8_t *)buf + got, len - got);
        if (r <= 0) {
            return -ECONNRESET;
        }
        got += (size_t)r;
    }
    return 0;
}

static void sp_close(struct rdmax_conn *c)
{
    close(((struct sp_conn *)c)->fd);
}

static const struct rdmax_transport_ops sp_ops = {
    .name = "socketpair", .send = sp_send, .recv = sp_recv, .close = sp_close};

static void pair(struct sp_conn *a, struct sp_conn *b)
{
    int fds[2];

    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    a->base.ops = b->base.ops = &sp_ops;
    a->fd = fds[0];
    b->fd = fds[1];
}

Test(wire, frames_cross_a_socket_intact)
{
    struct sp_conn a, b;
    struct rdmax_wire wa, wb;
    struct rdmax_frame_hdr h;
    uint8_t buf[256];

    pair(&a, &b);
    rdmax_wire_init(&wa, &a.base);
    rdmax_wire_init(&wb, &b.base);
    cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_RP, 0, 0, "hello", 5), 0);
    cr_assert_eq(rdmax_wire_recv(&wb, &h, buf, sizeof(buf), 1000), 0);
    cr_assert_eq(h.type, RDMAX_F_RP);
    cr_assert_eq(h.len, 5);
    cr_assert(memcmp(buf, "hello", 5) == 0);
}

Test(wire, a_flipped_bit_anywhere_is_caught)
{
    uint8_t frame[RDMAX_FRAME_HDR + 32];

    for (size_t bit = 0; bit < sizeof(frame) * 8; bit++) {
        struct sp_conn a, b;
        struct rdmax_wire wa, wb;
        struct rdmax_frame_hdr h;
        uint8_t buf[64];
        uint8_t payload[32];
        int fds[2];

        memset(payload, 0x5a, sizeof(payload));
        /* Capture the encoded frame, flip one bit, deliver it. */
        pair(&a, &b);
        rdmax_wire_init(&wa, &a.base);
        cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_PAGES, 0, 1, payload, sizeof(payload)), 0);
        cr_assert_eq(read(b.fd, frame, sizeof(frame)), (ssize_t)sizeof(frame));
        frame[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
        cr_assert_eq(write(fds[0], frame, sizeof(frame)), (ssize_t)sizeof(frame));
        close(fds[0]);
        b.fd = fds[1];
        rdmax_wire_init(&wb, &b.base);
        int r = rdmax_wire_recv(&wb, &h, buf, sizeof(buf), 1000);
        cr_assert(r == -EBADMSG || r == -EPROTO || r == -ECONNRESET,
                  "bit %zu flipped went unnoticed (r=%d)", bit, r);
        close(a.fd);
        close(fds[1]);
    }
}

static struct rdmax_hello good_hello(void)
{
    struct rdmax_hello h = {.magic = RDMAX_WIRE_MAGIC,
                            .version = RDMAX_WIRE_VERSION,
                            .role = RDMAX_ROLE_LANE,
                            .lane = 1,
                            .lanes = 4,
                            .page_size = 4096,
                            .session = 0x1122334455667788ull,
                            .cache_bytes = 1 << 20,
                            .zstd_level = -1};
    return h;
}

Test(wire, hello_roundtrip)
{
    struct rdmax_hello h = good_hello(), g;
    uint8_t b[RDMAX_HELLO_LEN];
    char err[128];

    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(g.session, h.session);
    cr_assert_eq(g.lane, 1);
    cr_assert_eq(g.lanes, 4);
    cr_assert_eq(g.cache_bytes, h.cache_bytes);
    cr_assert_eq(g.zstd_level, -1);
}

Test(wire, hello_carries_the_guest_ram_only_with_its_feature_bit)
{
    struct rdmax_hello h = good_hello(), g;
    uint8_t b[RDMAX_HELLO_LEN];
    char err[200];

    h.features |= RDMAX_FEAT_GUEST_RAM;
    h.guest_ram = 17ull << 30;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(g.guest_ram, 17ull << 30);

    /* Without the bit the field is reserved: not sent, and refused when set. */
    h.features &= ~RDMAX_FEAT_GUEST_RAM;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(g.guest_ram, 0);
    b[47] = 1;
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);

    h.features |= RDMAX_FEAT_GUEST_RAM;
    h.guest_ram = (1ull << 46) + 1; /* more than any host */
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);
    cr_assert_not_null(strstr(err, "64 TiB"), "%s", err);
}

Test(wire, hello_refuses_mismatches_with_reasons)
{
    struct rdmax_hello h, g;
    uint8_t b[RDMAX_HELLO_LEN];
    char err[128];

    h = good_hello();
    h.version = RDMAX_WIRE_VERSION + 1;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTONOSUPPORT);
    cr_assert_not_null(strstr(err, "speaks wire protocol v"), "%s", err);

    /* A v1 peer (48-byte hello) is told about the version, not the length. */
    h = good_hello();
    h.version = 1;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, 48, &g, err, sizeof(err)), -EPROTONOSUPPORT);
    cr_assert_not_null(strstr(err, "v1"), "%s", err);

    h = good_hello();
    h.features = 0x80;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTONOSUPPORT);

    h = good_hello();
    h.features = RDMAX_FEAT_ENCRYPT; /* keys come from the PSK: needs it */
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);

    h = good_hello();
    rdmax_hello_encode(b, &h);
    b[45] = 1; /* reserved */
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);

    h = good_hello();
    h.magic = 0x47455420; /* "GET " */
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);
    cr_assert_not_null(strstr(err, "not rdma-x"), "%s", err);

    h = good_hello();
    h.lanes = 0;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);

    h = good_hello();
    h.lanes = RDMAX_LANES_MAX + 1;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);

    h = good_hello();
    h.lane = 4;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);

    h = good_hello();
    h.page_size = 65536;
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, sizeof(b), &g, err, sizeof(err)), -EPROTO);

    h = good_hello();
    rdmax_hello_encode(b, &h);
    cr_assert_eq(rdmax_hello_decode(b, 10, &g, err, sizeof(err)), -EPROTO);
}

static void crypt_pair(struct rdmax_wire *wa, struct rdmax_wire *wb, uint8_t k2)
{
    uint8_t k[RDMAX_KEY_LEN];
    struct rdmax_crypt *tx, *rx;

    memset(k, 0x42, sizeof(k));
    cr_assert_eq(rdmax_crypt_create(k, true, &tx), 0);
    k[0] = k2;
    cr_assert_eq(rdmax_crypt_create(k, false, &rx), 0);
    rdmax_wire_crypt_start(wa, tx, NULL);
    rdmax_wire_crypt_start(wb, NULL, rx);
}

Test(wire, encrypted_frames_cross_and_hide_the_payload)
{
    struct sp_conn a, b;
    struct rdmax_wire wa, wb;
    struct rdmax_frame_hdr h;
    uint8_t buf[256], raw[256];
    struct iovec v[2] = {{"secret ", 7}, {"payload", 7}};

    pair(&a, &b);
    rdmax_wire_init(&wa, &a.base);
    rdmax_wire_init(&wb, &b.base);
    crypt_pair(&wa, &wb, 0x42);
    for (int i = 0; i < 3; i++) { /* the nonce advances in step */
        cr_assert_eq(rdmax_wire_sendv(&wa, RDMAX_F_RP, 0, 0, v, 2), 0);
        cr_assert_eq(rdmax_wire_recv(&wb, &h, buf, sizeof(buf), 1000), 0);
        cr_assert_eq(h.len, 14);
        cr_assert(memcmp(buf, "secret payload", 14) == 0);
    }
    cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_KEEPALIVE, 0, 0, NULL, 0), 0);
    cr_assert_eq(rdmax_wire_recv(&wb, &h, buf, sizeof(buf), 1000), 0);
    cr_assert_eq(h.len, 0);
    /* On the wire: header, ciphertext and tag; no plaintext. */
    cr_assert_eq(rdmax_wire_sendv(&wa, RDMAX_F_RP, 0, 0, v, 2), 0);
    cr_assert_eq(recv(b.fd, raw, RDMAX_FRAME_HDR + 14 + RDMAX_TAG_LEN, MSG_WAITALL),
                 RDMAX_FRAME_HDR + 14 + RDMAX_TAG_LEN);
    cr_assert_null(memmem(raw, sizeof(raw), "secret", 6));
    rdmax_wire_destroy(&wa);
    rdmax_wire_destroy(&wb);
}

Test(wire, encrypted_frame_with_the_wrong_key_is_rejected)
{
    struct sp_conn a, b;
    struct rdmax_wire wa, wb;
    struct rdmax_frame_hdr h;
    uint8_t buf[256];

    pair(&a, &b);
    rdmax_wire_init(&wa, &a.base);
    rdmax_wire_init(&wb, &b.base);
    crypt_pair(&wa, &wb, 0x43);
    cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_RP, 0, 0, "hello", 5), 0);
    /* The CRC is right (no accident), the tag is not: a forgery. */
    cr_assert_eq(rdmax_wire_recv(&wb, &h, buf, sizeof(buf), 1000), -EKEYREJECTED);
    rdmax_wire_destroy(&wa);
    rdmax_wire_destroy(&wb);
}

/* A sealed frame sent on a, its bytes damaged at `at`, received on d. */
static int sealed_with_a_flip(size_t at)
{
    struct sp_conn a, b, c, d;
    struct rdmax_wire wa, wd;
    struct rdmax_frame_hdr h;
    uint8_t buf[256], raw[RDMAX_FRAME_HDR + 32 + RDMAX_TAG_LEN];
    size_t n = RDMAX_FRAME_HDR + 32 + RDMAX_TAG_LEN;
    int r;

    pair(&a, &b);
    pair(&c, &d);
    rdmax_wire_init(&wa, &a.base);
    rdmax_wire_init(&wd, &d.base);
    crypt_pair(&wa, &wd, 0x42);
    memset(buf, 'p', 32);
    cr_assert_eq(rdmax_wire_send(&wa, RDMAX_F_RP, 0, 0, buf, 32), 0);
    cr_assert_eq(recv(b.fd, raw, n, MSG_WAITALL), (ssize_t)n);
    raw[at] ^= 0x10;
    cr_assert_eq(write(c.fd, raw, n), (ssize_t)n);
    shutdown(c.fd, SHUT_WR);
    r = rdmax_wire_recv(&wd, &h, buf, sizeof(buf), 1000);
    rdmax_wire_destroy(&wa);
    rdmax_wire_destroy(&wd);
    close(b.fd);
    close(c.fd);
    return r;
}

Test(wire, sealed_frames_check_the_header_by_crc_and_the_payload_by_the_tag)
{
    /* The header (its channel): caught by the CRC, which still covers it. */
    cr_assert_eq(sealed_with_a_flip(3), -EBADMSG);
    /* The payload (ciphertext) and the tag: the GCM tag, not a second checksum pass. */
    cr_assert_eq(sealed_with_a_flip(RDMAX_FRAME_HDR + 3), -EKEYREJECTED);
    cr_assert_eq(sealed_with_a_flip(RDMAX_FRAME_HDR + 32 + 2), -EKEYREJECTED);
}

Test(auth, proofs_differ_by_key_and_label_and_compare_in_constant_time)
{
    const uint8_t k1[] = "0123456789abcdef", k2[] = "0123456789abcdeg";
    uint8_t a[RDMAX_MAC_LEN], b[RDMAX_MAC_LEN], c[RDMAX_MAC_LEN], d[RDMAX_MAC_LEN];

    cr_assert_eq(
        rdmax_auth_mac(k1, 16, "server", (const uint8_t *)"x", 1, (const uint8_t *)"y", 1, a), 0);
    cr_assert_eq(
        rdmax_auth_mac(k1, 16, "server", (const uint8_t *)"x", 1, (const uint8_t *)"y", 1, b), 0);
    cr_assert_eq(
        rdmax_auth_mac(k2, 16, "server", (const uint8_t *)"x", 1, (const uint8_t *)"y", 1, c), 0);
    cr_assert_eq(
        rdmax_auth_mac(k1, 16, "client", (const uint8_t *)"x", 1, (const uint8_t *)"y", 1, d), 0);
    cr_assert(rdmax_auth_equal(a, b));
    cr_assert(!rdmax_auth_equal(a, c));
    cr_assert(!rdmax_auth_equal(a, d));
}

/* Write data to a fresh private key file; returns its path (static buffer). */
static const char *key_file(const void *data, size_t len)
{
    static char path[64];
    int fd;

    strcpy(path, "/tmp/rdmax-psk-XXXXXX");
    fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, data, len), (ssize_t)len);
    close(fd);
    return path;
}

static int load(const char *path, size_t *n, char *err, size_t err_len)
{
    static uint8_t k[RDMAX_PSK_MAX];
    int r = rdmax_psk_load(path, k, sizeof(k), n, err, err_len);

    unlink(path);
    return r;
}

Test(auth, key_files_are_checked)
{
    char err[400];
    size_t n;
    const char *p;
    uint8_t bin[32];
    char hex[66];

    /* rdma-x keygen / openssl rand -hex 32: 64 hex digits, newline optional. */
    cr_assert_eq(getrandom(bin, sizeof(bin), 0), 32);
    for (int i = 0; i < 32; i++) {
        sprintf(hex + 2 * i, "%02x", bin[i]);
    }
    hex[64] = '\n';
    cr_assert_eq(load(key_file(hex, 65), &n, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(n, 64); /* the newline is not part of the key */
    cr_assert_eq(load(key_file(hex, 64), &n, err, sizeof(err)), 0, "%s", err);
    for (int i = 0; i < 64; i++) {
        hex[i] = (char)toupper((unsigned char)hex[i]);
    }
    cr_assert_eq(load(key_file(hex, 64), &n, err, sizeof(err)), 0, "%s", err);
    /* head -c 32 /dev/urandom */
    bin[31] = 0x5a; /* (a last 0x0a would be dropped, as it always was) */
    cr_assert_eq(load(key_file(bin, 32), &n, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(n, 32);

    /* Short, long, passphrases, patterns: refused, saying how to make a key. */
    const char *weak[] = {
        "short\n",
        "0123456789abcdef\n",                                               /* 16: was enough */
        "correct horse battery staple abc",                                 /* 32 printable */
        "0000000000000000000000000000000000000000000000000000000000000000", /* 64 hex */
        "0123456701234567012345670123456701234567012345670123456701234567",
        "a9d32994dc192ca17363250cdb304053e816563f29c14a091b2c62bac52c4603\r\n",
        "a9d32994dc192ca17363250cdb304053e816563f29c14a091b2c62bac52c460g",
        "a9d32994dc192ca17363250cdb304053e816563f29c14a091b2c62bac52c4603\n\n",
        "a9d32994dc192ca17363250cdb304053e816563f29c14a091b2c62bac52c4603a9d3",
        "",
    };
    for (size_t i = 0; i < sizeof(weak) / sizeof(weak[0]); i++) {
        cr_assert_eq(load(key_file(weak[i], strlen(weak[i])), &n, err, sizeof(err)), -EINVAL,
                     "accepted weak key %zu", i);
        cr_assert_not_null(strstr(err, "not a high-entropy key"), "%s", err);
        cr_assert_not_null(strstr(err, "rdma-x keygen >"), "%s", err);
        cr_assert_not_null(strstr(err, "head -c 32 /dev/urandom >"), "%s", err);
    }
    memset(bin, 7, sizeof(bin)); /* 32 binary bytes, all the same */
    cr_assert_eq(load(key_file(bin, 32), &n, err, sizeof(err)), -EINVAL);
    static uint8_t big[8192];
    cr_assert_eq(load(key_file(big, sizeof(big)), &n, err, sizeof(err)), -EINVAL);

    /* Readable by others, missing. */
    p = key_file(hex, 64);
    chmod(p, 0644);
    cr_assert_eq(load(p, &n, err, sizeof(err)), -EPERM);
    cr_assert_eq(load("/nonexistent/key", &n, err, sizeof(err)), -ENOENT);
}
