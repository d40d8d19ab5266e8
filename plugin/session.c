/*
 * Connection set-up, handshake, keep-alive and failure for both sides.
 */
#include "session.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "page-cache.h"

struct rdmax_session rdmax_s;

static atomic_flag failing = ATOMIC_FLAG_INIT;

double rdmax_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

const char *rdmax_wire_strerror(int err)
{
    switch (err) {
    case -ECONNRESET:
    case -EPIPE:
        return "connection closed by the peer";
    case -ETIMEDOUT:
        return "peer silent for too long";
    case -EBADMSG:
        return "frame checksum mismatch (corrupted on the wire, or a truncated frame)";
    case -EPROTO:
        return "bad frame header (corrupted on the wire, or not an rdma-x peer)";
    case -EKEYREJECTED:
        return "encrypted frame failed authentication (forged, replayed or corrupted)";
    case -ECONNREFUSED:
        return "connection refused";
    default:
        return strerror(-err);
    }
}

static void fail_alarm(int sig)
{
    _exit(1);
}

void rdmax_fail(const char *fmt, ...)
{
    char reason[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    if (atomic_flag_test_and_set(&failing)) {
        /* Another thread is already failing; it will exit. */
        for (;;) {
            pause();
        }
    }
    /* QEMU first: closing our ends makes it see the failure at once. */
    close(STDIN_FILENO);
    close(STDOUT_FILENO);
    fprintf(stderr, "rdma-x: error: %s\n", reason);
    rdmax_progress_final();
    rdmax_stats_write(reason);
    /* Telling the peer is best effort: never let it hold the exit (nor
     * change its status: the alarm exits 1 too). */
    signal(SIGALRM, fail_alarm);
    alarm(2);
    if (rdmax_s.ctrl.conn) {
        struct rdmax_conn *c = rdmax_s.ctrl.conn;
        double until = rdmax_now() + 1.0;
        static uint8_t sink[4096];

        if (rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_ERROR, 0, 0, reason, strlen(reason)) == 0) {
            /*
             * Let the reason arrive. Closing a TCP socket with unread input
             * sends a reset, and a reset makes the peer's kernel drop what
             * its reader has not read yet: our ERROR too, and the peer
             * would only say "connection closed". So read and drop what the
             * peer still sends until it closes (it does once it has read
             * the ERROR), for at most a second.
             */
            int r = 0;
            while ((r == 0 || r == -ETIMEDOUT) && rdmax_now() < until) {
                r = c->ops->recv(c, sink, sizeof(sink), 100);
            }
        }
        c->ops->shutdown(c);
    }
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        if (rdmax_s.lane[i].conn) {
            rdmax_s.lane[i].conn->ops->shutdown(rdmax_s.lane[i].conn);
        }
    }
    _exit(1);
}

static void hello_fill(struct rdmax_hello *h, uint16_t role, uint16_t lane)
{
    memset(h, 0, sizeof(*h));
    h->magic = RDMAX_WIRE_MAGIC;
    h->version = RDMAX_WIRE_VERSION;
    h->role = role;
    h->lane = lane;
    h->lanes = (uint16_t)rdmax_s.nlanes;
    h->page_size = RDMAX_PAGE_SIZE;
    h->session = rdmax_s.session_id;
    h->features = rdmax_s.features;
    h->cache_bytes = rdmax_s.codec.cache_bytes;
    h->zstd_level = rdmax_s.codec.zstd_level;
    /* Fresh per connection: proofs and keys can never be replayed. */
    if (getrandom(h->nonce, sizeof(h->nonce), 0) != (ssize_t)sizeof(h->nonce)) {
        rdmax_fail("no randomness for the handshake nonce: %s", strerror(errno));
    }
}

void rdmax_session_init(void)
{
    char err[600];

    if (rdmax_s.o.psk_file) {
        if (rdmax_psk_load(rdmax_s.o.psk_file, rdmax_s.psk, sizeof(rdmax_s.psk), &rdmax_s.psk_len,
                           err, sizeof(err)) < 0) {
            rdmax_fail("%s", err);
        }
        rdmax_s.features |= RDMAX_FEAT_PSK;
    }
    if (rdmax_s.o.encrypt) {
        rdmax_s.features |= RDMAX_FEAT_ENCRYPT;
    }
}

/*
 * Why the peer's features differ from ours, in words that name each side
 * (the same text is shown on both hosts); NULL when they agree.
 */
static const char *feature_mismatch(uint32_t theirs)
{
    uint32_t snd = rdmax_s.o.sender ? rdmax_s.features : theirs;
    uint32_t rcv = rdmax_s.o.sender ? theirs : rdmax_s.features;

    if ((snd ^ rcv) & RDMAX_FEAT_PSK) {
        return (rcv & RDMAX_FEAT_PSK)
                   ? "authentication required: the receiver has a pre-shared key (--psk-file), "
                     "the sender has none"
                   : "the sender has a pre-shared key (--psk-file), the receiver has none: "
                     "give both the same key";
    }
    if ((snd ^ rcv) & RDMAX_FEAT_ENCRYPT) {
        return (rcv & RDMAX_FEAT_ENCRYPT)
                   ? "encryption mismatch: the receiver requires --encrypt, the sender did not "
                     "ask for it"
                   : "encryption mismatch: the sender asked for --encrypt, the receiver does "
                     "not have it";
    }
    return NULL;
}

