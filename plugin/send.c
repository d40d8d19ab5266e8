/*
 * rdma-x send: the source side.
 *
 * main thread:    stdin -> parser -> control bytes (zstd stream, control
 *                 connection) and page payloads (into the lane rings)
 * lane thread k:  ring k -> lane encoder -> PAGES frames on connection k
 * control reader: return path (RP frames) -> stdout; FIN_ACK; ERROR
 *
 * Whenever the main thread is about to block (stdin empty, a lane ring
 * full), it flushes its control bytes first: the receiver can only place a
 * page once it has the control bytes in front of it, so holding them back
 * while waiting could deadlock.
 */
#include "send.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zstd.h>

#include "intake.h"
#include "level.h"
#include "page-cache.h"
#include "queue.h"
#include "session.h"
#include "stream.h"

#define IN_BLOCK (256u << 10) /* QEMU's bytes are read and parsed in blocks this size */
#define IN_BLOCKS 8u          /* ... this many: 2 MiB of raw stream held at most */
#define IN_READ_MIN (64u << 10) /* a fresh block when less room is left for a read */
#define CTRL_FLUSH (64u << 10)
#define LANE_RING_PAGES 64u
#define PEEK_MAX (1u << 20)
/* Page cache sizing when the stream does not announce the RAM size. */
#define DEFAULT_RAM_GUESS (1ull << 30)

/* A page handed to a lane: where it lies in an intake block, which it holds. */
struct page_slot {
    struct rdmax_page_key key;
    const uint8_t *data;
    struct rdmax_in_block *blk;
};

struct send_lane {
    unsigned idx;
    struct rdmax_ring ring; /* main thread -> lane thread */
    struct rdmax_lane_encoder *enc;
    pthread_t thread;
    _Atomic bool peer_bound;   /* control reader: the receiver's LANE_LOAD */
    _Atomic bool peer_bound_seen; /* ... a LANE_LOAD saying bound came since the main thread looked */

    bool dirty;                /* main thread: pages committed since the last kick */
};

static struct send_lane lanes[RDMAX_LANES_MAX];

/* The pipe's codec level (level.h): chosen by the main thread, applied by the lanes. */
#define LEVEL_WINDOW_NS 100000000ull
static _Atomic int pipe_level;
static _Atomic uint64_t link_ns_total; /* lanes: blocked sending, summed */
static _Atomic uint64_t wire_total;    /* lanes: batch bytes sent, summed */

/* Control stream state: main thread only. */
static ZSTD_CStream *ctrl_z;
static uint8_t *ctrl_buf;
static size_t ctrl_len;
static uint8_t *ctrl_zbuf;
static size_t ctrl_zcap;

/* Set by the control reader, waited for by the main thread. */
static pthread_mutex_t fin_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t fin_cv = PTHREAD_COND_INITIALIZER;
static bool fin_acked;

static void ctrl_flush(void)
{
    ZSTD_inBuffer in = {ctrl_buf, ctrl_len, 0};
    size_t rem;
    int r;

    if (ctrl_len == 0) {
        return;
    }
    do {
        ZSTD_outBuffer out = {ctrl_zbuf, ctrl_zcap, 0};
        rem = ZSTD_compressStream2(ctrl_z, &out, &in, ZSTD_e_flush);
        if (ZSTD_isError(rem)) {
            rdmax_fail("compressing control bytes: %s", ZSTD_getErrorName(rem));
        }
        if (out.pos) {
            r = rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_CTRL, RDMAX_FF_ZSTD, 0, ctrl_zbuf, out.pos);
            if (r < 0) {
                rdmax_fail("control connection to %s: %s", rdmax_s.ctrl.conn->peer,
                           rdmax_wire_strerror(r));
            }
        }
    } while (rem != 0 || in.pos < in.size);
    ctrl_len = 0;
}

static void ctrl_append(const uint8_t *p, size_t n)
{
    atomic_fetch_add_explicit(&rdmax_s.c.ctrl_bytes, n, memory_order_relaxed);
    while (n) {
        size_t room = CTRL_FLUSH - ctrl_len;
        size_t k = n < room ? n : room;
        memcpy(ctrl_buf + ctrl_len, p, k);
        ctrl_len += k;
        p += k;
        n -= k;
        if (ctrl_len == CTRL_FLUSH) {
            ctrl_flush();
        }
    }
}

