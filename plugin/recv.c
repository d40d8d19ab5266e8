/*
 * rdma-x recv: the destination side.
 *
 * control reader: CTRL frames -> zstd -> control ring; EOF with totals
 * lane thread k:  PAGES frames -> lane decoder -> lane ring k
 * return path:    qemu_in -> RP frames
 * main (splice):  control bytes -> the same parser as the sender; at each
 *                 page slot, the next page of lane hash(page) -> qemu_out
 *
 * The parser rebuilds the interleaving of control bytes and pages exactly,
 * so nothing about the order has to travel. Before the splice waits for
 * anything it writes out what it holds, so QEMU never waits on us.
 *
 * Errors: every thread records the first one in the session
 * (rdmax_session_error), which wakes the others; each then returns.
 * rdmax_recv_run joins them all and returns the error.
 */
#include "recv.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zstd.h>

#include "be.h"
#include "channels.h"
#include "front-unix.h"
#include "page-copy.h"
#include "queue.h"
#include "session.h"
#include "stream.h"

#define CTRL_CHUNK (64u << 10)
#define CTRL_RING_CHUNKS 64u /* 4 MiB of control bytes in flight */
#define LANE_RING_PAGES 256u
#define RP_BUF (64u << 10)

struct page_slot {
    struct rdmax_page_key key;
    /* Whole cache lines: the copy in and the writev out. */
    _Alignas(64) uint8_t data[RDMAX_PAGE_SIZE];
};

struct ctrl_chunk {
    uint32_t len;
    uint8_t data[CTRL_CHUNK];
};

struct rdmax_recv;

struct recv_lane {
    struct rdmax_recv *p;   /* set at start */
    unsigned idx;           /* set at start */
    struct rdmax_ring ring; /* lane thread -> splice */
    bool ring_ok;
    struct rdmax_lane_decoder *dec;
    uint64_t pages;     /* lane thread: pages decoded */
    uint64_t eof_pages; /* lane thread: count announced by LANE_EOF */
    pthread_t thread;
    bool started; /* main thread */
    /* Lane thread: is decoding this lane's bottleneck? (LANE_LOAD) */
    double win_start, win_wait;
    bool bound;
};

#define LOAD_WINDOW_S 0.01 /* half the sender's window: its verdict sees ours */

/*
 * Output to QEMU is gathered, not copied: an iovec per run of control bytes
 * (in the control ring's chunks) and per page (in its lane ring's slot),
 * written with one writev; the slots stay held until it returns.
 */
#define OUT_IOV 256
#define OUT_BYTES (1u << 20) /* write at least this much at a time while data flows */

struct out_gather {
    struct iovec iov[OUT_IOV];
    int n;
    size_t bytes;
    size_t ctrl_held;                  /* control chunks held, oldest first */
    size_t lane_held[RDMAX_LANES_MAX]; /* pages held per lane ring */
};

struct rdmax_recv {
    struct rdmax_session s;
    struct recv_lane lanes[RDMAX_LANES_MAX];
    struct rdmax_ring ctrl_ring;
    bool ctrl_ring_ok;
    uint64_t eof_stream_bytes, eof_pages; /* from EOF; read after ctrl_ring closes */
    unsigned eof_channels;                /* from EOF: QEMU channels besides the main one */
    struct rdmax_channels *ch;            /* --connect-unix: those channels */
    bool own_qemu_fds;                    /* --serve: s.o.qemu_in/out are ours to close */
    _Atomic bool stream_done;             /* splice finished, FIN_ACK sent */
    uint64_t out_total;                   /* splice */
    struct out_gather og;                 /* splice */
    struct rdmax_stream *st;
    pthread_t reader, rp;
    bool reader_started, rp_started;
};

