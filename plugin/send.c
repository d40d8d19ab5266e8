/*
 * rdma-x send: the source side.
 *
 * main thread:    qemu_in -> parser -> control bytes (zstd stream, control
 *                 connection) and page payloads (into the lane rings)
 * lane thread k:  ring k -> lane encoder -> PAGES frames on connection k
 * control reader: return path (RP frames) -> qemu_out; FIN_ACK; ERROR
 *
 * Whenever the main thread is about to block (QEMU's pipe empty, a lane
 * ring full), it flushes its control bytes first: the receiver can only
 * place a page once it has the control bytes in front of it, so holding
 * them back while waiting could deadlock.
 *
 * Errors: every thread records the first one in the session
 * (rdmax_session_error), which wakes the others; each then returns.
 * rdmax_send_run joins them all and returns the error.
 */
#include "send.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#include "be.h"
#include "channels.h"
#include "intake.h"
#include "level.h"
#include "pace.h"
#include "page-cache.h"
#include "queue.h"
#include "session.h"
#include "stream.h"

#define IN_BLOCK (256u << 10)   /* QEMU's bytes are read and parsed in blocks this size */
#define IN_BLOCKS 8u            /* ... this many: 2 MiB of raw stream held at most */
#define IN_READ_MIN (64u << 10) /* a fresh block when less room is left for a read */
#define CTRL_FLUSH (64u << 10)
#define LANE_RING_PAGES 64u
#define PEEK_MAX (1u << 20)
/* Page cache sizing when the stream does not announce the RAM size. */
#define DEFAULT_RAM_GUESS (1ull << 30)
/* Return-path writes to QEMU: at most this much after POLLOUT, so they never block. */
#define RP_WRITE_MAX 4096u

/* A page handed to a lane: where it lies in an intake block, which it holds. */
struct page_slot {
    struct rdmax_page_key key;
    const uint8_t *data;
    struct rdmax_in_block *blk;
};

struct rdmax_send;

struct send_lane {
    struct rdmax_send *p;   /* set at start */
    unsigned idx;           /* set at start */
    struct rdmax_ring ring; /* main thread -> lane thread */
    bool ring_ok;           /* ring initialised (main thread) */
    struct rdmax_lane_encoder *enc;
    pthread_t thread;
    bool started;            /* main thread */
    _Atomic bool peer_bound; /* control reader: the receiver's LANE_LOAD */
    _Atomic bool
        peer_bound_seen; /* ... a LANE_LOAD saying bound came since the main thread looked */

    bool dirty; /* main thread: pages committed since the last kick */

    /*
     * Lane thread only: intake blocks whose pages the pending batch sends
     * from where they lie (rdmax_lane_encoder_add_ref took them), one entry
     * per run of such pages from one block, with its count of references.
     * They are dropped once the batch was sent (or the lane ends).
     */
    struct {
        struct rdmax_in_block *blk;
        unsigned n;
    } held[RDMAX_BATCH_MAX_PAGES];
    unsigned nheld;
};

/* The pipe's codec level (level.h): chosen by the main thread, applied by the lanes. */
#define LEVEL_WINDOW_NS 100000000ull
/* The longest nap of the pace: errors and the window's end are looked at in between. */
#define PACE_SLEEP_MAX 10000000ull

struct rdmax_send {
    struct rdmax_session s;
    struct send_lane lanes[RDMAX_LANES_MAX];
    _Atomic int pipe_level;
    _Atomic uint64_t link_ns_total; /* lanes: blocked sending, summed */
    _Atomic uint64_t wire_total;    /* lanes: batch bytes sent, summed */

    /* Control stream state: main thread only. */
    ZSTD_CStream *ctrl_z;
    uint8_t *ctrl_buf;
    size_t ctrl_len;
    uint8_t *ctrl_zbuf;
    size_t ctrl_zcap;

    struct rdmax_intake *intake;
    struct rdmax_stream *st;
    pthread_t reader;
    bool reader_started;
    struct rdmax_channels *ch; /* --listen-unix: QEMU's further channels */
};

