/*
 * Connection set-up, handshake, keep-alive and the sticky error for both
 * sides. Everything is per session: nothing here is process-wide.
 */
#include "session.h"

#include "admission.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "disks.h"
#include "intake.h"
#include "page-cache.h"
#include "queue.h"

/* How long the farewell (ERROR frame, then the peer's close) may take. */
#define FAREWELL_S 1.0

double rdmax_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

void rdmax_cond_wait_s(pthread_cond_t *cv, pthread_mutex_t *mu, double seconds)
{
    struct timespec until;
    long ns;

    clock_gettime(CLOCK_REALTIME, &until);
    ns = until.tv_nsec + (long)((seconds - (double)(time_t)seconds) * 1e9);
    until.tv_sec += (time_t)seconds + ns / 1000000000L;
    until.tv_nsec = ns % 1000000000L;
    pthread_cond_timedwait(cv, mu, &until);
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

const char *rdmax_conn_strerror(const struct rdmax_conn *c, int err)
{
    /* A frame the wire layer rejected is about the bytes, not the link. */
    if (c && c->why[0] && err != -EBADMSG && err != -EPROTO && err != -EKEYREJECTED) {
        return c->why;
    }
    return rdmax_wire_strerror(err);
}

static void signal_fd(int fd)
{
    uint64_t one = 1;

    if (fd >= 0 && write(fd, &one, sizeof(one)) < 0) {
        /* an eventfd only refuses at 2^64 - 1: cannot happen */
    }
}

int rdmax_session_init(struct rdmax_session *s, const struct rdmax_opts *o)
{
    char err[600];

    memset(s, 0, sizeof(*s));
    s->o = *o;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->err_fd = eventfd(0, EFD_CLOEXEC);
    s->stop_fd = eventfd(0, EFD_CLOEXEC);
    s->null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
    for (unsigned k = 0; k < RDMAX_CHAN_MAX; k++) {
        s->chan_qemu_fd[k] = -1;
    }
    if (s->err_fd < 0 || s->stop_fd < 0 || s->null_fd < 0) {
        int r = -errno;
        rdmax_session_destroy(s);
        return r;
    }
    s->t0 = rdmax_now();
    if (strcmp(o->transport, "auto") != 0) {
        s->tp = rdmax_transport_find(o->transport);
    } else {
        /* auto: tcp unless connect/accept finds an RDMA path. */
        s->auto_transport = true;
        s->tp = rdmax_transport_find("tcp");
    }
    s->topts.connect_timeout_ms = o->connect_timeout_ms;
    /*
     * TCP_USER_TIMEOUT: a send blocked on a dead path fails after this
     * instead of ~15 min of retransmissions. Defence in depth: rdma-x's own
     * keep-alives on every connection report silence at --timeout, naming
     * the connection. Not shorter: Linux also aborts a connection whose
     * window stays closed this long (measured: 2.5 s closed with 2 s), so
     * it is also how long a peer's QEMU may stop reading (30 s at least).
     */
    s->topts.user_timeout_ms = 2 * o->timeout_ms > 30000 ? 2 * o->timeout_ms : 30000;
    s->topts.pinned_max = o->pinned_max;
    s->topts.busy_poll = o->busy_poll;
    if (o->sender) {
        s->nlanes = o->lanes;
        s->codec.zstd_level = o->zstd_level;
    }
    if (!s->tp) {
        rdmax_session_error(s, -ENOTSUP, "transport %s is not built in", o->transport);
    }
    if (o->psk_file) {
        if (rdmax_psk_load(o->psk_file, s->psk, sizeof(s->psk), &s->psk_len, err, sizeof(err)) <
            0) {
            rdmax_session_error(s, -EINVAL, "%s", err);
        }
        s->features |= RDMAX_FEAT_PSK;
    }
    if (o->encrypt) {
        s->features |= RDMAX_FEAT_ENCRYPT;
    }
    return 0;
}

void rdmax_session_destroy(struct rdmax_session *s)
{
    rdmax_session_stop(s); /* an error after the run may have started a farewell */
    rdmax_admission_release(s->o.admission, s);
    /* The wire closes its connection. */
    if (s->ctrl.conn) {
        rdmax_wire_destroy(&s->ctrl);
    }
    for (unsigned i = 0; i < RDMAX_LANES_MAX; i++) {
        if (s->lane[i].conn) {
            rdmax_wire_destroy(&s->lane[i]);
        }
    }
    for (unsigned k = 0; k < RDMAX_CHAN_MAX; k++) {
        if (s->chan[k].conn) {
            rdmax_wire_destroy(&s->chan[k]);
        }
    }
    for (int *fd = &s->err_fd; fd <= &s->null_fd; fd++) {
        if (*fd >= 0) {
            close(*fd);
        }
        *fd = -1;
    }
    OPENSSL_cleanse(s->psk, sizeof(s->psk));
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
}

const char *rdmax_session_reason(struct rdmax_session *s)
{
    return rdmax_session_failed(s) ? s->reason : "";
}

void rdmax_session_shutdown_all(struct rdmax_session *s)
{
    pthread_mutex_lock(&s->mu);
    if (s->ctrl.conn) {
        s->ctrl.conn->ops->shutdown(s->ctrl.conn);
    }
    for (unsigned i = 0; i < RDMAX_LANES_MAX; i++) {
        if (s->lane[i].conn) {
            s->lane[i].conn->ops->shutdown(s->lane[i].conn);
        }
    }
    for (unsigned k = 0; k < RDMAX_CHAN_MAX; k++) {
        if (s->chan[k].conn) {
            s->chan[k].conn->ops->shutdown(s->chan[k].conn);
        }
    }
    pthread_mutex_unlock(&s->mu);
}

int rdmax_session_add_qemu_fd(struct rdmax_session *s, unsigned k, int fd)
{
    int r;

    pthread_mutex_lock(&s->mu);
    r = atomic_load(&s->err);
    if (r == 0) {
        s->chan_qemu_fd[k] = fd;
    } else {
        shutdown(fd, SHUT_RDWR);
    }
    pthread_mutex_unlock(&s->mu);
    return r;
}

void rdmax_session_drop_qemu_fd(struct rdmax_session *s, unsigned k)
{
    pthread_mutex_lock(&s->mu);
    s->chan_qemu_fd[k] = -1;
    pthread_mutex_unlock(&s->mu);
}

/*
 * The ERROR frame, in a thread of its own: a sender blocked on the control
 * connection (a peer that stopped reading) holds its send lock, and the
 * farewell must not wait for it past its deadline. Without a control
 * reader to drain the connection (during the handshake), it drains here.
 */
static void *farewell_send_main(void *arg)
{
    struct rdmax_session *s = arg;
    struct rdmax_conn *c = s->ctrl.conn;
    bool drain;

    if (rdmax_wire_send(&s->ctrl, RDMAX_F_ERROR, 0, 0, s->reason, strlen(s->reason)) == 0) {
        pthread_mutex_lock(&s->mu);
        drain = !s->reader_running;
        pthread_mutex_unlock(&s->mu);
        if (drain) {
            /* See rdmax_session_reader_start: read and drop until the peer closes. */
            double until = rdmax_now() + FAREWELL_S;
            uint8_t sink[4096];
            int r = 0;
            while ((r == 0 || r == -ETIMEDOUT) && rdmax_now() < until) {
                r = c->ops->recv(c, sink, sizeof(sink), 100);
            }
        }
    }
    pthread_mutex_lock(&s->mu);
    s->farewell_sent = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/*
 * Tell the peer why, best effort and bounded: the ERROR frame, then let it
 * arrive. Closing a TCP socket with unread input sends a reset, and a reset
 * makes the peer's kernel drop what its reader has not read yet: our ERROR
 * too, and the peer would only say "connection closed". So the control
 * reader (or farewell_send_main) reads and drops what the peer still sends
 * until it closes (it does once it has read the ERROR), for at most
 * FAREWELL_S. Then every connection is shut down, which wakes any thread
 * still blocked on one.
 */
static void *farewell_main(void *arg)
{
    struct rdmax_session *s = arg;
    struct timespec until;
    double end = rdmax_now() + FAREWELL_S;
    bool send, drain;

    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += (time_t)FAREWELL_S;
    pthread_mutex_lock(&s->mu);
    send = s->ctrl.conn && !s->err_from_peer;
    pthread_mutex_unlock(&s->mu);
    if (send && pthread_create(&s->farewell_send, NULL, farewell_send_main, s) == 0) {
        pthread_mutex_lock(&s->mu);
        while (!(s->farewell_sent && (!s->reader_running || s->reader_done))) {
            if (pthread_cond_timedwait(&s->cv, &s->mu, &until) == ETIMEDOUT) {
                break;
            }
        }
        /*
         * The reader quit on the error itself (a corrupt control stream):
         * nobody reads the control connection now, so wait here for the
         * peer to close it after our ERROR. Cutting the lanes at once let
         * their close reach the peer first, and it reported "lane 0:
         * connection closed" instead of our reason (seen through a relay).
         */
        drain = s->farewell_sent && s->reader_running && s->reader_done;
        pthread_mutex_unlock(&s->mu);
        if (drain) {
            struct rdmax_conn *c = s->ctrl.conn;
            uint8_t sink[4096];
            int r = 0;
            while ((r == 0 || r == -ETIMEDOUT) && rdmax_now() < end) {
                r = c->ops->recv(c, sink, sizeof(sink), 100);
            }
        }
        rdmax_session_shutdown_all(s);
        pthread_join(s->farewell_send, NULL);
    } else {
        rdmax_session_shutdown_all(s);
    }
    pthread_mutex_lock(&s->mu);
    s->farewell_done = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* The first error: wake everything that may wait (mu held). */
static void wake_locked(struct rdmax_session *s)
{
    /* QEMU first: its pipes close (the numbers stay valid), so it notices at once. */
    if (s->null_fd >= 0) {
        if (s->o.unix_path) {
            /* Our unix: socket has two numbers here: shut it, not just one of them. */
            shutdown(s->o.qemu_in, SHUT_RDWR);
        }
        dup2(s->null_fd, s->o.qemu_in);
        dup2(s->null_fd, s->o.qemu_out);
    }
    /* QEMU's other channels (multifd, preempt): their threads own the numbers. */
    for (unsigned k = 0; k < RDMAX_CHAN_MAX; k++) {
        if (s->chan_qemu_fd[k] >= 0) {
            shutdown(s->chan_qemu_fd[k], SHUT_RDWR);
        }
    }
    signal_fd(s->err_fd);
    signal_fd(s->stop_fd);
    for (unsigned i = 0; i < s->nrings; i++) {
        rdmax_ring_abort(s->rings[i]);
    }
    if (s->intake) {
        rdmax_intake_abort(s->intake);
    }
    /*
     * The connections stay up until the farewell is over: a lane cut now
     * could reach the peer before our ERROR frame, and it would report
     * "connection closed" instead of our reason.
     */
    pthread_cond_broadcast(&s->cv);
    s->farewell_started = pthread_create(&s->farewell, NULL, farewell_main, s) == 0;
    if (!s->farewell_started) {
        s->farewell_done = true;
        if (s->ctrl.conn) {
            s->ctrl.conn->ops->shutdown(s->ctrl.conn);
        }
    }
}

static int session_verror(struct rdmax_session *s, int err, bool from_peer, const char *fmt,
                          va_list ap)
{
    int r;

    pthread_mutex_lock(&s->mu);
    if (atomic_load(&s->err) == 0) {
        vsnprintf(s->reason, sizeof(s->reason), fmt, ap);
        s->err_from_peer = from_peer;
        atomic_store_explicit(&s->err, err < 0 ? err : -EIO, memory_order_release);
        wake_locked(s);
    }
    r = atomic_load(&s->err);
    pthread_mutex_unlock(&s->mu);
    return r;
}

int rdmax_session_error(struct rdmax_session *s, int err, const char *fmt, ...)
{
    va_list ap;
    int r;

    va_start(ap, fmt);
    r = session_verror(s, err, false, fmt, ap);
    va_end(ap);
    return r;
}

int rdmax_session_peer_error(struct rdmax_session *s, int err, const char *fmt, ...)
{
    va_list ap;
    int r;

    va_start(ap, fmt);
    r = session_verror(s, err, true, fmt, ap);
    va_end(ap);
    return r;
}

void rdmax_session_add_ring(struct rdmax_session *s, struct rdmax_ring *r)
{
    pthread_mutex_lock(&s->mu);
    s->rings[s->nrings++] = r;
    if (atomic_load(&s->err)) {
        rdmax_ring_abort(r);
    }
    pthread_mutex_unlock(&s->mu);
}

void rdmax_session_set_intake(struct rdmax_session *s, struct rdmax_intake *in)
{
    pthread_mutex_lock(&s->mu);
    s->intake = in;
    if (in && atomic_load(&s->err)) {
        rdmax_intake_abort(in);
    }
    pthread_mutex_unlock(&s->mu);
}

bool rdmax_session_reader_start(struct rdmax_session *s)
{
    bool ok;

    pthread_mutex_lock(&s->mu);
    ok = atomic_load(&s->err) == 0;
    s->reader_running = ok;
    pthread_mutex_unlock(&s->mu);
    return ok;
}

void rdmax_session_reader_done(struct rdmax_session *s)
{
    pthread_mutex_lock(&s->mu);
    s->reader_done = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

int rdmax_session_wait_fd(struct rdmax_session *s, int fd, short events)
{
    struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = s->err_fd, .events = POLLIN}};

    for (;;) {
        int n = poll(p, 2, -1);
        if (rdmax_session_failed(s)) {
            return rdmax_session_failed(s);
        }
        if (n > 0) {
            return 0; /* ready, or POLLHUP/POLLERR: the read or write says which */
        }
        if (n < 0 && errno != EINTR) {
            return -errno;
        }
    }
}

/* Sleep ms, or less once the run stops. True when it stopped. */
static bool stop_wait(struct rdmax_session *s, int ms)
{
    struct pollfd p = {.fd = s->stop_fd, .events = POLLIN};

    return poll(&p, 1, ms) > 0;
}

void rdmax_session_stop(struct rdmax_session *s)
{
    signal_fd(s->stop_fd);
    if (s->keepalive_started) {
        pthread_join(s->keepalive, NULL);
        s->keepalive_started = false;
    }
    for (unsigned i = 0; i < s->lane_keepalives; i++) {
        pthread_join(s->lane_keepalive[i], NULL);
    }
    s->lane_keepalives = 0;
    if (s->progress_started) {
        pthread_join(s->progress, NULL);
        s->progress_started = false;
    }
    if (s->late_started) {
        pthread_join(s->late_thread, NULL);
        s->late_started = false;
        s->late = NULL;
    }
    pthread_mutex_lock(&s->mu);
    if (s->farewell_started) {
        s->farewell_started = false;
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->farewell, NULL);
    } else {
        pthread_mutex_unlock(&s->mu);
    }
}

int rdmax_session_finish(struct rdmax_session *s, int r)
{
    if (r < 0 || rdmax_session_failed(s)) {
        const char *why = rdmax_session_failed(s) ? s->reason : strerror(-r);
        fprintf(stderr, "rdma-x: error: %s%s%s\n", s->o.label ? s->o.label : "",
                s->o.label ? ": " : "", why);
        rdmax_progress_final(s);
        rdmax_stats_write(s, why);
        return 1;
    }
    rdmax_progress_final(s);
    rdmax_stats_write(s, "ok");
    return 0;
}
/*
 * Why the peer's features differ from ours, in words that name each side
 * (the same text is shown on both hosts); NULL when they agree.
 */
static const char *feature_mismatch(const struct rdmax_session *s, uint32_t theirs)
{
    uint32_t snd = s->o.sender ? s->features : theirs;
    uint32_t rcv = s->o.sender ? theirs : s->features;

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
static int auth_proof(const struct rdmax_session *s, const char *label,
                      const uint8_t client[RDMAX_HELLO_LEN], const uint8_t server[RDMAX_HELLO_LEN],
                      uint8_t out[RDMAX_MAC_LEN])
{
    uint8_t c[RDMAX_HELLO_LEN], sv[RDMAX_HELLO_LEN];

    memcpy(c, client, sizeof(c));
    memcpy(sv, server, sizeof(sv));
    memset(c + RDMAX_HELLO_MAC, 0, RDMAX_MAC_LEN);
    memset(sv + RDMAX_HELLO_MAC, 0, RDMAX_MAC_LEN);
    return rdmax_auth_mac(s->psk, s->psk_len, label, c, sizeof(c), sv, sizeof(sv), out);
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
static int crypt_setup(const struct rdmax_session *s, struct rdmax_wire *w,
                       const uint8_t *client_nonce, const uint8_t *server_nonce, bool client)
{
    uint8_t salt[2 * RDMAX_NONCE_LEN], kc[RDMAX_KEY_LEN], ks[RDMAX_KEY_LEN];
    struct rdmax_crypt *tx = NULL, *rx = NULL;
    int r;

    memcpy(salt, client_nonce, RDMAX_NONCE_LEN);
    memcpy(salt + RDMAX_NONCE_LEN, server_nonce, RDMAX_NONCE_LEN);
    r = rdmax_crypt_derive(s->psk, s->psk_len, salt, sizeof(salt), "rdma-x v2 client to server",
                           kc);
    if (r == 0) {
        r = rdmax_crypt_derive(s->psk, s->psk_len, salt, sizeof(salt), "rdma-x v2 server to client",
                               ks);
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
static int hello_read(const struct rdmax_session *s, struct rdmax_wire *w, struct rdmax_hello *h,
                      uint8_t raw[RDMAX_HELLO_LEN], char *err, size_t err_len)
{
    uint8_t buf[512];
    struct rdmax_frame_hdr fh;
    int r = rdmax_wire_recv(w, &fh, buf, sizeof(buf) - 1, s->o.timeout_ms);

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

/* 0, or -EIO when there is no randomness (reason in err). */
static int hello_fill(const struct rdmax_session *s, struct rdmax_hello *h, uint16_t role,
                      uint16_t lane, char *err, size_t err_len)
{
    memset(h, 0, sizeof(*h));
    h->magic = RDMAX_WIRE_MAGIC;
    h->version = RDMAX_WIRE_VERSION;
    h->role = role;
    h->lane = lane;
    h->lanes = (uint16_t)s->nlanes;
    h->page_size = RDMAX_PAGE_SIZE;
    h->session = s->session_id;
    h->features = s->features;
    h->cache_bytes = s->codec.cache_bytes;
    h->zstd_level = s->codec.zstd_level;
    if (s->o.sender && role == RDMAX_ROLE_CONTROL && s->guest_ram) {
        h->features |= RDMAX_FEAT_GUEST_RAM;
        h->guest_ram = s->guest_ram;
    }
    /* Fresh per connection: proofs and keys can never be replayed. */
    if (getrandom(h->nonce, sizeof(h->nonce), 0) != (ssize_t)sizeof(h->nonce)) {
        snprintf(err, err_len, "no randomness for the handshake nonce: %s", strerror(errno));
        return -EIO;
    }
    return 0;
}

/* Make c the connection of w, unless the session failed meanwhile (then -ECANCELED). */
static int wire_attach(struct rdmax_session *s, struct rdmax_wire *w, struct rdmax_conn *c)
{
    int r;

    pthread_mutex_lock(&s->mu);
    r = atomic_load(&s->err);
    if (r == 0) {
        rdmax_wire_init(w, c);
    }
    pthread_mutex_unlock(&s->mu);
    if (r < 0) {
        c->ops->close(c);
    }
    return r;
}

/* One connection with its handshake. 0, or -errno with the reason in err. */
static int connect_one(struct rdmax_session *s, struct rdmax_wire *w, const char *host,
                       const char *port, uint16_t role, uint16_t lane, struct rdmax_conn *pre,
                       char *err, size_t err_len)
{
    struct rdmax_conn *c;
    struct rdmax_hello h, peer;
    uint8_t mine[RDMAX_HELLO_LEN], theirs[RDMAX_HELLO_LEN], mac[RDMAX_MAC_LEN];
    struct rdmax_frame_hdr fh;
    uint8_t buf[512];
    char who[300];
    const char *why;
    int r;

    /* Messages name the connection: "dst:7070", or "dst:7070 (lane 3)". */
    if (role == RDMAX_ROLE_LANE) {
        snprintf(who, sizeof(who), "%s:%s (lane %u)", host, port, lane);
    } else if (role == RDMAX_ROLE_CHANNEL) {
        snprintf(who, sizeof(who), "%s:%s (QEMU channel %u)", host, port, lane + 1);
    } else if (role == RDMAX_ROLE_DISK) {
        snprintf(who, sizeof(who), "%s:%s (disk connection %u)", host, port, lane + 1);
    } else {
        snprintf(who, sizeof(who), "%s:%s", host, port);
    }
    c = pre;
    if (!c) {
        struct rdmax_transport_opts to = s->topts;
        char tp_why[400] = "";

        to.why = tp_why; /* this call's own: the lanes connect in parallel */
        to.why_len = sizeof(tp_why);
        r = s->tp->connect(host, port, &to, &c);
        if (r < 0) {
            snprintf(err, err_len, "cannot connect to %s over %s: %s", who, s->tp->name,
                     tp_why[0] ? tp_why : strerror(-r));
            return r;
        }
    }
    r = wire_attach(s, w, c);
    if (r < 0) {
        snprintf(err, err_len, "%s", rdmax_session_reason(s));
        return r;
    }
    r = hello_fill(s, &h, role, lane, err, err_len);
    if (r < 0) {
        return r;
    }
    rdmax_hello_encode(mine, &h);
    r = rdmax_wire_send(w, RDMAX_F_HELLO, 0, lane, mine, sizeof(mine));
    if (r < 0) {
        snprintf(err, err_len, "handshake with %s: %s", who, rdmax_wire_strerror(r));
        return r;
    }
    r = hello_read(s, w, &peer, theirs, err, err_len);
    if (r < 0) {
        return r;
    }
    if (peer.session != s->session_id) {
        snprintf(err, err_len, "handshake with %s: peer answered for another migration", who);
        return -EPROTO;
    }
    why = feature_mismatch(s, peer.features);
    if (why) {
        snprintf(err, err_len, "handshake with %s: %s", who, why);
        return -EPROTO;
    }
    if (!(s->features & RDMAX_FEAT_PSK)) {
        return 0;
    }
    /* The receiver proves itself first, so we never answer an impostor. */
    if (auth_proof(s, AUTH_LABEL_SERVER, mine, theirs, mac) < 0) {
        snprintf(err, err_len, "computing the authentication proof failed");
        return -EIO;
    }
    if (!rdmax_auth_equal(mac, peer.mac)) {
        snprintf(err, err_len,
                 "authentication failed: the receiver at %s:%s does not hold this "
                 "pre-shared key (wrong --psk-file?)",
                 host, port);
        return -EACCES;
    }
    if (auth_proof(s, AUTH_LABEL_CLIENT, mine, theirs, mac) < 0) {
        snprintf(err, err_len, "computing the authentication proof failed");
        return -EIO;
    }
    r = rdmax_wire_send(w, RDMAX_F_AUTH, 0, lane, mac, sizeof(mac));
    if (r < 0) {
        snprintf(err, err_len, "handshake with %s: %s", who, rdmax_wire_strerror(r));
        return r;
    }
    r = rdmax_wire_recv(w, &fh, buf, sizeof(buf) - 1, s->o.timeout_ms);
    if (r < 0) {
        snprintf(err, err_len, "handshake with %s: %s", who, rdmax_wire_strerror(r));
        return r;
    }
    if (fh.type == RDMAX_F_ERROR) {
        char txt[RDMAX_PEER_TEXT_BUF];
        snprintf(err, err_len, "peer refused: %s", rdmax_peer_text(txt, sizeof(txt), buf, fh.len));
        return -ECONNREFUSED;
    }
    if (fh.type != RDMAX_F_AUTH_OK || fh.len != 0) {
        snprintf(err, err_len, "handshake with %s: got %s frame instead of AUTH_OK", who,
                 rdmax_frame_type_name(fh.type));
        return -EPROTO;
    }
    if ((s->features & RDMAX_FEAT_ENCRYPT) && crypt_setup(s, w, h.nonce, peer.nonce, true) < 0) {
        snprintf(err, err_len, "setting up encryption with %s failed", who);
        return -EIO;
    }
    return 0;
}

/*
 * --transport auto on the sender: RDMA when a device here reaches the
 * receiver over RDMA (tried for a few seconds), else TCP; says which. The
 * lanes then use what the control connection used. Returns the connected
 * control connection, or NULL to connect it over s->tp as usual.
 */
static struct rdmax_conn *auto_connect(struct rdmax_session *s, const char *host, const char *port)
{
    const struct rdmax_transport_ops *rdma = rdmax_transport_find("rdma");
    struct rdmax_transport_opts o = s->topts;
    struct rdmax_conn *c = NULL;
    char why[400] = "";
    int r;

    if (!s->auto_transport) {
        return NULL;
    }
    if (!rdma) {
        return NULL; /* built without RDMA: tcp is the only choice */
    }
    if (o.connect_timeout_ms > 3000) {
        o.connect_timeout_ms = 3000;
    }
    o.why = why;
    o.why_len = sizeof(why);
    rdmax_log_quiet(true); /* what the transport still logs while probing */
    r = rdma->connect(host, port, &o, &c);
    rdmax_log_quiet(false);
    if (r < 0) {
        /* A host without any RDMA device is the common case: no need to say it. */
        if (r != -ENODEV) {
            fprintf(stderr, "rdma-x: note: transport auto: tcp (no RDMA path to %s:%s: %s)\n", host,
                    port, why[0] ? why : strerror(-r));
        }
        return NULL;
    }
    fprintf(stderr, "rdma-x: note: transport auto: rdma\n");
    s->tp = rdma;
    return c;
}

struct lane_connect {
    struct rdmax_session *s;
    const char *host, *port;
    uint16_t lane;
};

static void *lane_connect_main(void *arg)
{
    const struct lane_connect *lc = arg;
    char err[600];
    int r = connect_one(lc->s, &lc->s->lane[lc->lane], lc->host, lc->port, RDMAX_ROLE_LANE,
                        lc->lane, NULL, err, sizeof(err));

    if (r < 0) {
        /* The first failing lane stops the others (their connections are shut down). */
        rdmax_session_error(lc->s, r, "%s", err);
    }
    return NULL;
}

int rdmax_session_connect(struct rdmax_session *s)
{
    char host[256], port[32], err[600];
    int r;

    if (rdmax_session_failed(s)) {
        return rdmax_session_failed(s);
    }
    if (rdmax_addr_split(s->o.addr, host, sizeof(host), port, sizeof(port), err, sizeof(err)) < 0) {
        return rdmax_session_error(s, -EINVAL, "%s", err);
    }
    if (getrandom(&s->session_id, sizeof(s->session_id), 0) != sizeof(s->session_id)) {
        s->session_id = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    }
    r = connect_one(s, &s->ctrl, host, port, RDMAX_ROLE_CONTROL, 0, auto_connect(s, host, port),
                    err, sizeof(err));
    if (r < 0) {
        return rdmax_session_error(s, r, "%s", err);
    }
    /*
     * The lanes connect in parallel, one thread each: set-up costs a few
     * round trips in all, not per lane (64 lanes x 3 round trips with a PSK
     * at 50 ms was ~10 s), and each lane's waits are its own --timeout.
     */
    {
        pthread_t t[RDMAX_LANES_MAX];
        struct lane_connect lc[RDMAX_LANES_MAX];
        pthread_attr_t a;
        unsigned n;

        pthread_attr_init(&a);
        pthread_attr_setstacksize(&a, 256u << 10);
        for (n = 0; n < s->nlanes; n++) {
            lc[n] = (struct lane_connect){s, host, port, (uint16_t)n};
            if (pthread_create(&t[n], &a, lane_connect_main, &lc[n]) != 0) {
                rdmax_session_error(s, -EAGAIN, "cannot start a thread to connect lane %u", n);
                break;
            }
        }
        pthread_attr_destroy(&a);
        for (unsigned i = 0; i < n; i++) {
            pthread_join(t[i], NULL);
        }
    }
    return rdmax_session_failed(s);
}

int rdmax_session_connect_channel(struct rdmax_session *s, unsigned k)
{
    char host[256], port[32], err[600];
    int r;

    if (rdmax_addr_split(s->o.addr, host, sizeof(host), port, sizeof(port), err, sizeof(err)) < 0) {
        return rdmax_session_error(s, -EINVAL, "%s", err);
    }
    r = connect_one(s, &s->chan[k], host, port, RDMAX_ROLE_CHANNEL, (uint16_t)k, NULL, err,
                    sizeof(err));
    if (r < 0) {
        return rdmax_session_error(s, r, "%s", err);
    }
    return rdmax_session_failed(s);
}

int rdmax_session_connect_disk(struct rdmax_session *s, struct rdmax_wire *w, unsigned k, char *err,
                               size_t err_len)
{
    char host[256], port[32];

    if (rdmax_session_failed(s)) {
        snprintf(err, err_len, "%s", rdmax_session_reason(s));
        return rdmax_session_failed(s);
    }
    if (rdmax_addr_split(s->o.addr, host, sizeof(host), port, sizeof(port), err, err_len) < 0) {
        return -EINVAL;
    }
    if (getrandom(&s->session_id, sizeof(s->session_id), 0) != sizeof(s->session_id)) {
        s->session_id = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^ k;
    }
    return connect_one(s, w, host, port, RDMAX_ROLE_DISK, (uint16_t)k, NULL, err, err_len);
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
static int server_hello(const struct rdmax_session *s, struct rdmax_wire *w,
                        const uint8_t in[RDMAX_HELLO_LEN], const struct rdmax_hello *h,
                        uint8_t nonce[RDMAX_NONCE_LEN], double deadline, char *err, size_t err_len)
{
    struct rdmax_hello me;
    uint8_t out[RDMAX_HELLO_LEN], mac[RDMAX_MAC_LEN], buf[512];
    struct rdmax_frame_hdr fh;
    int r;

    /* Echo the sender's parameters: the receiver adopts them. */
    r = hello_fill(s, &me, h->role, h->lane, err, err_len);
    if (r < 0) {
        return r;
    }
    me.lanes = h->lanes;
    me.session = h->session;
    me.cache_bytes = h->cache_bytes;
    me.zstd_level = h->zstd_level;
    memcpy(nonce, me.nonce, RDMAX_NONCE_LEN);
    rdmax_hello_encode(out, &me);
    if (s->features & RDMAX_FEAT_PSK) {
        if (auth_proof(s, AUTH_LABEL_SERVER, in, out, mac) < 0) {
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
    if (!(s->features & RDMAX_FEAT_PSK)) {
        return 0;
    }
    r = rdmax_wire_recv(w, &fh, buf, sizeof(buf) - 1, ms_left(deadline));
    if (r == 0 && fh.type == RDMAX_F_ERROR) {
        /* The sender checked our proof first and gave up: say why. */
        char txt[RDMAX_PEER_TEXT_BUF];
        snprintf(err, err_len, "sender gave up: %s",
                 rdmax_peer_text(txt, sizeof(txt), buf, fh.len));
        return -EACCES;
    }
    if (r < 0 || fh.type != RDMAX_F_AUTH || fh.len != RDMAX_MAC_LEN) {
        snprintf(err, err_len, "authentication failed: no proof from the sender (%s)",
                 r < 0 ? rdmax_wire_strerror(r) : rdmax_frame_type_name(fh.type));
        return r < 0 ? r : -EACCES;
    }
    if (auth_proof(s, AUTH_LABEL_CLIENT, in, out, mac) < 0) {
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

/* The client is accepted: AUTH_OK with a PSK, then encryption starts. 0 or -errno, reason in err.
 */
static int server_ok(const struct rdmax_session *s, struct rdmax_wire *w,
                     const uint8_t *client_nonce, const uint8_t *server_nonce, uint16_t channel,
                     char *err, size_t err_len)
{
    int r;

    if (!(s->features & RDMAX_FEAT_PSK)) {
        return 0;
    }
    r = rdmax_wire_send(w, RDMAX_F_AUTH_OK, 0, channel, NULL, 0);
    if (r < 0) {
        snprintf(err, err_len, "handshake with %s: %s", w->conn->peer, rdmax_wire_strerror(r));
        return r;
    }
    if ((s->features & RDMAX_FEAT_ENCRYPT) &&
        crypt_setup(s, w, client_nonce, server_nonce, false) < 0) {
        snprintf(err, err_len, "setting up encryption with %s failed", w->conn->peer);
        return -EIO;
    }
    return 0;
}

/* server_ok for a connection of the migration: a failure is the session's. */
static int server_accept_ok(struct rdmax_session *s, struct rdmax_wire *w,
                            const uint8_t *client_nonce, const uint8_t *server_nonce,
                            uint16_t channel)
{
    char err[400];
    int r = server_ok(s, w, client_nonce, server_nonce, channel, err, sizeof(err));

    return r < 0 ? rdmax_session_error(s, r, "%s", err) : 0;
}

/*
 * A disk connection passed its handshake: it belongs to disks.c from here
 * (it lives on after this migration), not to the session. The pending slot
 * lets go of it first.
 */
static void disk_commit(struct rdmax_session *s, struct rdmax_wire *w, const struct rdmax_hello *h,
                        const uint8_t *nonce)
{
    struct rdmax_wire *dw = malloc(sizeof(*dw));
    char err[400];

    if (!dw) {
        fprintf(stderr, "rdma-x: refused disk connection %u from %s: out of memory\n", h->lane + 1,
                w->conn->peer);
        rdmax_wire_destroy(w);
        return;
    }
    *dw = *w;
    if (server_ok(s, dw, h->nonce, nonce, 0, err, sizeof(err)) < 0) {
        fprintf(stderr, "rdma-x: refused disk connection %u: %s\n", h->lane + 1, err);
        rdmax_wire_destroy(dw);
        free(dw);
        return;
    }
    rdmax_disks_adopt(s->o.disks, dw, h->lane);
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
 * Commits (control connection, lanes) happen under as->mu, only after the
 * proofs check.
 */
#define PENDING_UNAUTH 16
#define PENDING_MAX (PENDING_UNAUTH + RDMAX_LANES_MAX)
#define HANDSHAKE_GRACE_S 0.5 /* after its deadline, the main thread cuts a handshake off */
#define HANDSHAKE_STACK (256u << 10)

struct accept_state;

struct pending {
    struct accept_state *as; /* set at start */
    struct rdmax_conn *c;    /* until the thread commits or refuses it (as->mu) */
    pthread_t thread;
    double started, deadline; /* rdmax_now() */
    bool used;                /* main thread only */
    bool evicted, expired;    /* why the main thread cut it off (as->mu) */
    bool closing;             /* cut off because the migration is complete (as->mu) */
    bool hello_ok;            /* sent a valid HELLO, now in the proofs (as->mu) */
    _Atomic bool done;
};

/* The receiver's accept loop, for one rdmax_session_accept call. */
struct accept_state {
    struct rdmax_session *s;
    pthread_mutex_t mu;
    pthread_cond_t ctrl_cv; /* broadcast when the control connection is committed */
    bool have_ctrl;
    unsigned have_lanes;
    const struct rdmax_transport_ops *ctrl_tp; /* the lanes must come over it too */
    uint64_t cache_cap;
    double lane_deadline; /* --timeout after the control connection or the last lane */
    struct pending pend[PENDING_MAX];
    /* --transport auto: the RDMA listener beside the main one (main thread only) */
    struct rdmax_listener *alt_l;
    const struct rdmax_transport_ops *alt_tp;
    bool last_from_alt;       /* the last accepted connection came over alt_tp */
    struct rdmax_listener *l; /* after the lanes: the late accept thread's */
};

/*
 * --transport auto on the receiver: listen on RDMA too when a device here
 * has the address, and take the migration over whichever transport its
 * control connection arrives on.
 */

static void auto_listen(struct accept_state *as, const char *host, const char *port)
{
    const struct rdmax_transport_ops *rdma = rdmax_transport_find("rdma");
    struct rdmax_session *s = as->s;
    struct rdmax_transport_opts o = s->topts;
    char why[400] = "";
    int r;

    if (!s->auto_transport) {
        return;
    }
    if (!rdma) {
        return;
    }
    o.why = why;
    o.why_len = sizeof(why);
    rdmax_log_quiet(true);
    r = rdma->listen(host, port, &o, &as->alt_l);
    rdmax_log_quiet(false);
    if (r < 0) {
        if (r != -ENODEV) {
            fprintf(stderr, "rdma-x: note: transport auto: tcp only (no RDMA device for %s: %s)\n",
                    host, why[0] ? why : strerror(-r));
        }
        as->alt_l = NULL;
        return;
    }
    as->alt_tp = rdma;
}

/*
 * While no migration has arrived, the destination QEMU may give up (quit,
 * cancel): its end of our stdout then closes, and QEMU waits for us to exit.
 */
static int check_qemu_still_there(struct rdmax_session *s)
{
    struct pollfd pfd = {.fd = s->o.qemu_out, .events = 0};

    if (poll(&pfd, 1, 0) == 1 && (pfd.revents & (POLLERR | POLLHUP))) {
        return rdmax_session_error(
            s, -EPIPE, "the destination QEMU closed its side before a sender connected");
    }
    return rdmax_session_failed(s);
}

/* Accept on the listener, or on either of the two in auto mode. */
static int accept_any(struct accept_state *as, struct rdmax_listener **l, int wait_ms,
                      struct rdmax_conn **c)
{
    struct rdmax_session *s = as->s;
    double end = wait_ms < 0 ? 0 : rdmax_now() + wait_ms / 1000.0;

    as->last_from_alt = false;
    if (!as->alt_l) {
        int r;
        do {
            r = check_qemu_still_there(s);
            if (r < 0) {
                return r;
            }
            r = s->tp->accept(*l, wait_ms < 0 ? 500 : wait_ms, c);
        } while (r == -ETIMEDOUT && wait_ms < 0);
        return r;
    }
    for (;;) {
        int r = check_qemu_still_there(s);
        if (r < 0) {
            return r;
        }
        r = s->tp->accept(*l, 50, c);
        if (r != -ETIMEDOUT) {
            return r;
        }
        r = as->alt_tp->accept(as->alt_l, 50, c);
        if (r != -ETIMEDOUT) {
            as->last_from_alt = r == 0;
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
static void auto_settle(struct accept_state *as, struct rdmax_listener **l)
{
    struct rdmax_session *s = as->s;

    if (!as->alt_l) {
        return;
    }
    if (as->last_from_alt) {
        s->tp->listener_close(*l);
        *l = as->alt_l;
        s->tp = as->alt_tp;
    } else {
        as->alt_tp->listener_close(as->alt_l);
    }
    as->alt_l = NULL;
    fprintf(stderr, "rdma-x: note: transport auto: %s\n", s->tp->name);
}

/* MemAvailable from /proc/meminfo in bytes, or 0 when it cannot be read. */
static uint64_t mem_available(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    unsigned long long kib = 0;

    if (!f) {
        return 0;
    }
    while (fgets(line, sizeof(line), f)) {
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1) {
            break;
        }
    }
    fclose(f);
    return (uint64_t)kib << 10;
}

/*
 * Pre-flight: can this host take the guest? Its RAM (the destination QEMU
 * fills it as pages arrive) and the page caches must fit in what the host
 * has available, less --host-reserve. Refused at the handshake, before a
 * byte of the stream moved, rather than by the OOM killer halfway.
 */
static int preflight(struct rdmax_session *s, const struct rdmax_hello *h, bool commit,
                     char *err, size_t err_len)
{
    uint64_t need, held = 0, avail = mem_available();
    int r = 0;

    if (s->o.no_preflight || !(h->features & RDMAX_FEAT_GUEST_RAM) || avail == 0) {
        return 0;
    }
    need = h->guest_ram + h->cache_bytes * h->lanes;
    avail = avail > s->o.host_reserve ? avail - s->o.host_reserve : 0;
    if (s->o.admission && commit) {
        /* Migrations admitted at once in the other slots still fill their guests' RAM. */
        r = rdmax_admission_admit(s->o.admission, s, need, avail, &s->c.bytes_in,
                                  &s->c.chan_bytes, &held);
        if (r == -ENOSPC) {
            snprintf(err, err_len, "pre-flight: too many migrations at once");
            return r;
        }
    } else if (need > avail) {
        r = -ENOMEM;
    }
    if (r < 0) {
        snprintf(err, err_len,
                 "pre-flight: this host cannot take the guest: %.1f GiB of guest RAM and "
                 "%.1f GiB of page caches, %.1f GiB available (MemAvailable less "
                 "--host-reserve%s; recv --no-preflight skips this check)",
                 (double)h->guest_ram / (1 << 30), (double)(h->cache_bytes * h->lanes) / (1 << 30),
                 (double)(avail - (held < avail ? held : avail)) / (1 << 30),
                 held ? " and what the migrations in flight still fill" : "");
        return -ENOMEM;
    }
    return 0;
}

/*
 * May a connection with this HELLO become part of the migration? Checked
 * before the proofs (to refuse early) and again at the commit. as->mu held.
 */
static int admit(struct accept_state *as, const struct rdmax_conn *c, const struct rdmax_hello *h,
                 bool commit, bool *lane_mismatch, char *err, size_t err_len)
{
    struct rdmax_session *s = as->s;

    *lane_mismatch = false;
    if (h->role == RDMAX_ROLE_CONTROL) {
        if (as->have_ctrl) {
            snprintf(err, err_len, "a migration is already in progress");
            return -EBUSY;
        }
        if (h->cache_bytes > (64ull << 30) || h->cache_bytes * h->lanes > as->cache_cap) {
            snprintf(err, err_len,
                     "page cache of %llu MiB x %u lanes is above this receiver's cap of "
                     "%llu MiB (recv --cache-max, or send --cache-size)",
                     (unsigned long long)(h->cache_bytes >> 20), h->lanes,
                     (unsigned long long)(as->cache_cap >> 20));
            return -EINVAL;
        }
        if (preflight(s, h, commit, err, err_len) < 0) {
            return -ENOMEM;
        }
        if (s->o.lanes && h->lanes != s->o.lanes) {
            *lane_mismatch = true;
            snprintf(err, err_len, "lane count mismatch: sender %u, receiver %u", h->lanes,
                     s->o.lanes);
        }
        return 0;
    }
    if (h->role == RDMAX_ROLE_DISK) {
        if (!s->o.disks) {
            snprintf(err, err_len,
                     "a disk (NBD) connection: this receiver has no --connect-disks-unix");
            return -EINVAL;
        }
        return 0;
    }
    if (h->role == RDMAX_ROLE_CHANNEL) {
        if (!as->have_ctrl || h->session != s->session_id || !s->peer_channels) {
            snprintf(err, err_len, "QEMU channel connection for no migration in progress");
            return -EINVAL;
        }
        if (!s->on_channel) {
            snprintf(err, err_len,
                     "the source QEMU opened a further channel (multifd or postcopy-preempt): "
                     "that needs recv --connect-unix, this receiver writes to one stream");
            return -EINVAL;
        }
        if (c->ops != as->ctrl_tp) {
            snprintf(err, err_len, "QEMU channel connection over %s, the migration came over %s",
                     c->ops->name, as->ctrl_tp->name);
            return -EINVAL;
        }
        if (s->chan[h->lane].conn) {
            snprintf(err, err_len, "QEMU channel %u connected twice", h->lane + 1);
            return -EINVAL;
        }
        /* Each multifd channel decodes with a page cache as big as a lane's: within the cap. */
        unsigned caches = s->nlanes + 1;
        for (unsigned k = 0; k < RDMAX_CHAN_MAX; k++) {
            caches += s->chan[k].conn != NULL;
        }
        if (!s->chan_nocache && s->codec.cache_bytes * caches > as->cache_cap) {
            snprintf(err, err_len,
                     "QEMU channel %u: %u page caches of %llu MiB (lanes and channels) are above "
                     "this receiver's cap of %llu MiB (recv --cache-max, or send --cache-size)",
                     h->lane + 1, caches, (unsigned long long)(s->codec.cache_bytes >> 20),
                     (unsigned long long)(as->cache_cap >> 20));
            return -EINVAL;
        }
        return 0;
    }
    if (!as->have_ctrl || h->session != s->session_id) {
        snprintf(err, err_len, "lane connection for no migration in progress");
        return -EINVAL;
    }
    if (h->lanes != s->nlanes) {
        snprintf(err, err_len, "lane connection for %u lanes, migration has %u", h->lanes,
                 s->nlanes);
        return -EINVAL;
    }
    if (c->ops != as->ctrl_tp) {
        snprintf(err, err_len, "lane connection over %s, the migration came over %s", c->ops->name,
                 as->ctrl_tp->name);
        return -EINVAL;
    }
    if (s->lane[h->lane].conn) {
        snprintf(err, err_len, "lane connected twice");
        return -EINVAL;
    }
    return 0;
}

/* A sender with the wrong --lanes: tell it, and stop. */
static void lane_mismatch_fail(struct pending *p, struct rdmax_wire *w, struct rdmax_conn *c,
                               const char *err)
{
    struct accept_state *as = p->as;

    pthread_mutex_lock(&as->mu);
    p->c = NULL;
    pthread_mutex_unlock(&as->mu);
    w->conn = NULL;
    rdmax_wire_destroy(w);
    refuse(c, err);
    rdmax_session_error(as->s, -EINVAL, "%s", err);
    atomic_store(&p->done, true);
}

static void *handshake_main(void *arg)
{
    struct pending *p = arg;
    struct accept_state *as = p->as;
    struct rdmax_session *s = as->s;
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
    why = feature_mismatch(s, h.features);
    if (why) {
        snprintf(err, sizeof(err), "%s", why);
        goto refuse;
    }
    pthread_mutex_lock(&as->mu);
    /*
     * Without a PSK the sender's control handshake ends at our HELLO_ACK,
     * which goes out before its thread commits the control connection, and
     * the sender's lanes connect at once, in parallel: a lane may get here
     * first. It waits for the control connection (until its own deadline)
     * instead of being refused as belonging to no migration.
     */
    while (h.role == RDMAX_ROLE_LANE && !as->have_ctrl && ms_left(p->deadline) > 0 && !p->evicted &&
           !p->closing) {
        double left = p->deadline - rdmax_now();
        rdmax_cond_wait_s(&as->ctrl_cv, &as->mu, left < 0.05 ? left : 0.05);
    }
    r = admit(as, c, &h, false, &lane_mismatch, err, sizeof(err));
    p->hello_ok = r == 0;
    pthread_mutex_unlock(&as->mu);
    if (r < 0) {
        goto refuse;
    }
    if (lane_mismatch && !(s->features & RDMAX_FEAT_PSK)) {
        lane_mismatch_fail(p, &w, c, err);
        return NULL;
    }
    r = server_hello(s, &w, in, &h, nonce, p->deadline, why_auth, sizeof(why_auth));
    if (r < 0) {
        snprintf(err, sizeof(err), "%s", why_auth);
        goto refuse;
    }
    if (lane_mismatch) {
        /* Authenticated, so a real sender with the wrong --lanes: stop. */
        lane_mismatch_fail(p, &w, c, err);
        return NULL;
    }
    pthread_mutex_lock(&as->mu);
    r = admit(as, c, &h, true, &lane_mismatch, err, sizeof(err));
    if (r == 0 && h.role == RDMAX_ROLE_DISK) {
        p->c = NULL;
        pthread_mutex_unlock(&as->mu);
        disk_commit(s, &w, &h, nonce);
        atomic_store(&p->done, true);
        return NULL;
    }
    if (r == 0) {
        struct rdmax_wire *into;
        p->c = NULL;                /* the migration's now: never cut off */
        pthread_mutex_lock(&s->mu); /* the farewell reads the connections */
        if (h.role == RDMAX_ROLE_CONTROL) {
            s->session_id = h.session;
            s->nlanes = h.lanes;
            s->codec.cache_bytes = h.cache_bytes;
            s->codec.zstd_level = h.zstd_level;
            s->ctrl = w;
            into = &s->ctrl;
            s->peer_channels = (h.features & RDMAX_FEAT_CHANNELS) != 0;
            s->chan_nocache = (h.features & RDMAX_FEAT_CHAN_NOCACHE) != 0;
            as->have_ctrl = true;
            as->ctrl_tp = c->ops;
            pthread_cond_broadcast(&as->ctrl_cv);
        } else if (h.role == RDMAX_ROLE_CHANNEL) {
            s->chan[h.lane] = w;
            into = &s->chan[h.lane];
        } else {
            s->lane[h.lane] = w;
            into = &s->lane[h.lane];
            as->have_lanes++;
        }
        pthread_mutex_unlock(&s->mu);
        /* The lanes' deadline runs from what arrived last, not from the start. */
        as->lane_deadline = rdmax_now() + s->o.timeout_ms / 1000.0;
        pthread_mutex_unlock(&as->mu);
        if (server_accept_ok(s, into, h.nonce, nonce, h.role == RDMAX_ROLE_LANE ? h.lane : 0) ==
                0 &&
            h.role == RDMAX_ROLE_CHANNEL) {
            s->on_channel(s->on_channel_arg, h.lane);
        }
        atomic_store(&p->done, true);
        return NULL;
    }
    pthread_mutex_unlock(&as->mu);
refuse:
    pthread_mutex_lock(&as->mu);
    p->c = NULL; /* from here the main thread leaves c alone */
    evicted = p->evicted;
    closing = p->closing;
    expired = p->expired || (r == -ETIMEDOUT && ms_left(p->deadline) == 0);
    pthread_mutex_unlock(&as->mu);
    if (closing) {
        snprintf(err, sizeof(err), "a migration is already in progress");
    } else if (evicted) {
        snprintf(err, sizeof(err),
                 "dropped for a newer connection (%u handshakes at once, the oldest goes first)",
                 PENDING_UNAUTH);
    } else if (expired) {
        snprintf(err, sizeof(err), "no complete rdma-x handshake within %d s", HANDSHAKE_MS / 1000);
    }
    /* refuse() owns the connection from here; the wire holds no crypto yet. */
    w.conn = NULL;
    rdmax_wire_destroy(&w);
    refuse(c, err);
    atomic_store(&p->done, true);
    return NULL;
}

/* Cut every handshake off that ran past its deadline. as->mu held. */
static void expire_locked(struct accept_state *as, double now)
{
    for (unsigned i = 0; i < PENDING_MAX; i++) {
        struct pending *p = &as->pend[i];
        if (p->used && p->c && !p->expired && now > p->deadline + HANDSHAKE_GRACE_S) {
            p->expired = true;
            p->c->ops->shutdown(p->c);
        }
    }
}

/* Join the handshake threads that ended; returns how many still run. Main thread. */
static unsigned reap(struct accept_state *as)
{
    unsigned n = 0;

    for (unsigned i = 0; i < PENDING_MAX; i++) {
        if (as->pend[i].used && atomic_load(&as->pend[i].done)) {
            pthread_join(as->pend[i].thread, NULL);
            as->pend[i].used = false;
        }
        n += as->pend[i].used;
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
static struct pending *take_slot(struct accept_state *as, unsigned limit)
{
    struct pending *oldest = NULL;

    if (reap(as) < limit) {
        for (unsigned i = 0; i < PENDING_MAX; i++) {
            if (!as->pend[i].used) {
                return &as->pend[i];
            }
        }
    }
    pthread_mutex_lock(&as->mu);
    for (unsigned i = 0; i < PENDING_MAX; i++) {
        struct pending *p = &as->pend[i];
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
    pthread_mutex_unlock(&as->mu);
    if (!oldest) {
        return NULL;
    }
    pthread_join(oldest->thread, NULL);
    oldest->used = false;
    return oldest;
}

static void handshake_start(struct accept_state *as, struct rdmax_conn *c, unsigned limit)
{
    struct pending *p = take_slot(as, limit);
    pthread_attr_t a;

    if (!p) {
        refuse(c, "too many connections at once");
        return;
    }
    memset(p, 0, sizeof(*p));
    p->as = as;
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

static void accept_end(struct accept_state *as, struct rdmax_listener *l);
static void *late_accept_main(void *arg);

/*
 * accept on l (or the auto-mode RDMA listener) failed with r: that one
 * connection failed, or fds ran out for a moment, so say so and keep
 * listening. Turned-away clients do not count towards giving up, or a
 * flood of foreign ones could end the receiver. True when it keeps
 * failing: the session's error is recorded, stop.
 */
static bool accept_failed(struct accept_state *as, struct rdmax_listener *l, int r,
                          unsigned *errors)
{
    struct rdmax_session *s = as->s;
    const char *why = l->why[0] ? l->why : strerror(-r);

    if (as->alt_l && as->alt_l->why[0]) {
        why = as->alt_l->why;
    }
    fprintf(stderr, "rdma-x: note: accept on %s: %s\n", s->o.addr, why);
    l->why[0] = '\0';
    if (as->alt_l) {
        as->alt_l->why[0] = '\0';
    }
    if (r != -ECONNABORTED && ++*errors > 100) {
        rdmax_session_error(s, r, "accept on %s keeps failing: %s", s->o.addr, strerror(-r));
        return true;
    }
    usleep(20 * 1000);
    return false;
}

int rdmax_session_accept(struct rdmax_session *s)
{
    char host[256], port[32], err[700];
    struct rdmax_listener *l;
    struct accept_state *as;
    bool settled = false;
    unsigned accept_errors = 0;
    int r;

    if (rdmax_session_failed(s)) {
        return rdmax_session_failed(s);
    }
    as = calloc(1, sizeof(*as));
    if (!as) {
        return rdmax_session_error(s, -ENOMEM, "out of memory");
    }
    as->s = s;
    pthread_mutex_init(&as->mu, NULL);
    pthread_cond_init(&as->ctrl_cv, NULL);
    as->cache_cap = s->o.cache_max ? s->o.cache_max : rdmax_page_cache_default_cap();
    if (rdmax_addr_split(s->o.addr, host, sizeof(host), port, sizeof(port), err, sizeof(err)) < 0) {
        r = rdmax_session_error(s, -EINVAL, "%s", err);
        goto out;
    }
    {
        struct rdmax_transport_opts o = s->topts;
        char why[400] = "";

        o.why = why;
        o.why_len = sizeof(why);
        r = s->tp->listen(host, port, &o, &l);
        if (r < 0) {
            r = rdmax_session_error(s, r, "cannot listen on %s:%s over %s: %s", host, port,
                                    s->tp->name, why[0] ? why : strerror(-r));
            goto out;
        }
    }
    auto_listen(as, host, port);
    for (;;) {
        struct rdmax_conn *c;
        bool have_ctrl;
        unsigned have_lanes, nlanes;
        double lane_deadline, now = rdmax_now();

        if (rdmax_session_failed(s)) {
            break; /* a handshake thread found the sender unfit (lane count) */
        }
        pthread_mutex_lock(&as->mu);
        expire_locked(as, now);
        have_ctrl = as->have_ctrl;
        have_lanes = as->have_lanes;
        nlanes = s->nlanes;
        lane_deadline = as->lane_deadline;
        pthread_mutex_unlock(&as->mu);
        reap(as);
        if (have_ctrl && !settled) {
            /* The control connection is in: the migration uses its transport. */
            as->last_from_alt = as->alt_l && as->ctrl_tp == as->alt_tp;
            auto_settle(as, &l);
            settled = true;
        }
        if (have_ctrl && have_lanes == nlanes) {
            break;
        }
        if (have_ctrl && now > lane_deadline) {
            rdmax_session_error(s, -ETIMEDOUT,
                                "only %u of %u lane connections arrived (none for %d s)",
                                have_lanes, nlanes, s->o.timeout_ms / 1000);
            break;
        }
        /*
         * Short waits: the deadlines above are checked between them, and a
         * handshake that completes in its thread is seen within 5 ms (at
         * 100 ms, the last lane's commit cost every migration ~100 ms).
         */
        bool busy = have_ctrl;
        for (unsigned i = 0; i < PENDING_MAX && !busy; i++) {
            busy = as->pend[i].used && !atomic_load(&as->pend[i].done);
        }
        r = accept_any(as, &l, busy ? 5 : 100, &c);
        if (r == -ETIMEDOUT) {
            continue;
        }
        if (rdmax_session_failed(s)) {
            break;
        }
        if (r < 0) {
            if (accept_failed(as, l, r, &accept_errors)) {
                break;
            }
            continue;
        }
        accept_errors = 0;
        handshake_start(as, c, have_ctrl ? PENDING_UNAUTH + (nlanes - have_lanes) : PENDING_UNAUTH);
    }
    if (!rdmax_session_failed(s) && s->peer_channels) {
        /* QEMU's further channels connect later, while the stream flows. */
        as->l = l;
        s->late = as;
        if (pthread_create(&s->late_thread, NULL, late_accept_main, as) == 0) {
            s->late_started = true;
            return 0;
        }
        s->late = NULL;
        rdmax_session_error(s, -EAGAIN, "cannot start the thread that accepts QEMU channels");
    }
    accept_end(as, l);
    return rdmax_session_failed(s);
out:
    pthread_mutex_destroy(&as->mu);
    pthread_cond_destroy(&as->ctrl_cv);
    free(as);
    return r;
}

/* Stop accepting: close the listeners, cut unfinished handshakes off, free as. */
static void accept_end(struct accept_state *as, struct rdmax_listener *l)
{
    struct rdmax_session *s = as->s;

    /* One migration per process: nobody else may connect now. */
    s->tp->listener_close(l);
    if (as->alt_l) {
        as->alt_tp->listener_close(as->alt_l);
    }
    pthread_mutex_lock(&as->mu);
    for (unsigned i = 0; i < PENDING_MAX; i++) {
        if (as->pend[i].used && as->pend[i].c) {
            as->pend[i].closing = true;
            as->pend[i].c->ops->shutdown(as->pend[i].c);
        }
    }
    pthread_mutex_unlock(&as->mu);
    for (unsigned i = 0; i < PENDING_MAX; i++) {
        if (as->pend[i].used) {
            pthread_join(as->pend[i].thread, NULL);
            as->pend[i].used = false;
        }
    }
    pthread_mutex_destroy(&as->mu);
    pthread_cond_destroy(&as->ctrl_cv);
    free(as);
}

/*
 * After the lanes, for a sender that announced QEMU channels: the same
 * accept loop and handshakes (and the same limits on strangers), admitting
 * channel connections only, until every channel ended or the run stops.
 */
static void *late_accept_main(void *arg)
{
    struct accept_state *as = arg;
    struct rdmax_session *s = as->s;
    unsigned accept_errors = 0;

    while (!rdmax_session_failed(s) && !atomic_load(&s->chan_closed) && !stop_wait(s, 0)) {
        struct rdmax_conn *c;
        int r;

        pthread_mutex_lock(&as->mu);
        expire_locked(as, rdmax_now());
        pthread_mutex_unlock(&as->mu);
        reap(as);
        r = s->tp->accept(as->l, 100, &c);
        if (r == -ETIMEDOUT) {
            continue;
        }
        if (r < 0) {
            if (accept_failed(as, as->l, r, &accept_errors)) {
                break;
            }
            continue;
        }
        accept_errors = 0;
        handshake_start(as, c, PENDING_UNAUTH);
    }
    accept_end(as, as->l);
    return NULL;
}

/* Several keep-alives per --timeout, so one late one is no failure. */
static int keepalive_ms(const struct rdmax_session *s)
{
    int ms = s->o.timeout_ms / 4;

    return ms > 1000 ? 1000 : ms < 100 ? 100 : ms;
}

struct lane_keepalive {
    struct rdmax_session *s;
    unsigned lane;
};

/*
 * Sender: keep-alives on lane i too, so the receiver can fail a lane
 * that stays silent for --timeout (a blackholed TCP flow, an ECMP member)
 * instead of waiting forever. One thread per lane: a lane blocked in a
 * send (back-pressure, a dead path) delays only its own keep-alives, and
 * data flowing there is liveness enough. Errors are left to the lane's
 * own thread and to the receiver (a lane ends, with a reset, once the
 * receiver has its LANE_EOF and leaves).
 */
static void *lane_keepalive_main(void *arg)
{
    struct rdmax_session *s = ((struct lane_keepalive *)arg)->s;
    unsigned i = ((struct lane_keepalive *)arg)->lane;
    int ms = keepalive_ms(s);

    free(arg);
    while (!atomic_load(&s->finishing)) {
        if (stop_wait(s, ms)) {
            break;
        }
        if (rdmax_wire_send(&s->lane[i], RDMAX_F_KEEPALIVE, 0, (uint16_t)(i + 1), NULL, 0) < 0) {
            break;
        }
    }
    return NULL;
}

static void *keepalive_main(void *arg)
{
    struct rdmax_session *s = arg;
    int ms = keepalive_ms(s);

    for (;;) {
        if (stop_wait(s, ms)) {
            break;
        }
        int r = rdmax_wire_send(&s->ctrl, RDMAX_F_KEEPALIVE, 0, 0, NULL, 0);
        if (atomic_load(&s->finishing)) {
            break;
        }
        if (r < 0) {
            rdmax_session_error(s, r, "control connection to %s: %s", s->ctrl.conn->peer,
                                rdmax_wire_strerror(r));
            break;
        }
    }
    return NULL;
}

void rdmax_keepalive_start(struct rdmax_session *s)
{
    pthread_attr_t a;

    s->keepalive_started = pthread_create(&s->keepalive, NULL, keepalive_main, s) == 0;
    if (!s->o.sender) {
        return; /* the receiver sends nothing on lanes: the sender does not read them */
    }
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 64u << 10);
    for (unsigned i = 0; i < s->nlanes; i++) {
        struct lane_keepalive *lk = malloc(sizeof(*lk));
        if (!lk) {
            break;
        }
        *lk = (struct lane_keepalive){s, i};
        if (pthread_create(&s->lane_keepalive[s->lane_keepalives], &a, lane_keepalive_main, lk) !=
            0) {
            free(lk);
            break;
        }
        s->lane_keepalives++;
    }
    pthread_attr_destroy(&a);
}
