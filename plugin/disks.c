/*
 * rdma-x: the disks channel (NBD storage migration); see disks.h.
 *
 * Per disk connection, on each side: one thread connects (the sender to
 * the receiver, the receiver to the destination QEMU's NBD server) and
 * then carries the peer's frames to QEMU ("down"), and one more carries
 * QEMU's bytes to the peer ("up"). NBD is request/response with many
 * requests in flight, so neither direction may wait for the other: two
 * threads, one wire each way of the same connection.
 *
 * Ownership: struct rdmax_disks owns every struct disk on its list; a
 * disk's relay thread owns its QEMU socket and its wire, and only shuts
 * them down for another thread (disk_fail) under dk->mu, never closes them.
 */
#define _GNU_SOURCE
#include "disks.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zstd.h>

#include "be.h"
#include "disk-codec.h"
#include "front-unix.h"

#define DISK_STACK (256u << 10)

struct disk {
    struct rdmax_disks *d;
    unsigned k;           /* the sender's number for it, 0-based; messages say k + 1 */
    int qemu_fd;          /* the NBD socket; the relay thread's, -1 until connected */
    struct rdmax_wire *w; /* to the peer; the relay thread's, NULL until connected */
    pthread_t thread;     /* relay: connects, runs down, joins up */
    bool started;         /* thread runs (d->mu) */
    pthread_mutex_t mu;   /* failed, quiet and the fd/wire shutdowns */
    bool failed, quiet;
    _Atomic bool up_eof;                /* QEMU closed its sending side and the peer was told */
    _Atomic bool ended;                 /* the relay thread is done; join and free it */
    _Atomic uint64_t up_bytes, up_wire; /* written by the up thread, read by status too */
    _Atomic uint64_t down_bytes;        /* written by the relay thread */
    double t0;
    struct disk *next; /* d->list, d->mu */
};

struct rdmax_disks {
    struct rdmax_opts o;
    int listen_fd; /* sender */
    int stop_fd;   /* sender: eventfd, ends the acceptor */
    pthread_t acceptor;
    bool acceptor_started;
    pthread_mutex_t mu;
    struct disk *list;         /* mu */
    bool used[RDMAX_DISK_MAX]; /* sender: numbers of open disk connections (mu) */
    bool finishing;            /* mu: take no more */
    _Atomic bool any_failed;
    _Atomic unsigned done, failed; /* disk connections that ended (rdma-x status) */
};

static const char *side(const struct disk *dk)
{
    return dk->d->o.sender ? "receiver" : "sender";
}

/*
 * The first failure of a disk connection: its line (unless quiet), the
 * reason to the peer (tell_peer: only from the disk's own threads, which
 * keep the wire alive meanwhile; not when the link itself failed), and
 * both ends shut down, which wakes the other thread. Later calls do
 * nothing.
 */
static void disk_fail(struct disk *dk, bool quiet, bool tell_peer, const char *fmt, ...)
{
    struct rdmax_wire *w;
    char why[500];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&dk->mu);
    if (dk->failed) {
        pthread_mutex_unlock(&dk->mu);
        return;
    }
    dk->failed = true;
    dk->quiet = quiet;
    if (!quiet) {
        atomic_store(&dk->d->any_failed, true);
        fprintf(stderr, "rdma-x: error: disk connection %u: %s\n", dk->k + 1, why);
    }
    if (dk->qemu_fd >= 0) {
        shutdown(dk->qemu_fd, SHUT_RDWR);
    }
    w = dk->w;
    if (w && !tell_peer) {
        w->conn->ops->shutdown(w->conn);
    }
    pthread_mutex_unlock(&dk->mu);
    if (w && tell_peer) {
        /* Outside dk->mu: the up thread may hold the wire in a send a while. */
        (void)rdmax_wire_send(w, RDMAX_F_ERROR, 0, 0, why, strlen(why));
        w->conn->ops->shutdown(w->conn);
    }
}

static bool disk_failed(struct disk *dk)
{
    pthread_mutex_lock(&dk->mu);
    bool f = dk->failed;
    pthread_mutex_unlock(&dk->mu);
    return f;
}