static int ctrl_flush(struct rdmax_send *p)
{
    ZSTD_inBuffer in = {p->ctrl_buf, p->ctrl_len, 0};
    size_t rem;
    int r;

    if (p->ctrl_len == 0) {
        return 0;
    }
    do {
        ZSTD_outBuffer out = {p->ctrl_zbuf, p->ctrl_zcap, 0};
        rem = ZSTD_compressStream2(p->ctrl_z, &out, &in, ZSTD_e_flush);
        if (ZSTD_isError(rem)) {
            return rdmax_session_error(&p->s, -EIO, "compressing control bytes: %s",
                                       ZSTD_getErrorName(rem));
        }
        if (out.pos) {
            r = rdmax_wire_send(&p->s.ctrl, RDMAX_F_CTRL, RDMAX_FF_ZSTD, 0, p->ctrl_zbuf, out.pos);
            if (r < 0) {
                return rdmax_session_error(&p->s, r, "control connection to %s: %s",
                                           p->s.ctrl.conn->peer,
                                           rdmax_conn_strerror(p->s.ctrl.conn, r));
            }
        }
    } while (rem != 0 || in.pos < in.size);
    p->ctrl_len = 0;
    return 0;
}

static int ctrl_append(struct rdmax_send *p, const uint8_t *b, size_t n)
{
    atomic_fetch_add_explicit(&p->s.c.ctrl_bytes, n, memory_order_relaxed);
    while (n) {
        size_t room = CTRL_FLUSH - p->ctrl_len;
        size_t k = n < room ? n : room;
        memcpy(p->ctrl_buf + p->ctrl_len, b, k);
        p->ctrl_len += k;
        b += k;
        n -= k;
        if (p->ctrl_len == CTRL_FLUSH) {
            int r = ctrl_flush(p);
            if (r < 0) {
                return r;
            }
        }
    }
    return 0;
}

_Static_assert(RDMAX_LANE_IOV_MAX <= RDMAX_WIRE_IOV_MAX, "a batch's iovecs fit one frame");

/* The pages of the batch just sent (or abandoned) need their blocks no more. */
static void lane_drop_held(struct send_lane *l)
{
    for (unsigned i = 0; i < l->nheld; i++) {
        rdmax_in_block_drop_n(l->held[i].blk, l->held[i].n);
    }
    l->nheld = 0;
}

static void lane_hold(struct send_lane *l, struct rdmax_in_block *b)
{
    if (l->nheld && l->held[l->nheld - 1].blk == b) {
        l->held[l->nheld - 1].n++;
        return;
    }
    l->held[l->nheld].blk = b; /* at most one entry per page of the batch */
    l->held[l->nheld].n = 1;
    l->nheld++;
}

static int lane_send_batch(struct send_lane *l)
{
    struct rdmax_session *s = &l->p->s;
    struct iovec iov[RDMAX_LANE_IOV_MAX];
    int iovcnt;
    ssize_t n = rdmax_lane_encoder_flush_iovs(l->enc, iov, RDMAX_LANE_IOV_MAX, &iovcnt);
    int r;

    if (n <= 0) {
        lane_drop_held(l);
        return 0;
    }
    double t0 = rdmax_now();
    /* Raw pages go from the intake blocks straight into the transport. */
    r = rdmax_wire_sendv(&s->lane[l->idx], RDMAX_F_PAGES, 0, (uint16_t)(l->idx + 1), iov, iovcnt);
    lane_drop_held(l);
    atomic_fetch_add_explicit(&l->p->link_ns_total, (uint64_t)((rdmax_now() - t0) * 1e9),
                              memory_order_relaxed);
    atomic_fetch_add_explicit(&l->p->wire_total, (uint64_t)n, memory_order_relaxed);
    if (r < 0) {
        return rdmax_session_error(s, r, "lane %u to %s: %s", l->idx, s->lane[l->idx].conn->peer,
                                   rdmax_conn_strerror(s->lane[l->idx].conn, r));
    }
    return 0;
}

/*
 * Batches stay full while pages keep coming: the lane sends when it has
 * RDMAX_BATCH_MAX_PAGES, and a partial batch only when the main thread
 * kicks it because it is about to wait (for QEMU, or for a full ring), so
 * no page is held back while nothing else moves. It sleeps until it can
 * fill its batch rather than waking for every page.
 */