static int lane_page(void *arg, struct rdmax_page_key key, const uint8_t *page)
{
    struct recv_lane *l = arg;
    struct page_slot *s = rdmax_ring_reserve(&l->ring, false);

    if (!s) {
        return -ECANCELED; /* aborted: the session failed */
    }
    s->key = key;
    rdmax_page_copy(s->data, page);
    rdmax_ring_commit(&l->ring);
    l->pages++;
    return 0;
}

/*
 * Tell the sender when this side, not the link, holds the pipe up: the
 * lane seldom waits for the next batch (it is decoding, or the splice and
 * QEMU behind it are slow, or it is starved of CPU). Its back-pressure
 * would otherwise read as a slow link there, and a slow link makes the
 * sender compress harder, which costs this host more CPU and gains no
 * throughput.
 */
static void lane_load(struct recv_lane *l, double t0, double t1)
{
    double now = rdmax_now(), wall;

    if (l->win_start == 0) {
        l->win_start = t1; /* the first batch's wait is the set-up, not the pipe */
        return;
    }
    l->win_wait += t1 - t0;
    wall = now - l->win_start;
    if (wall < LOAD_WINDOW_S) {
        return;
    }
    bool bound = l->win_wait < wall * 0.1;
    if (bound != l->bound) {
        uint8_t b = bound;
        l->bound = bound;
        /* Only a hint: a control connection that fails is reported by its reader. */
        (void)rdmax_wire_send(&l->p->s.ctrl, RDMAX_F_LANE_LOAD, 0, (uint16_t)(l->idx + 1), &b, 1);
    }
    l->win_start = now;
    l->win_wait = 0;
}

static void *lane_main(void *arg)
{
    struct recv_lane *l = arg;
    struct rdmax_session *s = &l->p->s;
    struct rdmax_wire *w = &s->lane[l->idx];
    /*
     * A lane carries batches, never longer than the encoder's bound: a
     * longer frame is refused at its header, so a hostile sender cannot
     * make each of 64 lanes hold a 4 MiB frame.
     */
    size_t cap = rdmax_lane_encoder_bound() + RDMAX_TAG_LEN;
    struct rdmax_frame_hdr h;
    uint8_t *buf;

    /*
     * Each frame is decoded where the transport received it (a loan,
     * rdmax_wire_recv_lend), and given back once its pages are copied out.
     */
    for (;;) {
        double t0 = rdmax_now();
        int r;
        /* The sender's keep-alives reach every lane: silence is a dead lane. */
        do {
            r = rdmax_wire_recv_lend(w, &h, &buf, cap, s->o.timeout_ms);
        } while (r == 0 && h.type == RDMAX_F_KEEPALIVE);
        if (r < 0) {
            rdmax_session_error(s, r, "lane %u from %s: %s", l->idx, w->conn->peer,
                                rdmax_conn_strerror(w->conn, r));
            break;
        }
        if (h.type == RDMAX_F_PAGES) {
            double t1 = rdmax_now();
            r = rdmax_lane_decoder_decode(l->dec, buf, h.len, lane_page, l);
            if (r < 0) {
                rdmax_session_error(s, -EBADMSG, "lane %u: corrupt page batch from the sender",
                                    l->idx);
                break;
            }
            lane_load(l, t0, t1);
        } else if (h.type == RDMAX_F_LANE_EOF && h.len == 8) {
            for (int i = 0; i < 8; i++) {
                l->eof_pages = l->eof_pages << 8 | buf[i];
            }
            if (l->eof_pages != l->pages) {
                rdmax_session_error(s, -EBADMSG, "lane %u: sender sent %llu pages, %llu arrived",
                                    l->idx, (unsigned long long)l->eof_pages,
                                    (unsigned long long)l->pages);
                break;
            }
            rdmax_ring_close(&l->ring);
            break;
        } else if (h.type == RDMAX_F_ERROR) {
            char txt[RDMAX_PEER_TEXT_BUF];
            rdmax_session_peer_error(s, -ECONNABORTED, "sender: %s",
                                     rdmax_peer_text(txt, sizeof(txt), buf, h.len));
            break;
        } else {
            rdmax_session_error(s, -EPROTO, "lane %u: unexpected %s frame", l->idx,
                                rdmax_frame_type_name(h.type));
            break;
        }
        rdmax_wire_recv_release(w);
    }
    rdmax_wire_recv_release(w);
    return NULL;
}