/* The handshake transcript a proof covers: both HELLOs with the proof zeroed. */
static int auth_proof(const char *label, const uint8_t client[RDMAX_HELLO_LEN],
                      const uint8_t server[RDMAX_HELLO_LEN], uint8_t out[RDMAX_MAC_LEN])
{
    uint8_t c[RDMAX_HELLO_LEN], s[RDMAX_HELLO_LEN];

    memcpy(c, client, sizeof(c));
    memcpy(s, server, sizeof(s));
    memset(c + RDMAX_HELLO_MAC, 0, RDMAX_MAC_LEN);
    memset(s + RDMAX_HELLO_MAC, 0, RDMAX_MAC_LEN);
    return rdmax_auth_mac(rdmax_s.psk, rdmax_s.psk_len, label, c, sizeof(c), s, sizeof(s), out);
}

/*
 * How long a new connection has for its whole handshake on the listener
 * (HELLO, then AUTH with a PSK), one absolute deadline from its accept. A
 * real sender answers at once (two round trips); handshakes are served
 * concurrently, so a silent or dripping client holds only its own slot,
 * and only this long.
 */
#define HANDSHAKE_MS 2000

/* Milliseconds left until deadline (seconds, rdmax_now), at least 0. */
static int ms_left(double deadline)
{
    double ms = (deadline - rdmax_now()) * 1000.0;

    return ms > 0 ? (int)ms + 1 : 0;
}

#define AUTH_LABEL_SERVER "rdma-x v2 server proof"
#define AUTH_LABEL_CLIENT "rdma-x v2 client proof"

/* --encrypt: one key per direction of this connection, from the PSK and both nonces. */
static int crypt_setup(struct rdmax_wire *w, const uint8_t *client_nonce,
                       const uint8_t *server_nonce, bool client)
{
    uint8_t salt[2 * RDMAX_NONCE_LEN], kc[RDMAX_KEY_LEN], ks[RDMAX_KEY_LEN];
    struct rdmax_crypt *tx = NULL, *rx = NULL;
    int r;

    memcpy(salt, client_nonce, RDMAX_NONCE_LEN);
    memcpy(salt + RDMAX_NONCE_LEN, server_nonce, RDMAX_NONCE_LEN);
    r = rdmax_crypt_derive(rdmax_s.psk, rdmax_s.psk_len, salt, sizeof(salt),
                           "rdma-x v2 client to server", kc);
    if (r == 0) {
        r = rdmax_crypt_derive(rdmax_s.psk, rdmax_s.psk_len, salt, sizeof(salt),
                               "rdma-x v2 server to client", ks);
    }
    if (r == 0) {
        r = rdmax_crypt_create(client ? kc : ks, true, &tx);
    }
    if (r == 0) {
        r = rdmax_crypt_create(client ? ks : kc, false, &rx);
    }
    OPENSSL_cleanse(kc, sizeof(kc));
    OPENSSL_cleanse(ks, sizeof(ks));
    if (r < 0) {
        rdmax_crypt_destroy(tx);
        return r;
    }
    rdmax_wire_crypt_start(w, tx, rx);
    return 0;
}

/*
 * Read the peer's handshake reply: HELLO_ACK, or ERROR with its reason.
 * raw gets the reply's bytes (for the proofs).
 */
static int hello_read(struct rdmax_wire *w, struct rdmax_hello *h, uint8_t raw[RDMAX_HELLO_LEN],
                      char *err, size_t err_len)
{
    uint8_t buf[512];
    struct rdmax_frame_hdr fh;
    int r = rdmax_wire_recv(w, &fh, buf, sizeof(buf) - 1, rdmax_s.o.timeout_ms);

    if (r < 0) {
        snprintf(err, err_len, "handshake with %s: %s", w->conn->peer, rdmax_wire_strerror(r));
        return r;
    }
    if (fh.type == RDMAX_F_ERROR) {
        char txt[RDMAX_PEER_TEXT_BUF];
        snprintf(err, err_len, "peer refused: %s", rdmax_peer_text(txt, sizeof(txt), buf, fh.len));
        return -ECONNREFUSED;
    }
    if (fh.type != RDMAX_F_HELLO_ACK) {
        snprintf(err, err_len, "handshake with %s: got %s frame", w->conn->peer,
                 rdmax_frame_type_name(fh.type));
        return -EPROTO;
    }
    r = rdmax_hello_decode(buf, fh.len, h, err, err_len);
    if (r == 0) {
        memcpy(raw, buf, RDMAX_HELLO_LEN);
    }
    return r;
}