static void lane_run(struct send_lane *l);

static void *lane_main(void *arg)
{
    struct send_lane *l = arg;

    lane_run(l);
    lane_drop_held(l); /* a failed run's batch: its blocks go back all the same */
    return NULL;
}

static void lane_run(struct send_lane *l)
{
    struct rdmax_session *s = &l->p->s;
    uint64_t pages = 0;
    uint8_t eof[8];
    int r;

    for (;;) {
        unsigned pend = rdmax_lane_encoder_pending(l->enc);
        struct page_slot *sl = rdmax_ring_peek_at(&l->ring, 0);

        if (rdmax_session_failed(s)) {
            return;
        }
        rdmax_lane_encoder_set_level(l->enc,
                                     atomic_load_explicit(&l->p->pipe_level, memory_order_relaxed));
        if (!sl) {
            sl = rdmax_ring_peek_wait(&l->ring, pend ? RDMAX_BATCH_MAX_PAGES - pend : 1);
        }
        if (!sl) {
            if (rdmax_ring_aborted(&l->ring)) {
                return;
            }
            if (rdmax_ring_closed_and_empty(&l->ring)) {
                break;
            }
            if (rdmax_ring_kicked(&l->ring) && lane_send_batch(l) < 0) {
                return;
            }
            continue;
        }
        /*
         * Take every page there is, up to a full batch, then give the
         * slots back at once and drop block references per run of pages
         * from one block: one atomic each instead of two per page, on
         * lines the reader writes too.
         */
        struct rdmax_in_block *run = NULL;
        unsigned run_n = 0, taken = 0;
        do {
            if (rdmax_lane_encoder_add_ref(l->enc, sl->key, sl->data) == 1) {
                /* The page leaves from its block: hold it until the batch is sent. */
                lane_hold(l, sl->blk);
                taken++;
                continue;
            }
            /* Copied (or not needed): drop the reference with the others of its block. */
            if (sl->blk != run) {
                if (run_n) {
                    rdmax_in_block_drop_n(run, run_n);
                }
                run = sl->blk;
                run_n = 0;
            }
            run_n++;
            taken++;
        } while (rdmax_lane_encoder_pending(l->enc) < RDMAX_BATCH_MAX_PAGES &&
                 (sl = rdmax_ring_peek_at(&l->ring, taken)));
        if (run_n) {
            rdmax_in_block_drop_n(run, run_n);
        }
        rdmax_ring_release_n(&l->ring, taken);
        pages += taken;
        if (rdmax_lane_encoder_pending(l->enc) == RDMAX_BATCH_MAX_PAGES && lane_send_batch(l) < 0) {
            return;
        }
    }
    if (lane_send_batch(l) < 0) {
        return;
    }
    for (int i = 0; i < 8; i++) {
        eof[i] = (uint8_t)(pages >> (56 - 8 * i));
    }
    r = rdmax_wire_send(&s->lane[l->idx], RDMAX_F_LANE_EOF, 0, (uint16_t)(l->idx + 1), eof,
                        sizeof(eof));
    if (r < 0) {
        rdmax_session_error(s, r, "lane %u: %s", l->idx,
                            rdmax_conn_strerror(s->lane[l->idx].conn, r));
    }
    return;
}