static int ctrl_push(struct rdmax_recv *p, const uint8_t *b, size_t n)
{
    while (n) {
        struct ctrl_chunk *c = rdmax_ring_reserve(&p->ctrl_ring, false);
        size_t k = n < CTRL_CHUNK ? n : CTRL_CHUNK;
        if (!c) {
            return rdmax_session_failed(&p->s);
        }
        memcpy(c->data, b, k);
        c->len = (uint32_t)k;
        rdmax_ring_commit(&p->ctrl_ring);
        b += k;
        n -= k;
    }
    return 0;
}

/* One CTRL frame through zstd into the control ring. 0 or the session's error. */
static int ctrl_bytes(struct rdmax_recv *p, ZSTD_DStream *z, uint8_t *zout, const uint8_t *buf,
                      size_t len)
{
    ZSTD_inBuffer in = {buf, len, 0};
    int r;

    while (in.pos < in.size) {
        ZSTD_outBuffer out = {zout, CTRL_CHUNK, 0};
        size_t zr = ZSTD_decompressStream(z, &out, &in);
        if (ZSTD_isError(zr)) {
            return rdmax_session_error(&p->s, -EBADMSG,
                                       "corrupt control stream from the sender: %s",
                                       ZSTD_getErrorName(zr));
        }
        r = ctrl_push(p, zout, out.pos);
        if (r < 0) {
            return r;
        }
        if (out.pos == 0 && in.pos < in.size && zr == 0) {
            break;
        }
    }
    /* Flushed blocks may leave output inside zstd: drain it. */
    for (;;) {
        ZSTD_outBuffer out = {zout, CTRL_CHUNK, 0};
        ZSTD_inBuffer none = {NULL, 0, 0};
        size_t zr = ZSTD_decompressStream(z, &out, &none);
        if (ZSTD_isError(zr)) {
            return rdmax_session_error(&p->s, -EBADMSG,
                                       "corrupt control stream from the sender: %s",
                                       ZSTD_getErrorName(zr));
        }
        if (out.pos == 0) {
            break;
        }
        r = ctrl_push(p, zout, out.pos);
        if (r < 0) {
            return r;
        }
    }
    return 0;
}

/*
 * Reads the control connection until the sender leaves. Once the session
 * failed it goes on reading and dropping frames until the peer closes or
 * the farewell cuts the connection, so our ERROR frame can arrive.
 */
