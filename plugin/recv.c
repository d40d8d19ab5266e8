/*
 * rdma-x recv: the destination side.
 *
 * control reader: CTRL frames -> zstd -> control ring; EOF with totals
 * lane thread k:  PAGES frames -> lane decoder -> lane ring k
 * return path:    stdin -> RP frames
 * main (splice):  control bytes -> the same parser as the sender; at each
 *                 page slot, the next page of lane hash(page) -> stdout
 *
 * The parser rebuilds the interleaving of control bytes and pages exactly,
 * so nothing about the order has to travel. Before the splice waits for
 * anything it writes out what it holds, so QEMU never waits on us.
 */
#include "recv.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <sys/uio.h>
#include <unistd.h>
#include <zstd.h>

#include "queue.h"
#include "session.h"
#include "stream.h"

#define CTRL_CHUNK (64u << 10)
#define CTRL_RING_CHUNKS 64u /* 4 MiB of control bytes in flight */
#define LANE_RING_PAGES 256u
#define RP_BUF (64u << 10)

struct page_slot {
    struct rdmax_page_key key;
    uint8_t data[RDMAX_PAGE_SIZE];
};

struct ctrl_chunk {
    uint32_t len;
    uint8_t data[CTRL_CHUNK];
};

struct recv_lane {
    unsigned idx;
    struct rdmax_ring ring; /* lane thread -> splice */
    struct rdmax_lane_decoder *dec;
    uint64_t pages;     /* lane thread: pages decoded */
    uint64_t eof_pages; /* lane thread: count announced by LANE_EOF */
    pthread_t thread;
    /* Lane thread: is decoding this lane's bottleneck? (LANE_LOAD) */
    double win_start, win_wait, win_blocked;
    bool bound;
};

#define LOAD_WINDOW_S 0.01 /* half the sender's window: its verdict sees ours */

static struct recv_lane lanes[RDMAX_LANES_MAX];
static struct rdmax_ring ctrl_ring;
static uint64_t eof_stream_bytes, eof_pages; /* from EOF; read after ctrl_ring closes */
static _Atomic bool stream_done;             /* splice finished, FIN_ACK sent */

static uint64_t out_total;

static int lane_page(void *arg, struct rdmax_page_key key, const uint8_t *page)
{
    struct recv_lane *l = arg;
    struct page_slot *s = rdmax_ring_reserve(&l->ring, true);

    if (!s) { /* the splice (QEMU) is slower than this lane */
        double t0 = rdmax_now();
        s = rdmax_ring_reserve(&l->ring, false);
        l->win_blocked += rdmax_now() - t0;
    }
    s->key = key;
    memcpy(s->data, page, RDMAX_PAGE_SIZE);
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
        (void)rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_LANE_LOAD, 0, (uint16_t)(l->idx + 1), &b, 1);
    }
    l->win_start = now;
    l->win_wait = l->win_blocked = 0;
}

