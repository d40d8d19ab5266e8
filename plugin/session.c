/*
 * Connection set-up, handshake, keep-alive and failure for both sides.
 */
#include "session.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

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
        return "frame checksum mismatch (corrupted on the wire)";
    case -EPROTO:
        return "peer broke the protocol (bad frame header)";
    case -ECONNREFUSED:
        return "connection refused";
    default:
        return strerror(-err);
    }
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
    /* Telling the peer is best effort: never let it hold the exit. */
    alarm(2);
    if (rdmax_s.ctrl.conn) {
        rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_ERROR, 0, 0, reason, strlen(reason));
        rdmax_s.ctrl.conn->ops->shutdown(rdmax_s.ctrl.conn);
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
    h->cache_bytes = rdmax_s.codec.cache_bytes;
    h->zstd_level = rdmax_s.codec.zstd_level;
}

/* Read the peer's handshake reply: HELLO_ACK, or ERROR with its reason. */
static int hello_read(struct rdmax_wire *w, struct rdmax_hello *h, char *err, size_t err_len)
{
    uint8_t buf[256];
    struct rdmax_frame_hdr fh;
    int r = rdmax_wire_recv(w, &fh, buf, sizeof(buf) - 1, rdmax_s.o.timeout_ms);

    if (r < 0) {
        snprintf(err, err_len, "handshake with %s: %s", w->conn->peer, rdmax_wire_strerror(r));
        return r;
    }
    if (fh.type == RDMAX_F_ERROR) {
        buf[fh.len] = '\0';
        snprintf(err, err_len, "peer refused: %s", (char *)buf);
        return -ECONNREFUSED;
    }
    if (fh.type != RDMAX_F_HELLO && fh.type != RDMAX_F_HELLO_ACK) {
        snprintf(err, err_len, "handshake with %s: got %s frame", w->conn->peer,
                 rdmax_frame_type_name(fh.type));
        return -EPROTO;
    }
    return rdmax_hello_decode(buf, fh.len, h, err, err_len);
}

static void connect_one(struct rdmax_wire *w, const char *host, const char *port, uint16_t role,
                        uint16_t lane)
{
    struct rdmax_conn *c;
    struct rdmax_hello h, peer;
    uint8_t buf[RDMAX_HELLO_LEN];
    char err[300];
    int r;

    r = rdmax_s.tp->connect(host, port, &rdmax_s.topts, &c);
    if (r < 0) {
        rdmax_fail("cannot connect to %s:%s over %s: %s", host, port, rdmax_s.tp->name,
                   strerror(-r));
    }
    rdmax_wire_init(w, c);
    hello_fill(&h, role, lane);
    rdmax_hello_encode(buf, &h);
    r = rdmax_wire_send(w, RDMAX_F_HELLO, 0, lane, buf, sizeof(buf));
    if (r < 0) {
        rdmax_fail("handshake with %s:%s: %s", host, port, rdmax_wire_strerror(r));
    }
    if (hello_read(w, &peer, err, sizeof(err)) < 0) {
        rdmax_fail("%s", err);
    }
    if (peer.session != rdmax_s.session_id) {
        rdmax_fail("handshake with %s:%s: peer answered for another migration", host, port);
    }
}

void rdmax_session_connect(void)
{
    char host[256], port[32], err[200];

    if (rdmax_addr_split(rdmax_s.o.addr, host, sizeof(host), port, sizeof(port), err,
                         sizeof(err)) < 0) {
        rdmax_fail("%s", err);
    }
    if (getrandom(&rdmax_s.session_id, sizeof(rdmax_s.session_id), 0) !=
        sizeof(rdmax_s.session_id)) {
        rdmax_s.session_id = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    }
    connect_one(&rdmax_s.ctrl, host, port, RDMAX_ROLE_CONTROL, 0);
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        connect_one(&rdmax_s.lane[i], host, port, RDMAX_ROLE_LANE, (uint16_t)i);
    }
}

/* Refuse a connection with a reason, without letting it stall the listener. */
static void refuse(struct rdmax_conn *c, const char *reason)
{
    struct rdmax_wire w;

    fprintf(stderr, "rdma-x: refused connection from %s: %s\n", c->peer, reason);
    rdmax_wire_init(&w, c);
    rdmax_wire_send(&w, RDMAX_F_ERROR, 0, 0, reason, strlen(reason));
    rdmax_wire_destroy(&w);
}