static void lane_send_batch(struct send_lane *l)
{
    struct iovec iov[2];
    int iovcnt;
    ssize_t n = rdmax_lane_encoder_flush_iov(l->enc, iov, &iovcnt);
    int r;

    if (n <= 0) {
        return;
    }
    double t0 = rdmax_now();
    r = rdmax_wire_sendv(&rdmax_s.lane[l->idx], RDMAX_F_PAGES, 0, (uint16_t)(l->idx + 1), iov,
                         iovcnt);
    atomic_fetch_add_explicit(&link_ns_total, (uint64_t)((rdmax_now() - t0) * 1e9),
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&wire_total, (uint64_t)n, memory_order_relaxed);
    if (r < 0) {
        rdmax_fail("lane %u to %s: %s", l->idx, rdmax_s.lane[l->idx].conn->peer,
                   rdmax_wire_strerror(r));
    }
}

/*
 * Batches stay full while pages keep coming: the lane sends when it has
 * RDMAX_BATCH_MAX_PAGES, and a partial batch only when the main thread
 * kicks it because it is about to wait (for QEMU, or for a full ring), so
 * no page is held back while nothing else moves. It sleeps until it can
 * fill its batch rather than waking for every page.
 */
static void *lane_main(void *arg)
{
    struct send_lane *l = arg;
    uint64_t pages = 0;
    uint8_t eof[8];

    for (;;) {
        unsigned pend = rdmax_lane_encoder_pending(l->enc);
        struct page_slot *s = rdmax_ring_peek_at(&l->ring, 0);

        rdmax_lane_encoder_set_level(l->enc, atomic_load_explicit(&pipe_level, memory_order_relaxed));
        if (!s) {
            s = rdmax_ring_peek_wait(&l->ring, pend ? RDMAX_BATCH_MAX_PAGES - pend : 1);
        }
        if (!s) {
            if (rdmax_ring_closed_and_empty(&l->ring)) {
                break;
            }
            if (rdmax_ring_kicked(&l->ring)) {
                lane_send_batch(l);
            }
            continue;
        }
        rdmax_lane_encoder_add(l->enc, s->key, s->data); /* copies the page */
        rdmax_in_block_drop(s->blk);
        rdmax_ring_release(&l->ring);
        pages++;
        if (rdmax_lane_encoder_pending(l->enc) == RDMAX_BATCH_MAX_PAGES) {
            lane_send_batch(l);
        }
    }
    lane_send_batch(l);
    for (int i = 0; i < 8; i++) {
        eof[i] = (uint8_t)(pages >> (56 - 8 * i));
    }
    int r = rdmax_wire_send(&rdmax_s.lane[l->idx], RDMAX_F_LANE_EOF, 0, (uint16_t)(l->idx + 1), eof,
                            sizeof(eof));
    if (r < 0) {
        rdmax_fail("lane %u: %s", l->idx, rdmax_wire_strerror(r));
    }
    return NULL;
}