/* The return path to QEMU, in pieces that never block past an error. */
static int write_all_qemu(struct rdmax_session *s, const uint8_t *b, size_t n)
{
    while (n) {
        int r = rdmax_session_wait_fd(s, s->o.qemu_out, POLLOUT);
        if (r < 0) {
            return r;
        }
        ssize_t w = write(s->o.qemu_out, b, n < RP_WRITE_MAX ? n : RP_WRITE_MAX);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            /* QEMU stopped reading its return path: it is tearing down. */
            return rdmax_session_error(s, -errno, "source QEMU closed the return path: %s",
                                       strerror(errno));
        }
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* One frame from the receiver; 1 once FIN_ACK came, 0 to go on, or the error. */
static int ctrl_frame(struct rdmax_send *p, const struct rdmax_frame_hdr *h, const uint8_t *buf)
{
    struct rdmax_session *s = &p->s;

    switch (h->type) {
    case RDMAX_F_RP:
        atomic_fetch_add_explicit(&s->c.rp_bytes, h->len, memory_order_relaxed);
        return write_all_qemu(s, buf, h->len);
    case RDMAX_F_RP_EOF:
        /* The destination QEMU closed its return path: pass that on. */
        if (s->o.unix_path) {
            /*
             * Our own unix: socket carries both directions: half-close it.
             * Not an inherited one (exec:socat gives stdin and stdout one
             * socket): socat takes that EOF as the end and kills us.
             */
            shutdown(s->o.qemu_out, SHUT_WR);
        }
        dup2(s->null_fd, s->o.qemu_out);
        return 0;
    case RDMAX_F_FIN_ACK:
        /* Done: the receiver may leave now, and that is no error. */
        atomic_store(&s->finishing, true);
        pthread_mutex_lock(&s->mu);
        s->fin_acked = true;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        return 1;
    case RDMAX_F_ERROR: {
        char txt[RDMAX_PEER_TEXT_BUF];
        return rdmax_session_peer_error(s, -ECONNABORTED, "receiver: %s",
                                        rdmax_peer_text(txt, sizeof(txt), buf, h->len));
    }
    case RDMAX_F_KEEPALIVE:
        return 0;
    case RDMAX_F_LANE_LOAD:
        if (h->len != 1 || buf[0] > 1 || h->channel == 0 || h->channel > s->nlanes) {
            return rdmax_session_error(s, -EPROTO, "receiver sent a malformed LANE_LOAD frame");
        }
        atomic_store_explicit(&p->lanes[h->channel - 1].peer_bound, buf[0] == 1,
                              memory_order_relaxed);
        if (buf[0] == 1) {
            atomic_store_explicit(&p->lanes[h->channel - 1].peer_bound_seen, true,
                                  memory_order_relaxed);
        }
        return 0;
    default:
        return rdmax_session_error(s, -EPROTO, "receiver sent an unexpected %s frame",
                                   rdmax_frame_type_name(h->type));
    }
}

/*
 * Reads the control connection until FIN_ACK. Once the session failed it
 * goes on reading and dropping frames until the peer closes or the
 * farewell cuts the connection, so our ERROR frame can arrive (session.c).
 */
static void *ctrl_reader_main(void *arg)
{
    struct rdmax_send *p = arg;
    struct rdmax_session *s = &p->s;
    uint8_t *buf = malloc(RDMAX_FRAME_MAX + 1);
    struct rdmax_frame_hdr h;

    if (!buf) {
        rdmax_session_error(s, -ENOMEM, "out of memory");
        rdmax_session_reader_done(s);
        return NULL;
    }
    for (;;) {
        int r = rdmax_wire_recv(&s->ctrl, &h, buf, RDMAX_FRAME_MAX, s->o.timeout_ms);
        if (r < 0) {
            rdmax_session_error(s, r, "control connection to %s: %s", s->ctrl.conn->peer,
                                rdmax_conn_strerror(s->ctrl.conn, r));
            break;
        }
        if (rdmax_session_failed(s)) {
            if (h.type == RDMAX_F_ERROR) {
                break; /* the peer failed too: it waits for nothing from us */
            }
            continue; /* the farewell's drain */
        }
        r = ctrl_frame(p, &h, buf);
        if (r > 0) {
            break;
        }
        if (r < 0 && s->err_from_peer) {
            break;
        }
    }
    free(buf);
    rdmax_session_reader_done(s);
    return NULL;
}

/*
 * About to wait: everything read so far must be able to reach the
 * receiver, which places a page only after the control bytes before it and
 * every page before it. Flush the control bytes and make every lane that
 * got pages since the last time send its partial batch.
 */
static int before_waiting(struct rdmax_send *p)
{
    int r = ctrl_flush(p);

    for (unsigned i = 0; i < p->s.nlanes; i++) {
        if (p->lanes[i].dirty) {
            p->lanes[i].dirty = false;
            rdmax_ring_kick(&p->lanes[i].ring);
        }
    }
    return r;
}

/* A free slot in lane k's ring; everything moves on before we wait for one. NULL: failed. */
static struct page_slot *lane_slot(struct rdmax_send *p, unsigned k)
{
    struct page_slot *sl = rdmax_ring_reserve(&p->lanes[k].ring, true);

    if (!sl) {
        if (before_waiting(p) < 0) {
            return NULL;
        }
        sl = rdmax_ring_reserve(&p->lanes[k].ring, false);
    }
    return sl;
}

static int lanes_start(struct rdmax_send *p)
{
    struct rdmax_session *s = &p->s;

    for (unsigned i = 0; i < s->nlanes; i++) {
        struct send_lane *l = &p->lanes[i];
        l->p = p;
        l->idx = i;
        if (rdmax_ring_init(&l->ring, sizeof(struct page_slot), LANE_RING_PAGES) < 0) {
            return rdmax_session_error(s, -ENOMEM, "out of memory setting up lane %u", i);
        }
        l->ring_ok = true;
        rdmax_session_add_ring(s, &l->ring);
        if (rdmax_lane_encoder_create(&s->codec, &l->enc) < 0) {
            return rdmax_session_error(s, -ENOMEM, "out of memory setting up lane %u", i);
        }
        (void)rdmax_lane_encoder_populate(l->enc,
                                          POPULATE_AHEAD_TOTAL / s->nlanes); /* only a head start */
        atomic_store(&s->lane_stats[i], rdmax_lane_encoder_stats(l->enc));
        if (pthread_create(&l->thread, NULL, lane_main, l) != 0) {
            return rdmax_session_error(s, -EAGAIN, "cannot start the thread of lane %u", i);
        }
        l->started = true;
    }
    return 0;
}

static int send_eof(struct rdmax_send *p, uint64_t stream_bytes, uint64_t pages)
{
    uint8_t b[20];
    int r;

    rdmax_put_be64(b, stream_bytes);
    rdmax_put_be64(b + 8, pages);
    /* With QEMU channels: how many, so the receiver waits for each to end. */
    if (p->ch) {
        rdmax_put_be32(b + 16, rdmax_channels_send_close(p->ch));
    }
    r = rdmax_wire_send(&p->s.ctrl, RDMAX_F_EOF, 0, 0, b, p->ch ? 20 : 16);
    if (r < 0) {
        return rdmax_session_error(&p->s, r, "control connection to %s: %s", p->s.ctrl.conn->peer,
                                   rdmax_wire_strerror(r));
    }
    return 0;
}

/* read() from QEMU's stream once it has bytes, or the session's error. */
static ssize_t qemu_read(struct rdmax_session *s, uint8_t *buf, size_t cap)
{
    for (;;) {
        int r = rdmax_session_wait_fd(s, s->o.qemu_in, POLLIN);
        if (r < 0) {
            return r;
        }
        ssize_t n = read(s->o.qemu_in, buf, cap);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) {
            continue;
        }
        if (n < 0) {
            return rdmax_session_error(s, -errno, "reading the stream from QEMU: %s",
                                       strerror(errno));
        }
        return n;
    }
}