static void *ctrl_reader_main(void *arg)
{
    struct rdmax_recv *p = arg;
    struct rdmax_session *s = &p->s;
    uint8_t *buf = malloc(RDMAX_FRAME_MAX + 1);
    uint8_t *zout = malloc(CTRL_CHUNK);
    ZSTD_DStream *z = ZSTD_createDStream();
    struct rdmax_frame_hdr h;
    bool eof = false;

    if (!buf || !zout || !z) {
        rdmax_session_error(s, -ENOMEM, "out of memory");
        goto out;
    }
    /* Bound the decoder's window: a hostile sender cannot make us allocate more. */
    ZSTD_DCtx_setParameter(z, ZSTD_d_windowLogMax, 23);
    for (;;) {
        int r = rdmax_wire_recv(&s->ctrl, &h, buf, RDMAX_FRAME_MAX, s->o.timeout_ms);
        if (r < 0) {
            if (eof && atomic_load(&p->stream_done) && r == -ECONNRESET) {
                break; /* the sender finished and left */
            }
            rdmax_session_error(s, r, "control connection from %s: %s", s->ctrl.conn->peer,
                                rdmax_conn_strerror(s->ctrl.conn, r));
            break;
        }
        if (rdmax_session_failed(s)) {
            if (h.type == RDMAX_F_ERROR) {
                break; /* the peer failed too: it waits for nothing from us */
            }
            continue; /* the farewell's drain */
        }
        switch (h.type) {
        case RDMAX_F_CTRL:
            if (eof || !(h.flags & RDMAX_FF_ZSTD)) {
                rdmax_session_error(s, -EPROTO, "sender broke the protocol (control bytes %s)",
                                    eof ? "after EOF" : "not compressed");
                break;
            }
            ctrl_bytes(p, z, zout, buf, h.len);
            break;
        case RDMAX_F_EOF:
            /* 20 bytes when the sender carried QEMU channels: their count. */
            if ((h.len != 16 && h.len != 20) || eof ||
                (h.len == 20 && rdmax_get_be32(buf + 16) > RDMAX_CHAN_MAX)) {
                rdmax_session_error(s, -EPROTO, "sender broke the protocol (EOF frame)");
                break;
            }
            p->eof_stream_bytes = rdmax_get_be64(buf);
            p->eof_pages = rdmax_get_be64(buf + 8);
            p->eof_channels = h.len == 20 ? rdmax_get_be32(buf + 16) : 0;
            eof = true;
            rdmax_ring_close(&p->ctrl_ring);
            break;
        case RDMAX_F_ERROR: {
            char txt[RDMAX_PEER_TEXT_BUF];
            rdmax_session_peer_error(s, -ECONNABORTED, "sender: %s",
                                     rdmax_peer_text(txt, sizeof(txt), buf, h.len));
            goto out;
        }
        case RDMAX_F_KEEPALIVE:
            break;
        default:
            rdmax_session_error(s, -EPROTO,
                                "sender sent an unexpected %s frame on the control connection",
                                rdmax_frame_type_name(h.type));
        }
    }
out:
    ZSTD_freeDStream(z);
    free(zout);
    free(buf);
    rdmax_session_reader_done(s);
    return NULL;
}

/*
 * Where the destination QEMU's return-path messages (be16 type, be16 len,
 * payload) begin, to know whether the last one was SHUT: QEMU sends SHUT
 * whenever it ends a migration whose return path it opened, even a failed
 * one, so an open return path that closes without one is a QEMU that
 * died. RECV_BITMAP (postcopy recovery) carries unframed data: the scan
 * gives up there.
 */
struct rp_scan {
    uint8_t hdr[4];
    unsigned have;
    uint32_t skip;
    bool lost, shut;
};

static void rp_scan(struct rp_scan *sc, const uint8_t *b, size_t n)
{
    while (n && !sc->lost) {
        if (sc->skip) {
            size_t k = n < sc->skip ? n : sc->skip;
            sc->skip -= (uint32_t)k;
            b += k;
            n -= k;
            continue;
        }
        sc->hdr[sc->have++] = *b++;
        n--;
        if (sc->have == 4) {
            unsigned type = (unsigned)sc->hdr[0] << 8 | sc->hdr[1];
            sc->skip = (uint32_t)sc->hdr[2] << 8 | sc->hdr[3];
            sc->have = 0;
            sc->shut = type == 1;
            sc->lost = type == 0 || type == 5 || type > 7;
        }
    }
}