static void write_all_stdout(const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(STDOUT_FILENO, p, n);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            /* QEMU stopped reading its return path: it is tearing down. */
            rdmax_fail("source QEMU closed the return path: %s", strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
}

static void *ctrl_reader_main(void *arg)
{
    uint8_t *buf = malloc(RDMAX_FRAME_MAX + 1);
    struct rdmax_frame_hdr h;

    if (!buf) {
        rdmax_fail("out of memory");
    }
    for (;;) {
        int r = rdmax_wire_recv(&rdmax_s.ctrl, &h, buf, RDMAX_FRAME_MAX, rdmax_s.o.timeout_ms);
        if (r < 0) {
            rdmax_fail("control connection to %s: %s", rdmax_s.ctrl.conn->peer,
                       rdmax_wire_strerror(r));
        }
        switch (h.type) {
        case RDMAX_F_RP:
            atomic_fetch_add_explicit(&rdmax_s.c.rp_bytes, h.len, memory_order_relaxed);
            write_all_stdout(buf, h.len);
            break;
        case RDMAX_F_RP_EOF:
            /* The destination QEMU closed its return path: pass that on. */
            close(STDOUT_FILENO);
            break;
        case RDMAX_F_FIN_ACK:
            /* Done: the receiver may leave now, and that is no error. */
            atomic_store(&rdmax_s.finishing, true);
            pthread_mutex_lock(&fin_mu);
            fin_acked = true;
            pthread_cond_signal(&fin_cv);
            pthread_mutex_unlock(&fin_mu);
            free(buf);
            return arg;
        case RDMAX_F_ERROR: {
            char txt[RDMAX_PEER_TEXT_BUF];
            rdmax_fail("receiver: %s", rdmax_peer_text(txt, sizeof(txt), buf, h.len));
        }
        case RDMAX_F_KEEPALIVE:
            break;
        case RDMAX_F_LANE_LOAD:
            if (h.len != 1 || buf[0] > 1 || h.channel == 0 || h.channel > rdmax_s.nlanes) {
                rdmax_fail("receiver sent a malformed LANE_LOAD frame");
            }
            atomic_store_explicit(&lanes[h.channel - 1].peer_bound, buf[0] == 1,
                                  memory_order_relaxed);
            if (buf[0] == 1) {
                atomic_store_explicit(&lanes[h.channel - 1].peer_bound_seen, true,
                                      memory_order_relaxed);
            }
            break;
        default:
            rdmax_fail("receiver sent an unexpected %s frame", rdmax_frame_type_name(h.type));
        }
    }
    return arg;
}

/*
 * About to wait: everything read so far must be able to reach the
 * receiver, which places a page only after the control bytes before it and
 * every page before it. Flush the control bytes and make every lane that
 * got pages since the last time send its partial batch.
 */
static void before_waiting(void)
{
    ctrl_flush();
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        if (lanes[i].dirty) {
            lanes[i].dirty = false;
            rdmax_ring_kick(&lanes[i].ring);
        }
    }
}

/* A free slot in lane k's ring; everything moves on before we wait for one. */
static struct page_slot *lane_slot(unsigned k)
{
    struct page_slot *s = rdmax_ring_reserve(&lanes[k].ring, true);

    if (!s) {
        before_waiting();
        s = rdmax_ring_reserve(&lanes[k].ring, false);
    }
    return s;
}

static void lanes_start(void)
{
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        struct send_lane *l = &lanes[i];
        l->idx = i;
        if (rdmax_ring_init(&l->ring, sizeof(struct page_slot), LANE_RING_PAGES) < 0 ||
            rdmax_lane_encoder_create(&rdmax_s.codec, &l->enc) < 0) {
            rdmax_fail("out of memory setting up lane %u", i);
        }
        (void)rdmax_lane_encoder_populate(l->enc, POPULATE_AHEAD_TOTAL / rdmax_s.nlanes); /* only a head start */
        atomic_store(&rdmax_s.lane_stats[i], rdmax_lane_encoder_stats(l->enc));
        pthread_create(&l->thread, NULL, lane_main, l);
    }
}

static void send_eof(uint64_t stream_bytes, uint64_t pages)
{
    uint8_t p[16];
    int r;

    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(stream_bytes >> (56 - 8 * i));
        p[8 + i] = (uint8_t)(pages >> (56 - 8 * i));
    }
    r = rdmax_wire_send(&rdmax_s.ctrl, RDMAX_F_EOF, 0, 0, p, sizeof(p));
    if (r < 0) {
        rdmax_fail("control connection to %s: %s", rdmax_s.ctrl.conn->peer, rdmax_wire_strerror(r));
    }
}

/*
 * Read the start of the stream until its MEM_SIZE record tells the guest RAM
 * size (QEMU writes it within the first few hundred bytes, during setup), so
 * the handshake can size the page caches from it. Returns the bytes read,
 * which the main loop then processes first; sets *ram (0 if not known).
 */