static void connect_one(struct rdmax_wire *w, const char *host, const char *port, uint16_t role,
                        uint16_t lane, struct rdmax_conn *pre)
{
    struct rdmax_conn *c;
    struct rdmax_hello h, peer;
    uint8_t mine[RDMAX_HELLO_LEN], theirs[RDMAX_HELLO_LEN], mac[RDMAX_MAC_LEN];
    struct rdmax_frame_hdr fh;
    uint8_t buf[512];
    char err[600], who[300];
    const char *why;
    int r;

    /* Messages name the connection: "dst:7070", or "dst:7070 (lane 3)". */
    if (role == RDMAX_ROLE_LANE) {
        snprintf(who, sizeof(who), "%s:%s (lane %u)", host, port, lane);
    } else {
        snprintf(who, sizeof(who), "%s:%s", host, port);
    }
    c = pre;
    r = c ? 0 : rdmax_s.tp->connect(host, port, &rdmax_s.topts, &c);
    if (r < 0) {
        rdmax_fail("cannot connect to %s over %s: %s", who, rdmax_s.tp->name, strerror(-r));
    }
    rdmax_wire_init(w, c);
    hello_fill(&h, role, lane);
    rdmax_hello_encode(mine, &h);
    r = rdmax_wire_send(w, RDMAX_F_HELLO, 0, lane, mine, sizeof(mine));
    if (r < 0) {
        rdmax_fail("handshake with %s: %s", who, rdmax_wire_strerror(r));
    }
    if (hello_read(w, &peer, theirs, err, sizeof(err)) < 0) {
        rdmax_fail("%s", err);
    }
    if (peer.session != rdmax_s.session_id) {
        rdmax_fail("handshake with %s: peer answered for another migration", who);
    }
    why = feature_mismatch(peer.features);
    if (why) {
        rdmax_fail("handshake with %s: %s", who, why);
    }
    if (!(rdmax_s.features & RDMAX_FEAT_PSK)) {
        return;
    }
    /* The receiver proves itself first, so we never answer an impostor. */
    if (auth_proof(AUTH_LABEL_SERVER, mine, theirs, mac) < 0) {
        rdmax_fail("computing the authentication proof failed");
    }
    if (!rdmax_auth_equal(mac, peer.mac)) {
        rdmax_fail("authentication failed: the receiver at %s:%s does not hold this "
                   "pre-shared key (wrong --psk-file?)",
                   host, port);
    }
    if (auth_proof(AUTH_LABEL_CLIENT, mine, theirs, mac) < 0) {
        rdmax_fail("computing the authentication proof failed");
    }
    r = rdmax_wire_send(w, RDMAX_F_AUTH, 0, lane, mac, sizeof(mac));
    if (r < 0) {
        rdmax_fail("handshake with %s: %s", who, rdmax_wire_strerror(r));
    }
    r = rdmax_wire_recv(w, &fh, buf, sizeof(buf) - 1, rdmax_s.o.timeout_ms);
    if (r < 0) {
        rdmax_fail("handshake with %s: %s", who, rdmax_wire_strerror(r));
    }
    if (fh.type == RDMAX_F_ERROR) {
        char txt[RDMAX_PEER_TEXT_BUF];
        rdmax_fail("peer refused: %s", rdmax_peer_text(txt, sizeof(txt), buf, fh.len));
    }
    if (fh.type != RDMAX_F_AUTH_OK || fh.len != 0) {
        rdmax_fail("handshake with %s: got %s frame instead of AUTH_OK", who,
                   rdmax_frame_type_name(fh.type));
    }
    if ((rdmax_s.features & RDMAX_FEAT_ENCRYPT) && crypt_setup(w, h.nonce, peer.nonce, true) < 0) {
        rdmax_fail("setting up encryption with %s failed", who);
    }
}

/*
 * --transport auto on the sender: RDMA when a device here reaches the
 * receiver over RDMA (tried for a few seconds), else TCP; says which. The
 * lanes then use what the control connection used. Returns the connected
 * control connection, or NULL to connect it over rdmax_s.tp as usual.
 */
static struct rdmax_conn *auto_connect(const char *host, const char *port)
{
    const struct rdmax_transport_ops *rdma = rdmax_transport_find("rdma");
    struct rdmax_transport_opts o = rdmax_s.topts;
    struct rdmax_conn *c = NULL;
    int r;

    if (!rdmax_s.auto_transport) {
        return NULL;
    }
    if (!rdma) {
        return NULL; /* built without RDMA: tcp is the only choice */
    }
    if (o.connect_timeout_ms > 3000) {
        o.connect_timeout_ms = 3000;
    }
    rdmax_log_quiet(true);
    r = rdma->connect(host, port, &o, &c);
    rdmax_log_quiet(false);
    if (r < 0) {
        /* A host without any RDMA device is the common case: no need to say it. */
        if (r != -ENODEV) {
            fprintf(stderr, "rdma-x: note: transport auto: tcp (no RDMA path to %s:%s: %s)\n", host,
                    port, strerror(-r));
        }
        return NULL;
    }
    fprintf(stderr, "rdma-x: note: transport auto: rdma\n");
    rdmax_s.tp = rdma;
    return c;
}

struct lane_connect {
    const char *host, *port;
    uint16_t lane;
};

static void *lane_connect_main(void *arg)
{
    const struct lane_connect *lc = arg;

    connect_one(&rdmax_s.lane[lc->lane], lc->host, lc->port, RDMAX_ROLE_LANE, lc->lane, NULL);
    return NULL;
}