static void *lane_main(void *arg)
{
    struct recv_lane *l = arg;
    struct rdmax_wire *w = &rdmax_s.lane[l->idx];
    /*
     * A lane carries batches, never longer than the encoder's bound: a
     * longer frame is refused at its header, so a hostile sender cannot
     * make each of 64 lanes hold a 4 MiB frame.
     */
    size_t cap = rdmax_lane_encoder_bound() + RDMAX_TAG_LEN;
    uint8_t *buf = malloc(cap + 1);
    struct rdmax_frame_hdr h;

    if (!buf) {
        rdmax_fail("out of memory");
    }
    for (;;) {
        double t0 = rdmax_now();
        int r;
        /* The sender's keep-alives reach every lane: silence is a dead lane. */
        do {
            r = rdmax_wire_recv(w, &h, buf, cap, rdmax_s.o.timeout_ms);
        } while (r == 0 && h.type == RDMAX_F_KEEPALIVE);
        if (r < 0) {
            rdmax_fail("lane %u from %s: %s", l->idx, w->conn->peer, rdmax_wire_strerror(r));
        }
        if (h.type == RDMAX_F_PAGES) {
            double t1 = rdmax_now();
            r = rdmax_lane_decoder_decode(l->dec, buf, h.len, lane_page, l);
            if (r < 0) {
                rdmax_fail("lane %u: corrupt page batch from the sender", l->idx);
            }
            lane_load(l, t0, t1);
        } else if (h.type == RDMAX_F_LANE_EOF && h.len == 8) {
            for (int i = 0; i < 8; i++) {
                l->eof_pages = l->eof_pages << 8 | buf[i];
            }
            if (l->eof_pages != l->pages) {
                rdmax_fail("lane %u: sender sent %llu pages, %llu arrived", l->idx,
                           (unsigned long long)l->eof_pages, (unsigned long long)l->pages);
            }
            rdmax_ring_close(&l->ring);
            break;
        } else if (h.type == RDMAX_F_ERROR) {
            char txt[RDMAX_PEER_TEXT_BUF];
            rdmax_fail("sender: %s", rdmax_peer_text(txt, sizeof(txt), buf, h.len));
        } else {
            rdmax_fail("lane %u: unexpected %s frame", l->idx, rdmax_frame_type_name(h.type));
        }
    }
    free(buf);
    return NULL;
}

static void ctrl_push(const uint8_t *p, size_t n)
{
    while (n) {
        struct ctrl_chunk *c = rdmax_ring_reserve(&ctrl_ring, false);
        size_t k = n < CTRL_CHUNK ? n : CTRL_CHUNK;
        memcpy(c->data, p, k);
        c->len = (uint32_t)k;
        rdmax_ring_commit(&ctrl_ring);
        p += k;
        n -= k;
    }
}

static void *ctrl_reader_main(void *arg)
{
    uint8_t *buf = malloc(RDMAX_FRAME_MAX + 1);
    uint8_t *zout = malloc(CTRL_CHUNK);
    ZSTD_DStream *z = ZSTD_createDStream();
    struct rdmax_frame_hdr h;
    bool eof = false;

    if (!buf || !zout || !z) {
        rdmax_fail("out of memory");
    }
    /* Bound the decoder's window: a hostile sender cannot make us allocate more. */
    ZSTD_DCtx_setParameter(z, ZSTD_d_windowLogMax, 23);
    for (;;) {
        int r = rdmax_wire_recv(&rdmax_s.ctrl, &h, buf, RDMAX_FRAME_MAX, rdmax_s.o.timeout_ms);
        if (r < 0) {
            if (eof && atomic_load(&stream_done) && r == -ECONNRESET) {
                break; /* the sender finished and left */
            }
            rdmax_fail("control connection from %s: %s", rdmax_s.ctrl.conn->peer,
                       rdmax_wire_strerror(r));
        }
        switch (h.type) {
        case RDMAX_F_CTRL: {
            ZSTD_inBuffer in = {buf, h.len, 0};
            if (eof || !(h.flags & RDMAX_FF_ZSTD)) {
                rdmax_fail("sender broke the protocol (control bytes %s)",
                           eof ? "after EOF" : "not compressed");
            }
            while (in.pos < in.size) {
                ZSTD_outBuffer out = {zout, CTRL_CHUNK, 0};
                size_t zr = ZSTD_decompressStream(z, &out, &in);
                if (ZSTD_isError(zr)) {
                    rdmax_fail("corrupt control stream from the sender: %s", ZSTD_getErrorName(zr));
                }
                ctrl_push(zout, out.pos);
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
                    rdmax_fail("corrupt control stream from the sender: %s", ZSTD_getErrorName(zr));
                }
                if (out.pos == 0) {
                    break;
                }
                ctrl_push(zout, out.pos);
            }
            break;
        }
        case RDMAX_F_EOF:
            if (h.len != 16 || eof) {
                rdmax_fail("sender broke the protocol (EOF frame)");
            }
            for (int i = 0; i < 8; i++) {
                eof_stream_bytes = eof_stream_bytes << 8 | buf[i];
                eof_pages = eof_pages << 8 | buf[8 + i];
            }
            eof = true;
            rdmax_ring_close(&ctrl_ring);
            break;
        case RDMAX_F_ERROR: {
            char txt[RDMAX_PEER_TEXT_BUF];
            rdmax_fail("sender: %s", rdmax_peer_text(txt, sizeof(txt), buf, h.len));
        }
        case RDMAX_F_KEEPALIVE:
            break;
        default:
            rdmax_fail("sender sent an unexpected %s frame on the control connection",
                       rdmax_frame_type_name(h.type));
        }
    }
    ZSTD_freeDStream(z);
    free(zout);
    free(buf);
    return arg;
}