static int disk_send(struct disk *dk, uint8_t type, uint8_t flags, const void *b, size_t n)
{
    int r = rdmax_wire_send(dk->w, type, flags, 0, b, n);

    if (r < 0) {
        disk_fail(dk, false, false, "to the %s at %s: %s", side(dk), dk->w->conn->peer,
                  rdmax_conn_strerror(dk->w->conn, r));
        return r;
    }
    dk->up_wire += RDMAX_FRAME_HDR + n;
    return 0;
}

/* The encoder's frames go out on the disk's wire. */
static int frame_out(void *arg, uint8_t type, uint8_t flags, const void *b, size_t n)
{
    return disk_send(arg, type, flags, b, n);
}

/* QEMU -> peer, until QEMU closes its side (DISK_EOF) or a failure. */
static void *up_main(void *arg)
{
    struct disk *dk = arg;
    uint8_t *buf = malloc(RDMAX_DISK_CHUNK);
    struct rdmax_disk_enc *enc = rdmax_disk_enc_create();
    int ka = dk->d->o.timeout_ms / 3 < 200 ? 200 : dk->d->o.timeout_ms / 3;

    if (!buf || !enc) {
        disk_fail(dk, false, true, "out of memory");
        goto out;
    }
    for (;;) {
        struct pollfd p = {.fd = dk->qemu_fd, .events = POLLIN};
        int n = poll(&p, 1, ka);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n == 0) {
            /* Silence is a dead peer to the other side: say we are here. */
            if (disk_send(dk, RDMAX_F_KEEPALIVE, 0, NULL, 0) < 0) {
                break;
            }
            continue;
        }
        ssize_t got = read(dk->qemu_fd, buf, RDMAX_DISK_CHUNK);
        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (disk_failed(dk)) {
            break; /* our own shutdown woke us */
        }
        if (got < 0) {
            disk_fail(dk, false, true, "reading from QEMU: %s", strerror(errno));
            break;
        }
        if (got == 0) {
            uint8_t b[8];
            rdmax_put_be64(b, dk->up_bytes);
            if (disk_send(dk, RDMAX_F_DISK_EOF, 0, b, sizeof(b)) == 0) {
                atomic_store(&dk->up_eof, true);
            }
            break;
        }
        dk->up_bytes += (uint64_t)got;
        if (rdmax_disk_enc_chunk(enc, buf, (size_t)got, frame_out, dk) < 0) {
            break;
        }
    }
out:
    rdmax_disk_enc_destroy(enc);
    free(buf);
    return NULL;
}

/*
 * To QEMU. After QEMU closed the connection on its side (up_eof), what the
 * peer still sends has nobody to read it: dropped, not an error.
 */