void rdmax_session_connect(void)
{
    char host[256], port[32], err[200];

    rdmax_session_init();
    if (rdmax_addr_split(rdmax_s.o.addr, host, sizeof(host), port, sizeof(port), err, sizeof(err)) <
        0) {
        rdmax_fail("%s", err);
    }
    if (getrandom(&rdmax_s.session_id, sizeof(rdmax_s.session_id), 0) !=
        sizeof(rdmax_s.session_id)) {
        rdmax_s.session_id = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    }
    connect_one(&rdmax_s.ctrl, host, port, RDMAX_ROLE_CONTROL, 0, auto_connect(host, port));
    /*
     * The lanes connect in parallel, one thread each: set-up costs a few
     * round trips in all, not per lane (64 lanes x 3 round trips with a PSK
     * at 50 ms was ~10 s), and each lane's waits are its own --timeout.
     */
    {
        pthread_t t[RDMAX_LANES_MAX];
        struct lane_connect lc[RDMAX_LANES_MAX];
        pthread_attr_t a;

        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256u << 10);
        for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
            lc[i] = (struct lane_connect){host, port, (uint16_t)i};
            if (pthread_create(&t[i], &a, lane_connect_main, &lc[i]) != 0) {
                rdmax_fail("cannot start a thread to connect lane %u", i);
            }
        }
        pthread_attr_destroy(&a);
        for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
            pthread_join(t[i], NULL);
        }
    }
}

/* Refuse a connection with a reason, without letting it stall the listener. */
static void refuse(struct rdmax_conn *c, const char *reason)
{
    struct rdmax_wire w;

    uint8_t b;
    unsigned n = 0;

    fprintf(stderr, "rdma-x: refused connection from %s: %s\n", c->peer, reason);
    rdmax_wire_init(&w, c);
    rdmax_wire_send(&w, RDMAX_F_ERROR, 0, 0, reason, strlen(reason));
    /* Closing with unread input sends a TCP reset, which can destroy the
     * reason before the client reads it: take what already came. */
    while (n < 65536 && c->ops->recv(c, &b, 1, 0) == 0) {
        n++;
    }
    rdmax_wire_destroy(&w);
}

/*
 * Answer a client's HELLO (raw bytes in, decoded h) with our HELLO_ACK
 * and, with a PSK, check its proof. 0, or -errno with the reason in err
 * (the caller refuses the connection). Nothing is committed here.
 */
static int server_hello(struct rdmax_wire *w, const uint8_t in[RDMAX_HELLO_LEN],
                        const struct rdmax_hello *h, uint8_t nonce[RDMAX_NONCE_LEN], double deadline,
                        char *err, size_t err_len)
{
    struct rdmax_hello me;
    uint8_t out[RDMAX_HELLO_LEN], mac[RDMAX_MAC_LEN], buf[512];
    struct rdmax_frame_hdr fh;
    int r;

    /* Echo the sender's parameters: the receiver adopts them. */
    hello_fill(&me, h->role, h->lane);
    me.lanes = h->lanes;
    me.session = h->session;
    me.cache_bytes = h->cache_bytes;
    me.zstd_level = h->zstd_level;
    memcpy(nonce, me.nonce, RDMAX_NONCE_LEN);
    rdmax_hello_encode(out, &me);
    if (rdmax_s.features & RDMAX_FEAT_PSK) {
        if (auth_proof(AUTH_LABEL_SERVER, in, out, mac) < 0) {
            snprintf(err, err_len, "computing the authentication proof failed");
            return -EIO;
        }
        memcpy(out + RDMAX_HELLO_MAC, mac, sizeof(mac));
    }
    r = rdmax_wire_send(w, RDMAX_F_HELLO_ACK, 0, h->role == RDMAX_ROLE_LANE ? h->lane : 0, out,
                        sizeof(out));
    if (r < 0) {
        snprintf(err, err_len, "handshake: %s", rdmax_wire_strerror(r));
        return r;
    }
    if (!(rdmax_s.features & RDMAX_FEAT_PSK)) {
        return 0;
    }
    r = rdmax_wire_recv(w, &fh, buf, sizeof(buf) - 1, ms_left(deadline));
    if (r == 0 && fh.type == RDMAX_F_ERROR) {
        /* The sender checked our proof first and gave up: say why. */
        char txt[RDMAX_PEER_TEXT_BUF];
        snprintf(err, err_len, "sender gave up: %s", rdmax_peer_text(txt, sizeof(txt), buf, fh.len));
        return -EACCES;
    }
    if (r < 0 || fh.type != RDMAX_F_AUTH || fh.len != RDMAX_MAC_LEN) {
        snprintf(err, err_len, "authentication failed: no proof from the sender (%s)",
                 r < 0 ? rdmax_wire_strerror(r) : rdmax_frame_type_name(fh.type));
        return r < 0 ? r : -EACCES;
    }
    if (auth_proof(AUTH_LABEL_CLIENT, in, out, mac) < 0) {
        snprintf(err, err_len, "computing the authentication proof failed");
        return -EIO;
    }
    if (!rdmax_auth_equal(mac, buf)) {
        snprintf(err, err_len,
                 "authentication failed: the sender does not hold this receiver's "
                 "pre-shared key (wrong --psk-file?)");
        return -EACCES;
    }
    return 0;
}