static void *rp_main(void *arg)
{
    struct rdmax_recv *p = arg;
    struct rdmax_session *s = &p->s;
    uint8_t *buf = malloc(RP_BUF);
    struct rp_scan sc = {0};
    bool rp_seen = false;

    if (!buf) {
        rdmax_session_error(s, -ENOMEM, "out of memory");
        return NULL;
    }
    for (;;) {
        ssize_t n;
        int r = rdmax_session_wait_fd(s, s->o.qemu_in, POLLIN);
        if (r < 0) {
            break;
        }
        n = read(s->o.qemu_in, buf, RP_BUF);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
            continue;
        }
        if (n <= 0) {
            /* QEMU closed its end: it finished, or gave up on the stream. */
            if (s->o.unix_path && rp_seen && !sc.lost && !sc.shut &&
                !atomic_load(&p->stream_done)) {
                /*
                 * The destination QEMU died mid-stream: say so here.
                 * Passed on as RP_EOF, the source QEMU (over the unix
                 * front end, whose return path then ends) would fail
                 * first, and both sides would blame it.
                 */
                rdmax_session_error(s, -EPIPE,
                                    "destination QEMU closed its socket before the stream "
                                    "ended (it exited, or rejected the migration)");
                break;
            }
            /* Mid-stream, the splice notices the closed qemu_out on its own. */
            r = rdmax_wire_send(&s->ctrl, RDMAX_F_RP_EOF, 0, 0, NULL, 0);
            if (r < 0 && !atomic_load(&p->stream_done)) {
                rdmax_session_error(s, r, "control connection: %s",
                                    rdmax_conn_strerror(s->ctrl.conn, r));
            }
            break;
        }
        atomic_fetch_add_explicit(&s->c.rp_bytes, (uint64_t)n, memory_order_relaxed);
        rp_seen = true;
        rp_scan(&sc, buf, (size_t)n);
        r = rdmax_wire_send(&s->ctrl, RDMAX_F_RP, 0, 0, buf, (size_t)n);
        if (r < 0 && !atomic_load(&p->stream_done)) {
            rdmax_session_error(s, r, "control connection: %s",
                                rdmax_conn_strerror(s->ctrl.conn, r));
            break;
        }
    }
    free(buf);
    return NULL;
}

static int out_flush(struct rdmax_recv *p)
{
    struct rdmax_session *s = &p->s;
    struct out_gather *og = &p->og;
    struct iovec *v = og->iov;
    int n = og->n;

    while (n) {
        ssize_t w = writev(s->o.qemu_out, v, n); /* n <= OUT_IOV, below IOV_MAX */
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN) {
                /* qemu_out is non-blocking: wait for room, or for the session to fail. */
                int r = rdmax_session_wait_fd(s, s->o.qemu_out, POLLOUT);
                if (r < 0) {
                    return r;
                }
                continue;
            }
            return rdmax_session_error(
                s, -errno, "destination QEMU closed the stream (it rejected the migration?): %s",
                strerror(errno));
        }
        p->out_total += (uint64_t)w;
        while (n && (size_t)w >= v->iov_len) {
            w -= (ssize_t)v->iov_len;
            v++;
            n--;
        }
        if (n) {
            v->iov_base = (uint8_t *)v->iov_base + w;
            v->iov_len -= (size_t)w;
        }
    }
    og->n = 0;
    og->bytes = 0;
    atomic_store_explicit(&s->c.bytes_in, p->out_total, memory_order_relaxed);
    rdmax_ring_release_n(&p->ctrl_ring, og->ctrl_held);
    og->ctrl_held = 0;
    for (unsigned i = 0; i < s->nlanes; i++) {
        rdmax_ring_release_n(&p->lanes[i].ring, og->lane_held[i]);
        og->lane_held[i] = 0;
    }
    return 0;
}

static int out_put(struct rdmax_recv *p, const uint8_t *b, size_t n)
{
    struct out_gather *og = &p->og;

    if (n == 0) {
        return 0;
    }
    if (og->n && (uint8_t *)og->iov[og->n - 1].iov_base + og->iov[og->n - 1].iov_len == b) {
        og->iov[og->n - 1].iov_len += n;
    } else {
        if (og->n == OUT_IOV) {
            int r = out_flush(p);
            if (r < 0) {
                return r;
            }
        }
        og->iov[og->n].iov_base = (void *)b;
        og->iov[og->n].iov_len = n;
        og->n++;
    }
    og->bytes += n;
    return 0;
}