static int qemu_write(struct disk *dk, const uint8_t *b, size_t n)
{
    while (n) {
        ssize_t k = write(dk->qemu_fd, b, n);
        if (k < 0 && errno == EINTR) {
            continue;
        }
        if (k < 0 && (errno == EPIPE || errno == ECONNRESET) && atomic_load(&dk->up_eof)) {
            return 0;
        }
        if (k < 0) {
            if (!disk_failed(dk)) {
                disk_fail(dk, false, true, "writing to QEMU: %s", strerror(errno));
            }
            return -1;
        }
        b += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Peer -> QEMU, until the peer's DISK_EOF (0) or a failure (-1). */
static int down(struct disk *dk)
{
    size_t cap = ZSTD_compressBound(RDMAX_DISK_CHUNK) + RDMAX_TAG_LEN;
    uint8_t *buf = malloc(cap);
    struct rdmax_disk_dec *dec = rdmax_disk_dec_create();
    struct rdmax_frame_hdr h;
    int ret = -1;

    if (!buf || !dec) {
        disk_fail(dk, false, true, "out of memory");
        goto out;
    }
    for (;;) {
        const uint8_t *data;
        size_t len;
        uint64_t sent;
        char err[300];
        int r = rdmax_wire_recv(dk->w, &h, buf, cap, dk->d->o.timeout_ms);

        if (r < 0) {
            if (!disk_failed(dk)) {
                disk_fail(dk, false, false, "from the %s at %s: %s", side(dk), dk->w->conn->peer,
                          rdmax_conn_strerror(dk->w->conn, r));
            }
            break;
        }
        if (h.type == RDMAX_F_KEEPALIVE) {
            continue;
        }
        if (h.type == RDMAX_F_ERROR) {
            char txt[RDMAX_PEER_TEXT_BUF];
            disk_fail(dk, false, false, "%s: %s", side(dk),
                      rdmax_peer_text(txt, sizeof(txt), buf, h.len));
            break;
        }
        r = rdmax_disk_dec_frame(dec, h.type, h.flags, buf, h.len, &data, &len, &sent, err,
                                 sizeof(err));
        if (r < 0) {
            disk_fail(dk, false, true, "from the %s: %s", side(dk), err);
            break;
        }
        if (r == 1) {
            if (sent != dk->down_bytes) {
                disk_fail(dk, false, true, "the %s sent %llu bytes, %llu arrived", side(dk),
                          (unsigned long long)sent, (unsigned long long)dk->down_bytes);
                break;
            }
            /* The peer's QEMU closed its side: so do we, and QEMU here sees EOF. */
            shutdown(dk->qemu_fd, SHUT_WR);
            ret = 0;
            break;
        }
        dk->down_bytes += len;
        if (qemu_write(dk, data, len) < 0) {
            break;
        }
    }
out:
    rdmax_disk_dec_destroy(dec);
    free(buf);
    return ret;
}

static double now_s(void)
{
    return rdmax_now();
}

/* Sender: the disk's own connection and handshake to the receiver. */
static int connect_peer(struct disk *dk, struct rdmax_wire *w)
{
    struct rdmax_session *ds = malloc(sizeof(*ds)); /* large: not on this small stack */
    char err[700];
    int r = ds ? rdmax_session_init(ds, &dk->d->o) : -ENOMEM;

    if (r < 0) {
        disk_fail(dk, false, false, "cannot set up a connection: %s", strerror(-r));
        free(ds);
        return r;
    }
    r = rdmax_session_connect_disk(ds, w, dk->k, err, sizeof(err));
    rdmax_session_destroy(ds);
    free(ds);
    if (r < 0) {
        disk_fail(dk, false, false, "%s", err);
    }
    return r;
}

static void *relay_main(void *arg)
{
    struct disk *dk = arg;
    struct rdmax_disks *d = dk->d;
    pthread_t up;
    pthread_attr_t a;
    bool up_started = false;

    if (d->o.sender) {
        struct rdmax_wire *w = calloc(1, sizeof(*w));
        if (!w) {
            disk_fail(dk, false, false, "out of memory");
            goto out;
        }
        if (connect_peer(dk, w) < 0) {
            if (w->conn) {
                rdmax_wire_destroy(w);
            }
            free(w);
            goto out;
        }
        pthread_mutex_lock(&dk->mu);
        dk->w = w;
        pthread_mutex_unlock(&dk->mu);
    } else {
        int fd = rdmax_unix_dial(d->o.disks_path, d->o.connect_timeout_ms);
        if (fd < 0) {
            disk_fail(dk, false, true,
                      "connecting to the destination QEMU's NBD server at unix:%s: %s",
                      d->o.disks_path, strerror(-fd));
            goto out;
        }
        pthread_mutex_lock(&dk->mu);
        dk->qemu_fd = fd;
        pthread_mutex_unlock(&dk->mu);
    }
    /* A failure (or an abort) while connecting shut nothing down that exists now. */
    if (disk_failed(dk)) {
        goto out;
    }
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, DISK_STACK);
    up_started = pthread_create(&up, &a, up_main, dk) == 0;
    pthread_attr_destroy(&a);
    if (!up_started) {
        disk_fail(dk, false, true, "cannot start a thread");
        goto out;
    }
    if (down(dk) < 0) {
        disk_fail(dk, true, false, "ended"); /* wakes up if it still waits */
    }
    pthread_join(up, NULL);
    atomic_fetch_add(disk_failed(dk) || !atomic_load(&dk->up_eof) ? &d->failed : &d->done, 1);
    if (!disk_failed(dk) && atomic_load(&dk->up_eof)) {
        fprintf(stderr,
                "rdma-x: note: disk connection %u done: %.1f MiB from QEMU (%.1f MiB on the "
                "wire), %.1f MiB to QEMU, %.1f s\n",
                dk->k + 1, (double)dk->up_bytes / 1048576.0, (double)dk->up_wire / 1048576.0,
                (double)dk->down_bytes / 1048576.0, now_s() - dk->t0);
    } else if (!disk_failed(dk)) {
        disk_fail(dk, false, false, "ended before QEMU closed it");
    }
out:
    pthread_mutex_lock(&dk->mu);
    if (dk->qemu_fd >= 0) {
        close(dk->qemu_fd);
        dk->qemu_fd = -1;
    }
    if (dk->w) {
        rdmax_wire_destroy(dk->w);
        free(dk->w);
        dk->w = NULL;
    }
    pthread_mutex_unlock(&dk->mu);
    atomic_store(&dk->ended, true);
    return NULL;
}

/* Join and free the disk connections that ended. d->mu held. */
static void reap_locked(struct rdmax_disks *d)
{
    for (struct disk **pp = &d->list; *pp;) {
        struct disk *dk = *pp;
        if (!atomic_load(&dk->ended)) {
            pp = &dk->next;
            continue;
        }
        pthread_join(dk->thread, NULL);
        if (d->o.sender) {
            d->used[dk->k] = false;
        }
        *pp = dk->next;
        pthread_mutex_destroy(&dk->mu);
        free(dk);
    }
}

/* A new disk connection: QEMU's socket (sender) or the peer's wire (receiver). */
static void disk_start(struct rdmax_disks *d, int qemu_fd, struct rdmax_wire *w, unsigned k)
{
    struct disk *dk = calloc(1, sizeof(*dk));
    pthread_attr_t a;

    pthread_mutex_lock(&d->mu);
    reap_locked(d);
    if (d->o.sender && dk) {
        for (k = 0; k < RDMAX_DISK_MAX && d->used[k]; k++) {
        }
    }
    if (!dk || d->finishing || k >= RDMAX_DISK_MAX) {
        pthread_mutex_unlock(&d->mu);
        fprintf(stderr, "rdma-x: error: disk connection refused: %s\n",
                !dk            ? "out of memory"
                : d->finishing ? "this rdma-x is exiting"
                               : "too many disk connections open at once");
        free(dk);
        if (qemu_fd >= 0) {
            close(qemu_fd);
        }
        if (w) {
            rdmax_wire_send(w, RDMAX_F_ERROR, 0, 0, "too many disk connections", 25);
            rdmax_wire_destroy(w);
            free(w);
        }
        return;
    }
    dk->d = d;
    dk->k = k;
    dk->qemu_fd = qemu_fd;
    dk->w = w;
    dk->t0 = now_s();
    pthread_mutex_init(&dk->mu, NULL);
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, DISK_STACK);
    dk->started = pthread_create(&dk->thread, &a, relay_main, dk) == 0;
    pthread_attr_destroy(&a);
    if (!dk->started) {
        pthread_mutex_unlock(&d->mu);
        fprintf(stderr, "rdma-x: error: disk connection %u: cannot start a thread\n", k + 1);
        atomic_store(&d->any_failed, true);
        if (qemu_fd >= 0) {
            close(qemu_fd);
        }
        if (w) {
            rdmax_wire_destroy(w);
            free(w);
        }
        pthread_mutex_destroy(&dk->mu);
        free(dk);
        return;
    }
    if (d->o.sender) {
        d->used[k] = true;
    }
    dk->next = d->list;
    d->list = dk;
    pthread_mutex_unlock(&d->mu);
}