/* The client is accepted: AUTH_OK with a PSK, then encryption starts. */
static void server_accept_ok(struct rdmax_wire *w, const uint8_t *client_nonce,
                             const uint8_t *server_nonce, uint16_t channel)
{
    int r;

    if (!(rdmax_s.features & RDMAX_FEAT_PSK)) {
        return;
    }
    r = rdmax_wire_send(w, RDMAX_F_AUTH_OK, 0, channel, NULL, 0);
    if (r < 0) {
        rdmax_fail("handshake with %s: %s", w->conn->peer, rdmax_wire_strerror(r));
    }
    if ((rdmax_s.features & RDMAX_FEAT_ENCRYPT) &&
        crypt_setup(w, client_nonce, server_nonce, false) < 0) {
        rdmax_fail("setting up encryption with %s failed", w->conn->peer);
    }
}

/*
 * --transport auto on the receiver: listen on RDMA too when a device here
 * has the address, and take the migration over whichever transport its
 * control connection arrives on.
 */
static struct rdmax_listener *alt_l;
static const struct rdmax_transport_ops *alt_tp;
static bool last_from_alt; /* the last accepted connection came over alt_tp */

static void auto_listen(const char *host, const char *port)
{
    const struct rdmax_transport_ops *rdma = rdmax_transport_find("rdma");
    int r;

    if (!rdmax_s.auto_transport) {
        return;
    }
    if (!rdma) {
        return;
    }
    rdmax_log_quiet(true);
    r = rdma->listen(host, port, &rdmax_s.topts, &alt_l);
    rdmax_log_quiet(false);
    if (r < 0) {
        if (r != -ENODEV) {
            fprintf(stderr, "rdma-x: note: transport auto: tcp only (no RDMA device for %s: %s)\n",
                    host, strerror(-r));
        }
        alt_l = NULL;
        return;
    }
    alt_tp = rdma;
}

/*
 * While no migration has arrived, the destination QEMU may give up (quit,
 * cancel): its end of our stdout then closes, and QEMU waits for us to exit.
 */
static void check_qemu_still_there(void)
{
    struct pollfd pfd = {.fd = STDOUT_FILENO, .events = 0};

    if (poll(&pfd, 1, 0) == 1 && (pfd.revents & (POLLERR | POLLHUP))) {
        rdmax_fail("the destination QEMU closed its side before a sender connected");
    }
}

/* Accept on the listener, or on either of the two in auto mode. */
static int accept_any(struct rdmax_listener **l, int wait_ms, struct rdmax_conn **c)
{
    double end = wait_ms < 0 ? 0 : rdmax_now() + wait_ms / 1000.0;

    last_from_alt = false;
    if (!alt_l) {
        int r;
        do {
            check_qemu_still_there();
            r = rdmax_s.tp->accept(*l, wait_ms < 0 ? 500 : wait_ms, c);
        } while (r == -ETIMEDOUT && wait_ms < 0);
        return r;
    }
    for (;;) {
        check_qemu_still_there();
        int r = rdmax_s.tp->accept(*l, 50, c);
        if (r != -ETIMEDOUT) {
            return r;
        }
        r = alt_tp->accept(alt_l, 50, c);
        if (r != -ETIMEDOUT) {
            last_from_alt = r == 0;
            return r;
        }
        if (wait_ms >= 0 && rdmax_now() >= end) {
            return -ETIMEDOUT;
        }
    }
}

/*
 * The control connection is in: the migration uses its transport, the lanes
 * follow it there, and the other transport's listener goes.
 */
static void auto_settle(struct rdmax_listener **l)
{
    if (!alt_l) {
        return;
    }
    if (last_from_alt) {
        rdmax_s.tp->listener_close(*l);
        *l = alt_l;
        rdmax_s.tp = alt_tp;
    } else {
        alt_tp->listener_close(alt_l);
    }
    alt_l = NULL;
    fprintf(stderr, "rdma-x: note: transport auto: %s\n", rdmax_s.tp->name);
}

/*
 * The receiver's accept loop. Every accepted connection gets a handshake
 * thread and one absolute deadline (HANDSHAKE_MS); the main thread only
 * accepts, enforces the deadlines and reaps. At most PENDING_UNAUTH
 * handshakes run at once, plus one per lane still due once the control
 * connection is in (the sender connects its lanes in parallel); when full,
 * the oldest unauthenticated one is dropped for the newcomer. So a silent,
 * dripping or garbage client holds one slot for at most HANDSHAKE_MS and
 * never the listener, and a flood costs bounded threads, fds and memory.
 * Commits (control connection, lanes) happen under acc.mu, only after the
 * proofs check.
 */
#define PENDING_UNAUTH 16
#define PENDING_MAX (PENDING_UNAUTH + RDMAX_LANES_MAX)
#define HANDSHAKE_GRACE_S 0.5 /* after its deadline, the main thread cuts a handshake off */
#define HANDSHAKE_STACK (256u << 10)

struct pending {
    struct rdmax_conn *c; /* until the thread commits or refuses it (acc.mu) */
    pthread_t thread;
    double started, deadline; /* rdmax_now() */
    bool used;                /* main thread only */
    bool evicted, expired;    /* why the main thread cut it off (acc.mu) */
    bool closing;             /* cut off because the migration is complete (acc.mu) */
    bool hello_ok;            /* sent a valid HELLO, now in the proofs (acc.mu) */
    _Atomic bool done;
};

static struct {
    pthread_mutex_t mu;
    bool have_ctrl;
    unsigned have_lanes;
    const struct rdmax_transport_ops *ctrl_tp; /* the lanes must come over it too */
    uint64_t cache_cap;
    double lane_deadline; /* --timeout after the control connection or the last lane */
} acc = {.mu = PTHREAD_MUTEX_INITIALIZER};