/*
 * The next item of a ring after the `held` ones whose bytes are gathered;
 * writes out (and so releases) those before it waits. NULL at the end, or
 * when the session failed. The caller counts the item as held once its
 * bytes are gathered too: a flush before that must not release it.
 */
static void *ring_next(struct rdmax_recv *p, struct rdmax_ring *r, size_t held)
{
    void *s = rdmax_ring_peek_at(r, held);

    if (!s) {
        if (out_flush(p) < 0) {
            return NULL;
        }
        s = rdmax_ring_peek(r, false);
    }
    return s;
}

static int splice(struct rdmax_recv *p)
{
    struct rdmax_session *s = &p->s;
    struct rdmax_stream *st = p->st;
    struct out_gather *og = &p->og;
    uint64_t pages = 0;
    int r;

    for (;;) {
        struct ctrl_chunk *c = ring_next(p, &p->ctrl_ring, og->ctrl_held);
        size_t pos = 0;

        if (rdmax_session_failed(s)) {
            return rdmax_session_failed(s);
        }
        if (!c) {
            break; /* EOF frame and every control byte consumed */
        }
        while (pos < c->len) {
            bool page;
            struct rdmax_page_key key;
            ssize_t n = rdmax_stream_scan(st, c->data + pos, c->len - pos, &page, &key);
            if (n < 0) {
                return rdmax_session_error(s, -EBADMSG, "%s", rdmax_stream_error(st));
            }
            r = out_put(p, c->data + pos, (size_t)n);
            if (r < 0) {
                return r;
            }
            pos += (size_t)n;
            if (page) {
                unsigned k = rdmax_stream_lane_of(key, s->nlanes);
                struct page_slot *sl = ring_next(p, &p->lanes[k].ring, og->lane_held[k]);
                if (rdmax_session_failed(s)) {
                    return rdmax_session_failed(s);
                }
                if (!sl) {
                    return rdmax_session_error(s, -EBADMSG,
                                               "lane %u ended before page 0x%llx of block %u", k,
                                               (unsigned long long)key.offset, key.block);
                }
                if (sl->key.block != key.block || sl->key.offset != key.offset) {
                    return rdmax_session_error(
                        s, -EBADMSG, "lane %u out of step: expected page 0x%llx, got 0x%llx", k,
                        (unsigned long long)key.offset, (unsigned long long)sl->key.offset);
                }
                r = out_put(p, sl->data, RDMAX_PAGE_SIZE);
                if (r < 0) {
                    return r;
                }
                og->lane_held[k]++;
                rdmax_stream_page_done(st);
                pages++;
                atomic_store_explicit(&s->c.pages, pages, memory_order_relaxed);
            }
        }
        og->ctrl_held++;
        if (og->bytes >= OUT_BYTES) {
            r = out_flush(p);
            if (r < 0) {
                return r;
            }
        }
    }
    if (rdmax_stream_finish(st) < 0) {
        return rdmax_session_error(s, -EBADMSG, "%s", rdmax_stream_error(st));
    }
    r = out_flush(p);
    if (r < 0) {
        return r;
    }
    if (p->out_total != p->eof_stream_bytes || pages != p->eof_pages) {
        return rdmax_session_error(
            s, -EBADMSG, "stream ended with %llu bytes and %llu pages, sender sent %llu and %llu",
            (unsigned long long)p->out_total, (unsigned long long)pages,
            (unsigned long long)p->eof_stream_bytes, (unsigned long long)p->eof_pages);
    }
    for (unsigned i = 0; i < s->nlanes; i++) {
        pthread_join(p->lanes[i].thread, NULL);
        p->lanes[i].started = false;
        if (rdmax_session_failed(s)) {
            return rdmax_session_failed(s);
        }
        if (!rdmax_ring_closed_and_empty(&p->lanes[i].ring)) {
            return rdmax_session_error(s, -EBADMSG,
                                       "lane %u carried pages the stream has no place for", i);
        }
    }
    atomic_store(&s->c.zero_pages, rdmax_stream_stats(st)->zero_pages);
    atomic_store(&s->c.ctrl_bytes, p->out_total - pages * RDMAX_PAGE_SIZE);
    return 0;
}