/*
 * Read the start of the stream until its MEM_SIZE record tells the guest RAM
 * size (QEMU writes it within the first few hundred bytes, during setup), so
 * the handshake can size the page caches from it. Returns the bytes read,
 * which the main loop then processes first, or the session's error; sets
 * *ram (0 if not known).
 */
static ssize_t peek_ram_size(struct rdmax_session *s, uint8_t *buf, size_t cap, uint64_t *ram)
{
    struct rdmax_stream *peek = rdmax_stream_create(RDMAX_STREAM_FULL);
    size_t len = 0, pos = 0;

    *ram = 0;
    if (!peek) {
        return rdmax_session_error(s, -ENOMEM, "out of memory");
    }
    while (len < cap) {
        ssize_t n = qemu_read(s, buf + len, cap - len);
        if (n < 0) {
            rdmax_stream_destroy(peek);
            return n;
        }
        if (n == 0) {
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
    return (ssize_t)len;
}

/* A free intake block; everything moves on before we wait for one. NULL: failed. */
static struct rdmax_in_block *intake_block(struct rdmax_send *p)
{
    struct rdmax_in_block *b = rdmax_intake_get(p->intake, true);

    if (!b) {
        if (before_waiting(p) < 0) {
            return NULL;
        }
        b = rdmax_intake_get(p->intake, false);
    }
    return b;
}

int rdmax_send_create(const struct rdmax_opts *o, struct rdmax_send **out)
{
    struct rdmax_send *p = calloc(1, sizeof(*p));
    int r;

    if (!p) {
        return -ENOMEM;
    }
    r = rdmax_session_init(&p->s, o);
    if (r < 0) {
        free(p);
        return r;
    }
    p->st = rdmax_stream_create(RDMAX_STREAM_FULL);
    p->ctrl_buf = malloc(CTRL_FLUSH);
    p->ctrl_zcap = ZSTD_CStreamOutSize();
    p->ctrl_zbuf = malloc(p->ctrl_zcap);
    p->ctrl_z = ZSTD_createCStream();
    if (!p->st || rdmax_intake_create(IN_BLOCK, IN_BLOCKS, &p->intake) < 0 || !p->ctrl_buf ||
        !p->ctrl_zbuf || !p->ctrl_z) {
        rdmax_send_destroy(p);
        return -ENOMEM;
    }
    ZSTD_CCtx_setParameter(p->ctrl_z, ZSTD_c_compressionLevel, 1);
    rdmax_session_set_intake(&p->s, p->intake);
    if (o->unix_path) {
        p->ch = rdmax_channels_send_create(&p->s, o->unix_listen_fd, o->unix_path);
        if (!p->ch) {
            rdmax_send_destroy(p);
            return -ENOMEM;
        }
    }
    *out = p;
    return 0;
}

struct rdmax_session *rdmax_send_session(struct rdmax_send *p)
{
    return &p->s;
}

/* Parse and hand out the stream until QEMU closes it. 0 or the session's error. */
static int pump(struct rdmax_send *p, struct rdmax_in_block *blk, size_t len, uint64_t *totalp)
{
    struct rdmax_session *s = &p->s;
    size_t pos = 0;            /* bytes in blk, parsed up to */
    bool page = false;         /* a page's payload starts at pos */
    struct rdmax_page_key key; /* ... this page */
    uint64_t total = *totalp;
    struct rdmax_level_ctl ctl;
    struct rdmax_level_window win = {0};
    uint64_t win_start = 0, win_total = 0, win_link = 0, win_wire = 0;
    struct rdmax_pace pace = {0};
    uint64_t paced_ns = 0; /* of win.wait_ns: held off by the pace, not waiting for QEMU */
    int r = 0;

    rdmax_level_ctl_init(&ctl, 0, s->codec.cache_bytes ? RDMAX_LEVEL_MIN : 0, RDMAX_LEVEL_MAX);
    atomic_store(&p->pipe_level, ctl.level);
    /*
     * Parse in place: control bytes are copied into the control stream,
     * pages go to their lane as a reference into the block. A page whose
     * payload would cross the block's end moves, with what has arrived of
     * it, to the start of a fresh block: the one copy the intake makes.
     */
    for (;;) {
        struct pollfd pfd = {.fd = s->o.qemu_in, .events = POLLIN};
        ssize_t n;

        if (page && len - pos >= RDMAX_PAGE_SIZE) {
            unsigned k = rdmax_stream_lane_of(key, s->nlanes);
            struct page_slot *sl = lane_slot(p, k);
            if (!sl) {
                r = rdmax_session_failed(s);
                break;
            }
            sl->key = key;
            sl->data = blk->data + pos;
            sl->blk = blk;
            rdmax_in_block_hold(blk);
            rdmax_ring_commit(&p->lanes[k].ring);
            p->lanes[k].dirty = true;
            atomic_fetch_add_explicit(&s->c.pages, 1, memory_order_relaxed);
            rdmax_stream_page_done(p->st);
            pos += RDMAX_PAGE_SIZE;
            page = false;
            continue;
        }
        if (!page && pos < len) {
            ssize_t c = rdmax_stream_scan(p->st, blk->data + pos, len - pos, &page, &key);
            if (c < 0) {
                r = rdmax_session_error(s, -EBADMSG, "%s", rdmax_stream_error(p->st));
                break;
            }
            r = ctrl_append(p, blk->data + pos, (size_t)c);
            if (r < 0) {
                break;
            }
            pos += (size_t)c;
            continue;
        }
        /* Everything here is parsed (or a page is short): read more, into a fresh block if need be.
         */
        if ((page && IN_BLOCK - pos < RDMAX_PAGE_SIZE) || (!page && IN_BLOCK - len < IN_READ_MIN)) {
            struct rdmax_in_block *next = intake_block(p);
            if (!next) {
                r = rdmax_session_failed(s);
                break;
            }
            memcpy(next->data, blk->data + pos, len - pos);
            len -= pos;
            pos = 0;
            rdmax_in_block_drop(blk);
            blk = next;
        }
        uint64_t now = (uint64_t)(rdmax_now() * 1e9);
        if (now - win_start >= LEVEL_WINDOW_NS) {
            uint64_t link = atomic_load_explicit(&p->link_ns_total, memory_order_relaxed);
            uint64_t wire = atomic_load_explicit(&p->wire_total, memory_order_relaxed);
            win.wall_ns = win_start ? now - win_start : 0;
            win.bytes = total - win_total;
            win.link_ns = (link - win_link) / s->nlanes;
            win.wire = wire - win_wire;
            for (unsigned i = 0; i < s->nlanes; i++) {
                /* Bound now, or said so during the window. */
                win.peer_bound |=
                    atomic_load_explicit(&p->lanes[i].peer_bound, memory_order_relaxed) |
                    atomic_exchange_explicit(&p->lanes[i].peer_bound_seen, false,
                                             memory_order_relaxed);
            }
            rdmax_pace_window(&pace, win.bytes, win.wall_ns, win.wait_ns - paced_ns);
            if (s->codec.zstd_level == 0) {
                atomic_store_explicit(&p->pipe_level, rdmax_level_ctl_window(&ctl, &win),
                                      memory_order_relaxed);
            }
            win = (struct rdmax_level_window){0};
            paced_ns = 0;
            win_start = now;
            win_total = total;
            win_link = link;
            win_wire = wire;
        }
        if (!s->o.no_pace && win_start) {
            uint64_t d = rdmax_pace_delay(&pace, total - win_total, now - win_start);
            if (d) {
                /*
                 * Ahead of the pace: let QEMU's pipe fill. Counted as
                 * waiting, so the level controller does not measure a
                 * window the pace, not the level, limited.
                 */
                struct timespec ts = {.tv_nsec = (long)(d < PACE_SLEEP_MAX ? d : PACE_SLEEP_MAX)};
                r = before_waiting(p);
                if (r < 0) {
                    break;
                }
                nanosleep(&ts, NULL);
                d = (uint64_t)(rdmax_now() * 1e9) - now;
                paced_ns += d;
                win.wait_ns += d;
                continue;
            }
        }
        if (poll(&pfd, 1, 0) == 0) {
            r = before_waiting(p); /* about to block on QEMU */
            if (r < 0) {
                break;
            }
            n = qemu_read(s, blk->data + len, IN_BLOCK - len);
            win.wait_ns += (uint64_t)(rdmax_now() * 1e9) - now;
        } else {
            n = qemu_read(s, blk->data + len, IN_BLOCK - len);
        }
        if (n < 0) {
            r = (int)n;
            break;
        }
        if (n == 0) {
            break;
        }
        len += (size_t)n;
        total += (uint64_t)n;
        atomic_store_explicit(&s->c.bytes_in, total, memory_order_relaxed);
    }
    rdmax_in_block_drop(blk);
    *totalp = total;
    return r;
}

int rdmax_send_run(struct rdmax_send *p)
{
    struct rdmax_session *s = &p->s;
    struct rdmax_in_block *blk;
    uint64_t total = 0, ram;
    ssize_t len;
    int r = rdmax_session_failed(s);

    if (r < 0) {
        return r;
    }
    blk = rdmax_intake_get(p->intake, false);
    if (!blk) {
        return rdmax_session_failed(s);
    }
    len = peek_ram_size(s, blk->data, PEEK_MAX < IN_BLOCK ? PEEK_MAX : IN_BLOCK, &ram);
    if (len < 0) {
        rdmax_in_block_drop(blk);
        r = (int)len;
        goto out;
    }
    total = (uint64_t)len;
    s->guest_ram = ram; /* for the receiver's pre-flight check */
    if (s->o.cache_bytes != UINT64_MAX) {
        s->codec.cache_bytes = s->o.cache_bytes;
    } else {
        s->codec.cache_bytes = rdmax_page_cache_budget(ram ? ram : DEFAULT_RAM_GUESS, s->nlanes, 0);
    }
    r = rdmax_session_connect(s);
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
    if (r == 0 && p->ch) {
        r = rdmax_channels_send_start(p->ch);
    }
    if (r < 0 || rdmax_session_failed(s)) {
        rdmax_in_block_drop(blk);
        r = rdmax_session_failed(s);
        goto out;
    }
    rdmax_keepalive_start(s);
    rdmax_progress_start(s);

    r = pump(p, blk, (size_t)len, &total);
    if (r < 0) {
        goto out;
    }
    /* QEMU closed the stream: it is complete, or the migration was abandoned. */
    if (rdmax_stream_finish(p->st) < 0) {
        r = rdmax_session_error(s, -EPIPE,
                                "source QEMU closed the stream before its end (migration "
                                "cancelled?): %s",
                                rdmax_stream_error(p->st));
        goto out;
    }
    atomic_store(&s->c.zero_pages, rdmax_stream_stats(p->st)->zero_pages);
    atomic_store(&s->c.opaque_tail, rdmax_stream_stats(p->st)->opaque);
    r = ctrl_flush(p);
    if (r < 0) {
        goto out;
    }
    for (unsigned i = 0; i < s->nlanes; i++) {
        rdmax_ring_close(&p->lanes[i].ring);
    }
    for (unsigned i = 0; i < s->nlanes; i++) {
        pthread_join(p->lanes[i].thread, NULL);
        p->lanes[i].started = false;
    }
    r = rdmax_session_failed(s);
    if (r == 0) {
        r = send_eof(p, total, atomic_load(&s->c.pages));
    }
    if (r < 0) {
        goto out;
    }
    /* Done only once the receiver confirms every byte reached its QEMU. */
    pthread_mutex_lock(&s->mu);
    while (!s->fin_acked && !atomic_load(&s->err)) {
        pthread_cond_wait(&s->cv, &s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    r = rdmax_session_failed(s);
out:
    if (r == 0) {
        /* The receiver may go: nothing more on any connection. */
        rdmax_session_shutdown_all(s);
    }
    rdmax_session_stop(s);
    for (unsigned i = 0; i < RDMAX_LANES_MAX; i++) {
        if (p->lanes[i].started) {
            pthread_join(p->lanes[i].thread, NULL);
            p->lanes[i].started = false;
        }
    }
    if (p->reader_started) {
        pthread_join(p->reader, NULL);
        p->reader_started = false;
    }
    rdmax_channels_join(p->ch);
    return r < 0 ? r : rdmax_session_failed(s);
}

void rdmax_send_destroy(struct rdmax_send *p)
{
    if (!p) {
        return;
    }
    rdmax_session_stop(&p->s);
    for (unsigned i = 0; i < RDMAX_LANES_MAX; i++) {
        struct send_lane *l = &p->lanes[i];
        if (l->ring_ok) {
            /* Pages a failed run left in the ring still hold their blocks: drop them. */
            struct page_slot *sl;
            while ((sl = rdmax_ring_peek_at(&l->ring, 0))) {
                rdmax_in_block_drop(sl->blk);
                rdmax_ring_release_n(&l->ring, 1);
            }
            rdmax_ring_destroy(&l->ring);
        }
        rdmax_lane_encoder_destroy(l->enc);
    }
    rdmax_channels_destroy(p->ch);
    rdmax_intake_destroy(p->intake);
    rdmax_stream_destroy(p->st);
    ZSTD_freeCStream(p->ctrl_z);
    free(p->ctrl_zbuf);
    free(p->ctrl_buf);
    rdmax_session_destroy(&p->s);
    free(p);
}