static struct pending pend[PENDING_MAX];

/*
 * May a connection with this HELLO become part of the migration? Checked
 * before the proofs (to refuse early) and again at the commit. acc.mu held.
 */
static int admit(const struct rdmax_conn *c, const struct rdmax_hello *h, bool *lane_mismatch,
                 char *err, size_t err_len)
{
    *lane_mismatch = false;
    if (h->role == RDMAX_ROLE_CONTROL) {
        if (acc.have_ctrl) {
            snprintf(err, err_len, "a migration is already in progress");
            return -EBUSY;
        }
        if (h->cache_bytes > (64ull << 30) || h->cache_bytes * h->lanes > acc.cache_cap) {
            snprintf(err, err_len,
                     "page cache of %llu MiB x %u lanes is above this receiver's cap of "
                     "%llu MiB (recv --cache-max, or send --cache-size)",
                     (unsigned long long)(h->cache_bytes >> 20), h->lanes,
                     (unsigned long long)(acc.cache_cap >> 20));
            return -EINVAL;
        }
        if (rdmax_s.o.lanes && h->lanes != rdmax_s.o.lanes) {
            *lane_mismatch = true;
            snprintf(err, err_len, "lane count mismatch: sender %u, receiver %u", h->lanes,
                     rdmax_s.o.lanes);
        }
        return 0;
    }
    if (!acc.have_ctrl || h->session != rdmax_s.session_id) {
        snprintf(err, err_len, "lane connection for no migration in progress");
        return -EINVAL;
    }
    if (h->lanes != rdmax_s.nlanes) {
        snprintf(err, err_len, "lane connection for %u lanes, migration has %u", h->lanes,
                 rdmax_s.nlanes);
        return -EINVAL;
    }
    if (c->ops != acc.ctrl_tp) {
        snprintf(err, err_len, "lane connection over %s, the migration came over %s",
                 c->ops->name, acc.ctrl_tp->name);
        return -EINVAL;
    }
    if (rdmax_s.lane[h->lane].conn) {
        snprintf(err, err_len, "lane connected twice");
        return -EINVAL;
    }
    return 0;
}

/* A sender with the wrong --lanes: tell it, and stop. */
static __attribute__((noreturn)) void lane_mismatch_fail(struct pending *p, struct rdmax_wire *w,
                                                         struct rdmax_conn *c, const char *err)
{
    pthread_mutex_lock(&acc.mu);
    p->c = NULL;
    pthread_mutex_unlock(&acc.mu);
    w->conn = NULL;
    rdmax_wire_destroy(w);
    refuse(c, err);
    rdmax_fail("%s", err);
}

static void *handshake_main(void *arg)
{
    struct pending *p = arg;
    struct rdmax_conn *c = p->c;
    struct rdmax_wire w;
    struct rdmax_hello h;
    uint8_t in[RDMAX_HELLO_LEN + 16], nonce[RDMAX_NONCE_LEN];
    struct rdmax_frame_hdr fh;
    char err[700], why_auth[600];
    const char *why;
    bool lane_mismatch = false, evicted, expired, closing;
    int r;

    rdmax_wire_init(&w, c);
    r = rdmax_wire_recv(&w, &fh, in, sizeof(in), ms_left(p->deadline));
    if (r < 0 || fh.type != RDMAX_F_HELLO) {
        snprintf(err, sizeof(err), "no valid rdma-x handshake (%s)",
                 r < 0 ? rdmax_wire_strerror(r) : rdmax_frame_type_name(fh.type));
        goto refuse;
    }
    r = rdmax_hello_decode(in, fh.len, &h, err, sizeof(err));
    if (r < 0) {
        if (r == -EPROTONOSUPPORT) {
            fprintf(stderr, "rdma-x: note: upgrade both hosts to the same rdma-x version\n");
        }
        goto refuse;
    }
    why = feature_mismatch(h.features);
    if (why) {
        snprintf(err, sizeof(err), "%s", why);
        goto refuse;
    }
    pthread_mutex_lock(&acc.mu);
    r = admit(c, &h, &lane_mismatch, err, sizeof(err));
    p->hello_ok = r == 0;
    pthread_mutex_unlock(&acc.mu);
    if (r < 0) {
        goto refuse;
    }
    if (lane_mismatch && !(rdmax_s.features & RDMAX_FEAT_PSK)) {
        lane_mismatch_fail(p, &w, c, err);
    }
    r = server_hello(&w, in, &h, nonce, p->deadline, why_auth, sizeof(why_auth));
    if (r < 0) {
        snprintf(err, sizeof(err), "%s", why_auth);
        goto refuse;
    }
    if (lane_mismatch) {
        /* Authenticated, so a real sender with the wrong --lanes: stop. */
        lane_mismatch_fail(p, &w, c, err);
    }
    pthread_mutex_lock(&acc.mu);
    r = admit(c, &h, &lane_mismatch, err, sizeof(err));
    if (r == 0) {
        struct rdmax_wire *into;
        p->c = NULL; /* the migration's now: never cut off */
        if (h.role == RDMAX_ROLE_CONTROL) {
            rdmax_s.session_id = h.session;
            rdmax_s.nlanes = h.lanes;
            rdmax_s.codec.cache_bytes = h.cache_bytes;
            rdmax_s.codec.zstd_level = h.zstd_level;
            rdmax_s.ctrl = w;
            into = &rdmax_s.ctrl;
            acc.have_ctrl = true;
            acc.ctrl_tp = c->ops;
        } else {
            rdmax_s.lane[h.lane] = w;
            into = &rdmax_s.lane[h.lane];
            acc.have_lanes++;
        }
        /* The lanes' deadline runs from what arrived last, not from the start. */
        acc.lane_deadline = rdmax_now() + rdmax_s.o.timeout_ms / 1000.0;
        pthread_mutex_unlock(&acc.mu);
        server_accept_ok(into, h.nonce, nonce, h.role == RDMAX_ROLE_LANE ? h.lane : 0);
        atomic_store(&p->done, true);
        return NULL;
    }
    pthread_mutex_unlock(&acc.mu);
refuse:
    pthread_mutex_lock(&acc.mu);
    p->c = NULL; /* from here the main thread leaves c alone */
    evicted = p->evicted;
    closing = p->closing;
    expired = p->expired || (r == -ETIMEDOUT && ms_left(p->deadline) == 0);
    pthread_mutex_unlock(&acc.mu);
    if (closing) {
        snprintf(err, sizeof(err), "a migration is already in progress");
    } else if (evicted) {
        snprintf(err, sizeof(err),
                 "dropped for a newer connection (%u handshakes at once, the oldest goes first)",
                 PENDING_UNAUTH);
    } else if (expired) {
        snprintf(err, sizeof(err), "no complete rdma-x handshake within %d s",
                 HANDSHAKE_MS / 1000);
    }
    /* refuse() owns the connection from here; the wire holds no crypto yet. */
    w.conn = NULL;
    rdmax_wire_destroy(&w);
    refuse(c, err);
    atomic_store(&p->done, true);
    return NULL;
}