static size_t peek_ram_size(uint8_t *buf, size_t cap, uint64_t *ram)
{
    struct rdmax_stream *peek = rdmax_stream_create(RDMAX_STREAM_FULL);
    size_t len = 0, pos = 0;

    *ram = 0;
    if (!peek) {
        rdmax_fail("out of memory");
    }
    while (len < cap) {
        ssize_t n = read(STDIN_FILENO, buf + len, cap - len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        len += (size_t)n;
        bool page = false;
        struct rdmax_page_key key;
        ssize_t c = rdmax_stream_scan(peek, buf + pos, len - pos, &page, &key);
        if (c < 0) {
            break; /* the main loop reports it */
        }
        pos += (size_t)c;
        const struct rdmax_stream_stats *st = rdmax_stream_stats(peek);
        if (st->ram_total || st->opaque || page) {
            *ram = st->ram_total;
            break;
        }
    }
    rdmax_stream_destroy(peek);
    return len;
}

/* A free intake block; everything moves on before we wait for one. */
static struct rdmax_in_block *intake_block(struct rdmax_intake *in)
{
    struct rdmax_in_block *b = rdmax_intake_get(in, true);

    if (!b) {
        before_waiting();
        b = rdmax_intake_get(in, false);
    }
    return b;
}

int rdmax_send_run(void)
{
    struct rdmax_stream *st = rdmax_stream_create(RDMAX_STREAM_FULL);
    struct rdmax_intake *intake = NULL;
    struct rdmax_in_block *blk;
    size_t len, pos = 0;        /* bytes in blk, parsed up to */
    bool page = false;          /* a page's payload starts at pos */
    struct rdmax_page_key key;  /* ... this page */
    pthread_t reader;
    uint64_t total = 0, ram;
    struct rdmax_level_ctl ctl;
    struct rdmax_level_window win = {0};
    uint64_t win_start = 0, win_total = 0, win_link = 0, win_wire = 0;

    ctrl_buf = malloc(CTRL_FLUSH);
    ctrl_zcap = ZSTD_CStreamOutSize();
    ctrl_zbuf = malloc(ctrl_zcap);
    ctrl_z = ZSTD_createCStream();
    if (!st || rdmax_intake_create(IN_BLOCK, IN_BLOCKS, &intake) < 0 || !ctrl_buf || !ctrl_zbuf ||
        !ctrl_z) {
        rdmax_fail("out of memory");
    }
    ZSTD_CCtx_setParameter(ctrl_z, ZSTD_c_compressionLevel, 1);

    blk = rdmax_intake_get(intake, false);
    len = peek_ram_size(blk->data, PEEK_MAX < IN_BLOCK ? PEEK_MAX : IN_BLOCK, &ram);
    total = len;
    if (rdmax_s.o.cache_bytes != UINT64_MAX) {
        rdmax_s.codec.cache_bytes = rdmax_s.o.cache_bytes;
    } else {
        rdmax_s.codec.cache_bytes =
            rdmax_page_cache_budget(ram ? ram : DEFAULT_RAM_GUESS, rdmax_s.nlanes, 0);
    }
    rdmax_session_connect();
    rdmax_level_ctl_init(&ctl, 1, rdmax_s.codec.cache_bytes ? RDMAX_LEVEL_MIN : 0,
                         RDMAX_LEVEL_MAX);
    atomic_store(&pipe_level, ctl.level);
    lanes_start();
    pthread_create(&reader, NULL, ctrl_reader_main, NULL);
    pthread_detach(reader);
    rdmax_keepalive_start();
    rdmax_progress_start();

    /*
     * Parse in place: control bytes are copied into the control stream,
     * pages go to their lane as a reference into the block. A page whose
     * payload would cross the block's end moves, with what has arrived of
     * it, to the start of a fresh block: the one copy the intake makes.
     */
    for (;;) {
        struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
        ssize_t n;

        if (page && len - pos >= RDMAX_PAGE_SIZE) {
            unsigned k = rdmax_stream_lane_of(key, rdmax_s.nlanes);
            struct page_slot *s = lane_slot(k);
            s->key = key;
            s->data = blk->data + pos;
            s->blk = blk;
            rdmax_in_block_hold(blk);
            rdmax_ring_commit(&lanes[k].ring);
            lanes[k].dirty = true;
            atomic_fetch_add_explicit(&rdmax_s.c.pages, 1, memory_order_relaxed);
            rdmax_stream_page_done(st);
            pos += RDMAX_PAGE_SIZE;
            page = false;
            continue;
        }
        if (!page && pos < len) {
            ssize_t c = rdmax_stream_scan(st, blk->data + pos, len - pos, &page, &key);
            if (c < 0) {
                rdmax_fail("%s", rdmax_stream_error(st));
            }
            ctrl_append(blk->data + pos, (size_t)c);
            pos += (size_t)c;
            continue;
        }
        /* Everything here is parsed (or a page is short): read more, into a fresh block if need be. */
        if ((page && IN_BLOCK - pos < RDMAX_PAGE_SIZE) || (!page && IN_BLOCK - len < IN_READ_MIN)) {
            struct rdmax_in_block *next = intake_block(intake);
            memcpy(next->data, blk->data + pos, len - pos);
            len -= pos;
            pos = 0;
            rdmax_in_block_drop(blk);
            blk = next;
        }
        uint64_t now = (uint64_t)(rdmax_now() * 1e9);
        if (rdmax_s.codec.zstd_level == 0 && now - win_start >= LEVEL_WINDOW_NS) {
            uint64_t link = atomic_load_explicit(&link_ns_total, memory_order_relaxed);
            uint64_t wire = atomic_load_explicit(&wire_total, memory_order_relaxed);
            win.wall_ns = win_start ? now - win_start : 0;
            win.bytes = total - win_total;
            win.link_ns = (link - win_link) / rdmax_s.nlanes;
            win.wire = wire - win_wire;
            for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
                /* Bound now, or said so during the window. */
                win.peer_bound |= atomic_load_explicit(&lanes[i].peer_bound, memory_order_relaxed) |
                                  atomic_exchange_explicit(&lanes[i].peer_bound_seen, false,
                                                           memory_order_relaxed);
            }
            atomic_store_explicit(&pipe_level, rdmax_level_ctl_window(&ctl, &win),
                                  memory_order_relaxed);
            win = (struct rdmax_level_window){0};
            win_start = now;
            win_total = total;
            win_link = link;
            win_wire = wire;
        }
        if (poll(&pfd, 1, 0) == 0) {
            before_waiting(); /* about to block on QEMU */
            n = read(STDIN_FILENO, blk->data + len, IN_BLOCK - len);
            win.wait_ns += (uint64_t)(rdmax_now() * 1e9) - now;
        } else {
            n = read(STDIN_FILENO, blk->data + len, IN_BLOCK - len);
        }
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            rdmax_fail("reading the stream from QEMU: %s", strerror(errno));
        }
        if (n == 0) {
            break;
        }
        len += (size_t)n;
        total += (uint64_t)n;
        atomic_store_explicit(&rdmax_s.c.bytes_in, total, memory_order_relaxed);
    }
    rdmax_in_block_drop(blk);

    /* QEMU closed the stream: it is complete, or the migration was abandoned. */
    if (rdmax_stream_finish(st) < 0) {
        rdmax_fail("source QEMU closed the stream before its end (migration cancelled?): %s",
                   rdmax_stream_error(st));
    }
    atomic_store(&rdmax_s.c.zero_pages, rdmax_stream_stats(st)->zero_pages);
    ctrl_flush();
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        rdmax_ring_close(&lanes[i].ring);
    }
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        pthread_join(lanes[i].thread, NULL);
    }
    rdmax_intake_destroy(intake); /* the lanes dropped every page */
    send_eof(total, atomic_load(&rdmax_s.c.pages));

    /* Exit 0 only once the receiver confirms every byte reached its QEMU. */
    pthread_mutex_lock(&fin_mu);
    while (!fin_acked) {
        pthread_cond_wait(&fin_cv, &fin_mu);
    }
    pthread_mutex_unlock(&fin_mu);
    rdmax_progress_final();
    rdmax_stats_write("ok");
    rdmax_stream_destroy(st);
    return 0;
}