int rdmax_recv_create(const struct rdmax_opts *o, struct rdmax_recv **out)
{
    struct rdmax_recv *p = calloc(1, sizeof(*p));
    int r;

    if (!p) {
        return -ENOMEM;
    }
    r = rdmax_session_init(&p->s, o);
    if (r < 0) {
        free(p);
        return r;
    }
    p->st = rdmax_stream_create(RDMAX_STREAM_ELIDED);
    if (!p->st || rdmax_ring_init(&p->ctrl_ring, sizeof(struct ctrl_chunk), CTRL_RING_CHUNKS) < 0) {
        rdmax_recv_destroy(p);
        return -ENOMEM;
    }
    p->ctrl_ring_ok = true;
    rdmax_session_add_ring(&p->s, &p->ctrl_ring);
    *out = p;
    return 0;
}

struct rdmax_session *rdmax_recv_session(struct rdmax_recv *p)
{
    return &p->s;
}

static int lanes_start(struct rdmax_recv *p)
{
    struct rdmax_session *s = &p->s;

    for (unsigned i = 0; i < s->nlanes; i++) {
        struct recv_lane *l = &p->lanes[i];
        l->p = p;
        l->idx = i;
        if (rdmax_ring_init(&l->ring, sizeof(struct page_slot), LANE_RING_PAGES) < 0) {
            return rdmax_session_error(s, -ENOMEM, "out of memory setting up lane %u", i);
        }
        l->ring_ok = true;
        rdmax_session_add_ring(s, &l->ring);
        if (rdmax_lane_decoder_create(&s->codec, &l->dec) < 0) {
            return rdmax_session_error(s, -ENOMEM, "out of memory setting up lane %u", i);
        }
        (void)rdmax_lane_decoder_populate(l->dec,
                                          POPULATE_AHEAD_TOTAL / s->nlanes); /* only a head start */
        if (pthread_create(&l->thread, NULL, lane_main, l) != 0) {
            return rdmax_session_error(s, -EAGAIN, "cannot start the thread of lane %u", i);
        }
        l->started = true;
    }
    return 0;
}

/*
 * --serve: the destination QEMU is connected once a sender is in (the
 * next one may be started long after the previous migration ended).
 */