/* Cut every handshake off that ran past its deadline. acc.mu held. */
static void expire_locked(double now)
{
    for (unsigned i = 0; i < PENDING_MAX; i++) {
        struct pending *p = &pend[i];
        if (p->used && p->c && !p->expired && now > p->deadline + HANDSHAKE_GRACE_S) {
            p->expired = true;
            p->c->ops->shutdown(p->c);
        }
    }
}

/* Join the handshake threads that ended; returns how many still run. Main thread. */
static unsigned reap(void)
{
    unsigned n = 0;

    for (unsigned i = 0; i < PENDING_MAX; i++) {
        if (pend[i].used && atomic_load(&pend[i].done)) {
            pthread_join(pend[i].thread, NULL);
            pend[i].used = false;
        }
        n += pend[i].used;
    }
    return n;
}

/*
 * A free slot for a new connection, at most limit in use: when full, the
 * oldest handshake not yet authenticated is cut off (and joined) for it,
 * preferring one that has not even sent a valid HELLO (a real sender sends
 * its HELLO at once, silent and dripping clients never complete one).
 * NULL when every slot holds an authenticated connection.
 */
static struct pending *take_slot(unsigned limit)
{
    struct pending *oldest = NULL;

    if (reap() < limit) {
        for (unsigned i = 0; i < PENDING_MAX; i++) {
            if (!pend[i].used) {
                return &pend[i];
            }
        }
    }
    pthread_mutex_lock(&acc.mu);
    for (unsigned i = 0; i < PENDING_MAX; i++) {
        struct pending *p = &pend[i];
        if (p->used && p->c && !p->evicted &&
            (!oldest || p->hello_ok < oldest->hello_ok ||
             (p->hello_ok == oldest->hello_ok && p->started < oldest->started))) {
            oldest = p;
        }
    }
    if (oldest) {
        oldest->evicted = true;
        oldest->c->ops->shutdown(oldest->c);
    }
    pthread_mutex_unlock(&acc.mu);
    if (!oldest) {
        return NULL;
    }
    pthread_join(oldest->thread, NULL);
    oldest->used = false;
    return oldest;
}

static void handshake_start(struct rdmax_conn *c, unsigned limit)
{
    struct pending *p = take_slot(limit);
    pthread_attr_t a;

    if (!p) {
        refuse(c, "too many connections at once");
        return;
    }
    memset(p, 0, sizeof(*p));
    p->c = c;
    p->used = true;
    p->started = rdmax_now();
    p->deadline = p->started + HANDSHAKE_MS / 1000.0;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, HANDSHAKE_STACK);
    if (pthread_create(&p->thread, &a, handshake_main, p) != 0) {
        p->used = false;
        refuse(c, "receiver out of threads");
    }
    pthread_attr_destroy(&a);
}