static void *rp_main(void *arg)
{
    uint8_t *buf = malloc(RP_BUF);

    if (!buf) {
        rdmax_fail("out of memory");
    }
    for (;;) {
        ssize_t n = read(STDIN_FILENO, buf, RP_BUF);
        int r;
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            /* QEMU closed its end: it finished, or gave up on the stream. */
            /* Mid-stream, the splice notices the closed stdout on its own. */
            r = rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_RP_EOF, 0, 0, NULL, 0);
            if (r < 0 && !atomic_load(&stream_done)) {
                rdmax_fail("control connection: %s", rdmax_wire_strerror(r));
            }
            break;
        }
        atomic_fetch_add_explicit(&rdmax_s.c.rp_bytes, (uint64_t)n, memory_order_relaxed);
        r = rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_RP, 0, 0, buf, (size_t)n);
        if (r < 0 && !atomic_load(&stream_done)) {
            rdmax_fail("control connection: %s", rdmax_wire_strerror(r));
        }
    }
    free(buf);
    return arg;
}

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

static struct out_gather og;

static void out_flush(void)
{
    struct iovec *v = og.iov;
    int n = og.n;

    while (n) {
        ssize_t w = writev(STDOUT_FILENO, v, n); /* n <= OUT_IOV, below IOV_MAX */
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            rdmax_fail("destination QEMU closed the stream (it rejected the migration?): %s",
                       strerror(errno));
        }
        out_total += (uint64_t)w;
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
    og.n = 0;
    og.bytes = 0;
    atomic_store_explicit(&rdmax_s.c.bytes_in, out_total, memory_order_relaxed);
    rdmax_ring_release_n(&ctrl_ring, og.ctrl_held);
    og.ctrl_held = 0;
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        rdmax_ring_release_n(&lanes[i].ring, og.lane_held[i]);
        og.lane_held[i] = 0;
    }
}

static void out_put(const uint8_t *p, size_t n)
{
    if (n == 0) {
        return;
    }
    if (og.n && (uint8_t *)og.iov[og.n - 1].iov_base + og.iov[og.n - 1].iov_len == p) {
        og.iov[og.n - 1].iov_len += n;
    } else {
        if (og.n == OUT_IOV) {
            out_flush();
        }
        og.iov[og.n].iov_base = (void *)p;
        og.iov[og.n].iov_len = n;
        og.n++;
    }
    og.bytes += n;
}

/*
 * The next item of a ring after the `held` ones whose bytes are gathered;
 * writes out (and so releases) those before it waits. NULL at the end. The
 * caller counts the item as held once its bytes are gathered too: a flush
 * before that must not release it.
 */
static void *ring_next(struct rdmax_ring *r, size_t held)
{
    void *s = rdmax_ring_peek_at(r, held);

    if (!s) {
        out_flush();
        s = rdmax_ring_peek(r, false);
    }
    return s;
}