static int connect_qemu(struct rdmax_recv *p)
{
    struct rdmax_session *s = &p->s;
    int fd = rdmax_unix_dial(s->o.unix_path, s->o.connect_timeout_ms), fd2;

    if (fd < 0) {
        return rdmax_session_error(s, fd, "connect to destination QEMU at unix:%s: %s",
                                   s->o.unix_path, strerror(-fd));
    }
    fd2 = dup(fd);
    if (fd2 < 0) {
        close(fd);
        return rdmax_session_error(s, -errno, "dup: %s", strerror(errno));
    }
    pthread_mutex_lock(&s->mu);
    if (rdmax_session_failed(s)) {
        pthread_mutex_unlock(&s->mu);
        close(fd);
        close(fd2);
        return rdmax_session_failed(s);
    }
    s->o.qemu_in = fd;
    s->o.qemu_out = fd2;
    p->own_qemu_fds = true;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

int rdmax_recv_run(struct rdmax_recv *p)
{
    struct rdmax_session *s = &p->s;
    int r, fl = -1;

    if (s->o.unix_path && !rdmax_session_failed(s)) {
        p->ch = rdmax_channels_recv_create(s, s->o.unix_path);
        if (!p->ch) {
            return rdmax_session_error(s, -ENOMEM, "out of memory");
        }
    }
    r = rdmax_session_accept(s);
    if (r == 0 && s->o.qemu_out < 0) {
        r = connect_qemu(p);
    }
    if (r == 0) {
        r = lanes_start(p);
    }
    if (r == 0 && rdmax_session_reader_start(s)) {
        if (pthread_create(&p->reader, NULL, ctrl_reader_main, p) != 0) {
            rdmax_session_reader_done(s);
            r = rdmax_session_error(s, -EAGAIN, "cannot start the control reader");
        } else {
            p->reader_started = true;
        }
    }
    if (r == 0 && pthread_create(&p->rp, NULL, rp_main, p) != 0) {
        r = rdmax_session_error(s, -EAGAIN, "cannot start the return-path thread");
    } else if (r == 0) {
        p->rp_started = true;
    }
    r = rdmax_session_failed(s);
    if (r < 0) {
        goto out;
    }
    /*
     * Never block in a write to QEMU past an error: out_flush polls. The
     * flag is put back at the end (the file may be shared, say a terminal).
     */
    fl = fcntl(s->o.qemu_out, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK)) {
        fcntl(s->o.qemu_out, F_SETFL, fl | O_NONBLOCK);
    } else {
        fl = -1;
    }
    rdmax_keepalive_start(s);
    rdmax_progress_start(s);

    r = splice(p);
    if (r < 0) {
        goto out;
    }
    /* Every QEMU channel too must have reached the destination QEMU before we say so. */
    if (p->ch) {
        r = rdmax_channels_recv_wait(p->ch, p->eof_channels);
    } else if (p->eof_channels) {
        r = rdmax_session_error(s, -EPROTO, "sender announced QEMU channels it never opened");
    }
    if (r < 0) {
        goto out;
    }
    atomic_store(&p->stream_done, true);
    atomic_store(&s->finishing, true);
    r = rdmax_wire_send(&s->ctrl, RDMAX_F_FIN_ACK, 0, 0, NULL, 0);
    if (r < 0) {
        r = rdmax_session_error(s, r, "control connection: %s",
                                rdmax_conn_strerror(s->ctrl.conn, r));
        goto out;
    }
    /* Keep relaying the return path (QEMU's SHUT) until QEMU closes it. */
    pthread_join(p->rp, NULL);
    p->rp_started = false;
    r = rdmax_session_failed(s);
out:
    if (fl >= 0 && !rdmax_session_failed(s)) {
        fcntl(s->o.qemu_out, F_SETFL, fl);
    }
    /* Keep-alives stop; on success the sender closes once it has our FIN_ACK. */
    rdmax_session_stop(s);
    for (unsigned i = 0; i < RDMAX_LANES_MAX; i++) {
        if (p->lanes[i].started) {
            pthread_join(p->lanes[i].thread, NULL);
            p->lanes[i].started = false;
        }
    }
    if (p->rp_started) {
        pthread_join(p->rp, NULL);
        p->rp_started = false;
    }
    if (p->reader_started) {
        pthread_join(p->reader, NULL);
        p->reader_started = false;
    }
    rdmax_channels_join(p->ch);
    return r < 0 ? r : rdmax_session_failed(s);
}

void rdmax_recv_destroy(struct rdmax_recv *p)
{
    if (!p) {
        return;
    }
    rdmax_session_stop(&p->s);
    for (unsigned i = 0; i < RDMAX_LANES_MAX; i++) {
        if (p->lanes[i].ring_ok) {
            rdmax_ring_destroy(&p->lanes[i].ring);
        }
        rdmax_lane_decoder_destroy(p->lanes[i].dec);
    }
    if (p->ctrl_ring_ok) {
        rdmax_ring_destroy(&p->ctrl_ring);
    }
    rdmax_channels_destroy(p->ch);
    rdmax_stream_destroy(p->st);
    if (p->own_qemu_fds) {
        close(p->s.o.qemu_in);
        close(p->s.o.qemu_out);
    }
    rdmax_session_destroy(&p->s);
    free(p);
}