void rdmax_session_accept(void)
{
    char host[256], port[32], err[700];
    struct rdmax_listener *l;
    bool settled = false;
    unsigned accept_errors = 0;
    int r;

    rdmax_session_init();
    acc.cache_cap = rdmax_s.o.cache_max ? rdmax_s.o.cache_max : rdmax_page_cache_default_cap();
    if (rdmax_addr_split(rdmax_s.o.addr, host, sizeof(host), port, sizeof(port), err, sizeof(err)) <
        0) {
        rdmax_fail("%s", err);
    }
    r = rdmax_s.tp->listen(host, port, &rdmax_s.topts, &l);
    if (r < 0) {
        rdmax_fail("cannot listen on %s:%s over %s: %s", host, port, rdmax_s.tp->name,
                   strerror(-r));
    }
    auto_listen(host, port);
    for (;;) {
        struct rdmax_conn *c;
        bool have_ctrl;
        unsigned have_lanes, nlanes;
        double lane_deadline, now = rdmax_now();

        pthread_mutex_lock(&acc.mu);
        expire_locked(now);
        have_ctrl = acc.have_ctrl;
        have_lanes = acc.have_lanes;
        nlanes = rdmax_s.nlanes;
        lane_deadline = acc.lane_deadline;
        pthread_mutex_unlock(&acc.mu);
        reap();
        if (have_ctrl && !settled) {
            /* The control connection is in: the migration uses its transport. */
            last_from_alt = alt_l && acc.ctrl_tp == alt_tp;
            auto_settle(&l);
            settled = true;
        }
        if (have_ctrl && have_lanes == nlanes) {
            break;
        }
        if (have_ctrl && now > lane_deadline) {
            rdmax_fail("only %u of %u lane connections arrived (none for %d s)", have_lanes,
                       nlanes, rdmax_s.o.timeout_ms / 1000);
        }
        /*
         * Short waits: the deadlines above are checked between them, and a
         * handshake that completes in its thread is seen within 5 ms (at
         * 100 ms, the last lane's commit cost every migration ~100 ms).
         */
        bool busy = have_ctrl;
        for (unsigned i = 0; i < PENDING_MAX && !busy; i++) {
            busy = pend[i].used && !atomic_load(&pend[i].done);
        }
        r = accept_any(&l, busy ? 5 : 100, &c);
        if (r == -ETIMEDOUT) {
            continue;
        }
        if (r < 0) {
            /* That one connection failed (or fds ran out for a moment): keep listening. */
            fprintf(stderr, "rdma-x: note: accept on %s: %s\n", rdmax_s.o.addr, strerror(-r));
            if (++accept_errors > 100) {
                rdmax_fail("accept on %s keeps failing: %s", rdmax_s.o.addr, strerror(-r));
            }
            usleep(20 * 1000);
            continue;
        }
        accept_errors = 0;
        handshake_start(c, have_ctrl ? PENDING_UNAUTH + (nlanes - have_lanes) : PENDING_UNAUTH);
    }
    /* One migration per process: nobody else may connect now. */
    rdmax_s.tp->listener_close(l);
    pthread_mutex_lock(&acc.mu);
    for (unsigned i = 0; i < PENDING_MAX; i++) {
        if (pend[i].used && pend[i].c) {
            pend[i].closing = true;
            pend[i].c->ops->shutdown(pend[i].c);
        }
    }
    pthread_mutex_unlock(&acc.mu);
    for (unsigned i = 0; i < PENDING_MAX; i++) {
        if (pend[i].used) {
            pthread_join(pend[i].thread, NULL);
            pend[i].used = false;
        }
    }
}

/* Several keep-alives per --timeout, so one late one is no failure. */
static int keepalive_ms(void)
{
    int ms = rdmax_s.o.timeout_ms / 4;

    return ms > 1000 ? 1000 : ms < 100 ? 100 : ms;
}

/*
 * Sender: keep-alives on lane arg too, so the receiver can fail a lane
 * that stays silent for --timeout (a blackholed TCP flow, an ECMP member)
 * instead of waiting forever. One thread per lane: a lane blocked in a
 * send (back-pressure, a dead path) delays only its own keep-alives, and
 * data flowing there is liveness enough. Errors are left to the lane's
 * own thread and to the receiver (a lane ends, with a reset, once the
 * receiver has its LANE_EOF and leaves).
 */
static void *lane_keepalive_main(void *arg)
{
    unsigned i = (unsigned)(uintptr_t)arg;
    int ms = keepalive_ms();

    while (!atomic_load(&rdmax_s.finishing)) {
        usleep((useconds_t)ms * 1000);
        if (rdmax_wire_send(&rdmax_s.lane[i], RDMAX_F_KEEPALIVE, 0, (uint16_t)(i + 1), NULL, 0) <
            0) {
            break;
        }
    }
    return NULL;
}

static void *keepalive_main(void *arg)
{
    int ms = keepalive_ms();

    for (;;) {
        usleep((useconds_t)ms * 1000);
        int r = rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_KEEPALIVE, 0, 0, NULL, 0);
        if (atomic_load(&rdmax_s.finishing)) {
            break;
        }
        if (r < 0) {
            rdmax_fail("control connection to %s: %s", rdmax_s.ctrl.conn->peer,
                       rdmax_wire_strerror(r));
        }
    }
    return arg;
}

void rdmax_keepalive_start(void)
{
    pthread_attr_t a;
    pthread_t t;

    pthread_create(&t, NULL, keepalive_main, NULL);
    pthread_detach(t);
    if (!rdmax_s.o.sender) {
        return; /* the receiver sends nothing on lanes: the sender does not read them */
    }
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64u << 10);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        pthread_create(&t, &a, lane_keepalive_main, (void *)(uintptr_t)i);
    }
    pthread_attr_destroy(&a);
}