static void splice(struct rdmax_stream *st)
{
    uint64_t pages = 0;

    for (;;) {
        struct ctrl_chunk *c = ring_next(&ctrl_ring, og.ctrl_held);
        size_t pos = 0;

        if (!c) {
            break; /* EOF frame and every control byte consumed */
        }
        while (pos < c->len) {
            bool page;
            struct rdmax_page_key key;
            ssize_t n = rdmax_stream_scan(st, c->data + pos, c->len - pos, &page, &key);
            if (n < 0) {
                rdmax_fail("%s", rdmax_stream_error(st));
            }
            out_put(c->data + pos, (size_t)n);
            pos += (size_t)n;
            if (page) {
                unsigned k = rdmax_stream_lane_of(key, rdmax_s.nlanes);
                struct page_slot *s = ring_next(&lanes[k].ring, og.lane_held[k]);
                if (!s) {
                    rdmax_fail("lane %u ended before page 0x%llx of block %u", k,
                               (unsigned long long)key.offset, key.block);
                }
                if (s->key.block != key.block || s->key.offset != key.offset) {
                    rdmax_fail("lane %u out of step: expected page 0x%llx, got 0x%llx", k,
                               (unsigned long long)key.offset, (unsigned long long)s->key.offset);
                }
                out_put(s->data, RDMAX_PAGE_SIZE);
                og.lane_held[k]++;
                rdmax_stream_page_done(st);
                pages++;
                atomic_store_explicit(&rdmax_s.c.pages, pages, memory_order_relaxed);
            }
        }
        og.ctrl_held++;
        if (og.bytes >= OUT_BYTES) {
            out_flush();
        }
    }
    if (rdmax_stream_finish(st) < 0) {
        rdmax_fail("%s", rdmax_stream_error(st));
    }
    out_flush();
    if (out_total != eof_stream_bytes || pages != eof_pages) {
        rdmax_fail("stream ended with %llu bytes and %llu pages, sender sent %llu and %llu",
                   (unsigned long long)out_total, (unsigned long long)pages,
                   (unsigned long long)eof_stream_bytes, (unsigned long long)eof_pages);
    }
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        pthread_join(lanes[i].thread, NULL);
        if (!rdmax_ring_closed_and_empty(&lanes[i].ring)) {
            rdmax_fail("lane %u carried pages the stream has no place for", i);
        }
    }
    atomic_store(&rdmax_s.c.zero_pages, rdmax_stream_stats(st)->zero_pages);
    atomic_store(&rdmax_s.c.ctrl_bytes, out_total - pages * RDMAX_PAGE_SIZE);
}

int rdmax_recv_run(void)
{
    struct rdmax_stream *st = rdmax_stream_create(RDMAX_STREAM_ELIDED);
    pthread_t reader, rp;
    int r;

    if (!st ||
        rdmax_ring_init(&ctrl_ring, sizeof(struct ctrl_chunk), CTRL_RING_CHUNKS) < 0) {
        rdmax_fail("out of memory");
    }
    rdmax_session_accept();
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        struct recv_lane *l = &lanes[i];
        l->idx = i;
        if (rdmax_ring_init(&l->ring, sizeof(struct page_slot), LANE_RING_PAGES) < 0 ||
            rdmax_lane_decoder_create(&rdmax_s.codec, &l->dec) < 0) {
            rdmax_fail("out of memory setting up lane %u", i);
        }
        (void)rdmax_lane_decoder_populate(l->dec, POPULATE_AHEAD_TOTAL / rdmax_s.nlanes); /* only a head start */
        pthread_create(&l->thread, NULL, lane_main, l);
    }
    pthread_create(&reader, NULL, ctrl_reader_main, NULL);
    pthread_detach(reader);
    pthread_create(&rp, NULL, rp_main, NULL);
    rdmax_keepalive_start();
    rdmax_progress_start();

    splice(st);

    atomic_store(&stream_done, true);
    atomic_store(&rdmax_s.finishing, true);
    r = rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_FIN_ACK, 0, 0, NULL, 0);
    if (r < 0) {
        rdmax_fail("control connection: %s", rdmax_wire_strerror(r));
    }
    /* Keep relaying the return path (QEMU's SHUT) until QEMU closes it. */
    pthread_join(rp, NULL);
    rdmax_progress_final();
    rdmax_stats_write("ok");
    rdmax_stream_destroy(st);
    return 0;
}