static void *acceptor_main(void *arg)
{
    struct rdmax_disks *d = arg;

    for (;;) {
        struct pollfd p[2] = {{.fd = d->listen_fd, .events = POLLIN},
                              {.fd = d->stop_fd, .events = POLLIN}};
        if (poll(p, 2, -1) < 0 && errno != EINTR) {
            break;
        }
        if (p[1].revents) {
            break;
        }
        if (!(p[0].revents & POLLIN)) {
            continue;
        }
        int fd = accept4(d->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOMEM) {
                fprintf(stderr, "rdma-x: note: accepting a disk connection: %s\n", strerror(errno));
                poll(&p[1], 1, 100); /* let a connection end before trying again */
            }
            continue;
        }
        disk_start(d, fd, NULL, 0);
    }
    return NULL;
}

int rdmax_disks_start(const struct rdmax_opts *o, struct rdmax_disks **out)
{
    struct rdmax_disks *d = calloc(1, sizeof(*d));

    *out = NULL;
    if (!d) {
        fprintf(stderr, "rdma-x: error: out of memory\n");
        return -1;
    }
    d->o = *o;
    d->listen_fd = d->stop_fd = -1;
    pthread_mutex_init(&d->mu, NULL);
    if (o->sender) {
        d->stop_fd = eventfd(0, EFD_CLOEXEC);
        if (d->stop_fd < 0) {
            fprintf(stderr, "rdma-x: error: eventfd: %s\n", strerror(errno));
            goto fail;
        }
        d->listen_fd = rdmax_unix_listen(o->disks_path);
        if (d->listen_fd < 0) {
            goto fail;
        }
        d->acceptor_started = pthread_create(&d->acceptor, NULL, acceptor_main, d) == 0;
        if (!d->acceptor_started) {
            fprintf(stderr, "rdma-x: error: cannot start the thread for disk connections\n");
            goto fail;
        }
    }
    *out = d;
    return 0;
fail:
    if (d->listen_fd >= 0) {
        close(d->listen_fd);
        unlink(o->disks_path);
    }
    if (d->stop_fd >= 0) {
        close(d->stop_fd);
    }
    pthread_mutex_destroy(&d->mu);
    free(d);
    return -1;
}