void rdmax_session_accept(void)
{
    char host[256], port[32], err[300];
    struct rdmax_listener *l;
    bool have_ctrl = false;
    unsigned have_lanes = 0;
    double deadline = 0;
    int r;

    if (rdmax_addr_split(rdmax_s.o.addr, host, sizeof(host), port, sizeof(port), err,
                         sizeof(err)) < 0) {
        rdmax_fail("%s", err);
    }
    r = rdmax_s.tp->listen(host, port, &rdmax_s.topts, &l);
    if (r < 0) {
        rdmax_fail("cannot listen on %s:%s over %s: %s", host, port, rdmax_s.tp->name,
                   strerror(-r));
    }
    while (!have_ctrl || have_lanes < rdmax_s.nlanes) {
        struct rdmax_conn *c;
        struct rdmax_wire w;
        struct rdmax_hello h;
        uint8_t buf[RDMAX_HELLO_LEN];
        int wait = -1;

        if (have_ctrl) {
            wait = (int)((deadline - rdmax_now()) * 1000);
            if (wait <= 0) {
                rdmax_fail("only %u of %u lane connections arrived", have_lanes,
                           rdmax_s.nlanes);
            }
        }
        r = rdmax_s.tp->accept(l, wait, &c);
        if (r == -ETIMEDOUT) {
            continue;
        }
        if (r < 0) {
            rdmax_fail("accept on %s: %s", rdmax_s.o.addr, strerror(-r));
        }
        rdmax_wire_init(&w, c);
        {
            uint8_t in[RDMAX_HELLO_LEN + 16];
            struct rdmax_frame_hdr fh;
            /* A silent or garbage client must not wedge the listener. */
            r = rdmax_wire_recv(&w, &fh, in, sizeof(in), 5000);
            if (r < 0 || fh.type != RDMAX_F_HELLO) {
                snprintf(err, sizeof(err), "no valid rdma-x handshake (%s)",
                         r < 0 ? rdmax_wire_strerror(r) : rdmax_frame_type_name(fh.type));
                w.conn = NULL;
                refuse(c, err);
                continue;
            }
            r = rdmax_hello_decode(in, fh.len, &h, err, sizeof(err));
        }
        if (r < 0) {
            w.conn = NULL;
            refuse(c, err);
            if (r == -EPROTONOSUPPORT) {
                fprintf(stderr, "rdma-x: note: upgrade both hosts to the same rdma-x version\n");
            }
            continue;
        }
        if (h.role == RDMAX_ROLE_CONTROL) {
            if (have_ctrl) {
                w.conn = NULL;
                refuse(c, "a migration is already in progress");
                continue;
            }
            if (rdmax_s.o.lanes && h.lanes != rdmax_s.o.lanes) {
                snprintf(err, sizeof(err), "lane count mismatch: sender %u, receiver %u",
                         h.lanes, rdmax_s.o.lanes);
                w.conn = NULL;
                refuse(c, err);
                rdmax_fail("%s", err);
            }
            if (h.cache_bytes > (64ull << 30)) {
                w.conn = NULL;
                refuse(c, "page cache above the 64 GiB cap");
                continue;
            }
            rdmax_s.session_id = h.session;
            rdmax_s.nlanes = h.lanes;
            rdmax_s.codec.cache_bytes = h.cache_bytes;
            rdmax_s.codec.zstd_level = h.zstd_level;
            rdmax_s.ctrl = w;
            have_ctrl = true;
            deadline = rdmax_now() + rdmax_s.o.timeout_ms / 1000.0;
            hello_fill(&h, RDMAX_ROLE_CONTROL, 0);
            rdmax_hello_encode(buf, &h);
            r = rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_HELLO_ACK, 0, 0, buf, sizeof(buf));
        } else {
            if (!have_ctrl || h.session != rdmax_s.session_id) {
                w.conn = NULL;
                refuse(c, "lane connection for no migration in progress");
                continue;
            }
            if (rdmax_s.lane[h.lane].conn) {
                w.conn = NULL;
                refuse(c, "lane connected twice");
                continue;
            }
            rdmax_s.lane[h.lane] = w;
            have_lanes++;
            hello_fill(&h, RDMAX_ROLE_LANE, h.lane);
            rdmax_hello_encode(buf, &h);
            r = rdmax_wire_send(&rdmax_s.lane[h.lane], RDMAX_F_HELLO_ACK, 0, h.lane, buf,
                                sizeof(buf));
        }
        if (r < 0) {
            rdmax_fail("handshake with %s: %s", c->peer, rdmax_wire_strerror(r));
        }
    }
    /* One migration per process: nobody else may connect now. */
    rdmax_s.tp->listener_close(l);
}

static void *keepalive_main(void *arg)
{
    for (;;) {
        sleep(1);
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
    pthread_t t;

    pthread_create(&t, NULL, keepalive_main, NULL);
    pthread_detach(t);
}