void rdmax_disks_adopt(struct rdmax_disks *d, struct rdmax_wire *w, unsigned k)
{
    disk_start(d, -1, w, k);
}

void rdmax_disks_abort(struct rdmax_disks *d)
{
    if (!d) {
        return;
    }
    pthread_mutex_lock(&d->mu);
    for (struct disk *dk = d->list; dk; dk = dk->next) {
        disk_fail(dk, true, false, "the migration failed");
    }
    pthread_mutex_unlock(&d->mu);
}

void rdmax_disks_report(struct rdmax_disks *d, FILE *f, bool json)
{
    bool first = true;

    if (json) {
        fprintf(f, "{\"done\": %u, \"failed\": %u, \"open\": [", atomic_load(&d->done),
                atomic_load(&d->failed));
    } else {
        fprintf(f, "disk connections: %u done, %u failed", atomic_load(&d->done),
                atomic_load(&d->failed));
    }
    pthread_mutex_lock(&d->mu);
    for (struct disk *dk = d->list; dk; dk = dk->next) {
        if (atomic_load(&dk->ended)) {
            continue;
        }
        double mib = 1048576.0;
        if (json) {
            fprintf(f,
                    "%s{\"disk\": %u, \"seconds\": %.1f, \"bytes_from_qemu\": %llu, "
                    "\"bytes_wire\": %llu, \"bytes_to_qemu\": %llu}",
                    first ? "" : ", ", dk->k + 1, now_s() - dk->t0,
                    (unsigned long long)atomic_load(&dk->up_bytes),
                    (unsigned long long)atomic_load(&dk->up_wire),
                    (unsigned long long)atomic_load(&dk->down_bytes));
        } else {
            fprintf(f,
                    "\ndisk connection %u: open %.1f s, %.1f MiB from QEMU (%.1f MiB on the "
                    "wire), %.1f MiB to QEMU",
                    dk->k + 1, now_s() - dk->t0, (double)atomic_load(&dk->up_bytes) / mib,
                    (double)atomic_load(&dk->up_wire) / mib,
                    (double)atomic_load(&dk->down_bytes) / mib);
        }
        first = false;
    }
    pthread_mutex_unlock(&d->mu);
    fprintf(f, json ? "]}" : "");
}

int rdmax_disks_finish(struct rdmax_disks *d)
{
    bool failed;

    if (!d) {
        return 0;
    }
    if (d->acceptor_started) {
        uint64_t one = 1;
        if (write(d->stop_fd, &one, sizeof(one)) != sizeof(one)) {
            /* an eventfd takes it: cannot happen */
        }
        pthread_join(d->acceptor, NULL);
    }
    pthread_mutex_lock(&d->mu);
    d->finishing = true;
    struct disk *list = d->list;
    d->list = NULL;
    pthread_mutex_unlock(&d->mu);
    for (struct disk *dk = list, *next; dk; dk = next) {
        next = dk->next;
        pthread_join(dk->thread, NULL);
        pthread_mutex_destroy(&dk->mu);
        free(dk);
    }
    if (d->listen_fd >= 0) {
        close(d->listen_fd);
        unlink(d->o.disks_path);
    }
    if (d->stop_fd >= 0) {
        close(d->stop_fd);
    }
    failed = atomic_load(&d->any_failed);
    pthread_mutex_destroy(&d->mu);
    free(d);
    return failed ? -1 : 0;
}
