/*
 * rdma-x: QEMU's further migration channels (multifd, postcopy preempt)
 * through the unix front end; see channels.h.
 *
 * One thread per channel on each side, one rdma-x connection per channel:
 * a destination QEMU that reads one multifd channel slowly (its thread
 * waits for a SYNC on the main channel) must never stall another channel
 * or the main stream, which a shared connection would. The sender never
 * writes to these sockets and the receiver never reads from them: QEMU
 * sends nothing back on them.
 */
#define _GNU_SOURCE
#include "channels.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#include "be.h"
#include "front-unix.h"
#include "level.h"
#include "multifd.h"

#define CHAN_CHUNK (256u << 10) /* bytes per CHAN_DATA frame at most */
/*
 * What may follow the destination QEMU closing a channel: its last
 * packet (a SYNC, in 7.2 with up to 512 KiB of pages), with room to spare;
 * more is a QEMU that closed a channel it still needed.
 */
#define CHAN_UNREAD_MAX (4u << 20)
#define CHAN_ZSTD_LEVEL 1       /* the encoder must keep up with QEMU's own threads */
#define CHAN_ZSTD_BACKOFF 16    /* frames sent raw after one that did not compress */
#define CHAN_STACK (256u << 10)
#define CHAN_LEVEL_WINDOW_NS 100000000ull /* as the main pipe's (send.c) */

struct chan {
    struct rdmax_channels *ch;
    unsigned k;  /* index among the further channels, in the source's accept order */
    int qemu_fd; /* owned by the channel's thread */
    pthread_t thread;
    struct rdmax_lane_encoder *enc; /* sender: freed with ch (the stats point into it) */
    struct rdmax_lane_decoder *dec; /* receiver */
    bool started;                   /* under ch->mu */
    bool done;                      /* receiver: delivered to its end (ch->mu) */
};

struct rdmax_channels {
    struct rdmax_session *s;
    const char *path;
    int listen_fd; /* sender */
    int stop_fd;   /* sender: eventfd, ends the acceptor */
    pthread_t acceptor;
    bool acceptor_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned n;         /* channels started */
    unsigned connected; /* receiver: connected to the destination QEMU, in order */
    unsigned done;      /* receiver: delivered to their end */
    struct chan c[RDMAX_CHAN_MAX];

    /*
     * Sender: one codec level for every channel encoder, as the main pipe
     * has one for its lanes (level.h): the channels share the link and the
     * CPU, so per-channel controllers would chase each other. Each channel
     * adds its window's figures; the first to see the window over runs the
     * controller.
     */
    pthread_mutex_t lvl_mu;
    struct rdmax_level_ctl ctl; /* lvl_mu */
    uint64_t win_start;         /* lvl_mu */
    _Atomic uint64_t w_wait, w_link, w_bytes, w_wire;
    _Atomic unsigned running; /* channel threads in their copy loop */
    _Atomic int level;
};

static struct rdmax_channels *channels_new(struct rdmax_session *s, const char *path)
{
    struct rdmax_channels *ch = calloc(1, sizeof(*ch));

    if (!ch) {
        return NULL;
    }
    ch->s = s;
    ch->path = path;
    ch->listen_fd = -1;
    ch->stop_fd = eventfd(0, EFD_CLOEXEC);
    if (ch->stop_fd < 0) {
        free(ch);
        return NULL;
    }
    pthread_mutex_init(&ch->mu, NULL);
    pthread_cond_init(&ch->cv, NULL);
    pthread_mutex_init(&ch->lvl_mu, NULL);
    /*
     * Zstd 1 at most, QEMU's own multifd level: the channel threads run
     * next to the guest's vCPUs, and level 2 cost more time than its
     * bytes saved (scripts/evac-bench, 2 guests one after another: 12.6
     * and 10.9 s in migration against 13.2 and 14.4 s). And from 1, not
     * raw: where the CPU, not the link, is the limit raw moves no faster
     * and the controller never leaves it, sending ~1.8x the bytes (8.4-8.6 s
     * and 471-519 MiB from raw, 8.0-9.1 s and 283-296 MiB from 1, QEMU's
     * multifd+zstd 273-280 MiB); a link that outruns zstd still walks it
     * down to raw within a few windows.
     */
    rdmax_level_ctl_init(&ch->ctl, 1, 0, 1);
    atomic_store(&ch->level, ch->ctl.level);
    return ch;
}

static int start_thread(struct chan *c, void *(*fn)(void *))
{
    pthread_attr_t a;
    int r;

    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, CHAN_STACK);
    r = pthread_create(&c->thread, &a, fn, c);
    pthread_attr_destroy(&a);
    c->started = r == 0;
    return r == 0 ? 0 : -EAGAIN;
}

/* --- sender ----------------------------------------------------------- */

static uint64_t now_ns(void)
{
    return (uint64_t)(rdmax_now() * 1e9);
}

static int chan_send(struct rdmax_session *s, unsigned k, uint8_t type, uint8_t flags,
                     const void *b, size_t n)
{
    int r = rdmax_wire_send(&s->chan[k], type, flags, 0, b, n);

    if (r < 0) {
        return rdmax_session_error(s, r, "QEMU channel %u to %s: %s", k + 1, s->chan[k].conn->peer,
                                   rdmax_conn_strerror(s->chan[k].conn, r));
    }
    return 0;
}

/*
 * One channel's sending side: the parser (multifd.h) splits what QEMU
 * writes into pages, which go through a lane encoder of the channel's own,
 * without a page cache: QEMU hands a page it sends again to whichever
 * channel is free, so a cache per channel found 0.2-13 % of them and cost
 * more CPU than all the rest of the channel (scripts/evac-bench: 7-8 CPU s
 * against 1-2 for two guests, next to the guests' vCPUs); zero pages and
 * zstd remain. The rest is sent as CHAN_DATA. Order is kept: pending pages go
 * out before later bytes and the other way round.
 */
struct chan_tx {
    struct rdmax_session *s;
    struct rdmax_channels *ch;
    unsigned k;
    struct rdmax_lane_encoder *enc;
    uint8_t *obuf; /* opaque bytes not sent yet */
    size_t olen;
    uint8_t *zbuf;
    size_t zcap;
    ZSTD_CCtx *z;
    bool compress;
    unsigned backoff;
};

static int tx_flush_opaque(struct chan_tx *t)
{
    size_t n = t->olen;

    if (n == 0) {
        return 0;
    }
    t->olen = 0;
    /*
     * Packet headers and payloads QEMU did not compress shrink; channels
     * QEMU compresses itself do not, and are sent raw, with only one try
     * every CHAN_ZSTD_BACKOFF frames.
     */
    if (t->compress && t->backoff == 0) {
        size_t zn = ZSTD_compressCCtx(t->z, t->zbuf, t->zcap, t->obuf, n, CHAN_ZSTD_LEVEL);
        if (!ZSTD_isError(zn) && zn < n - n / 10) {
            return chan_send(t->s, t->k, RDMAX_F_CHAN_DATA, RDMAX_FF_ZSTD, t->zbuf, zn);
        }
        t->backoff = CHAN_ZSTD_BACKOFF;
    } else if (t->backoff) {
        t->backoff--;
    }
    return chan_send(t->s, t->k, RDMAX_F_CHAN_DATA, 0, t->obuf, n);
}

static int tx_flush_pages(struct chan_tx *t)
{
    struct iovec iov[2];
    int cnt, r;
    ssize_t n;

    if (!t->enc || rdmax_lane_encoder_pending(t->enc) == 0) {
        return 0;
    }
    n = rdmax_lane_encoder_flush_iov(t->enc, iov, &cnt);
    if (n <= 0) {
        return n == 0 ? 0
                      : rdmax_session_error(t->s, (int)n, "QEMU channel %u: encoding failed",
                                            t->k + 1);
    }
    uint64_t t0 = now_ns();
    r = rdmax_wire_sendv(&t->s->chan[t->k], RDMAX_F_CHAN_PAGES, 0, 0, iov, cnt);
    atomic_fetch_add_explicit(&t->ch->w_link, now_ns() - t0, memory_order_relaxed);
    atomic_fetch_add_explicit(&t->ch->w_wire, (uint64_t)n, memory_order_relaxed);
    if (r < 0) {
        return rdmax_session_error(t->s, r, "QEMU channel %u to %s: %s", t->k + 1,
                                   t->s->chan[t->k].conn->peer,
                                   rdmax_conn_strerror(t->s->chan[t->k].conn, r));
    }
    return 0;
}

static int tx_bytes(void *arg, const uint8_t *b, size_t n)
{
    struct chan_tx *t = arg;
    int r = tx_flush_pages(t);

    while (r == 0 && n) {
        size_t take = CHAN_CHUNK - t->olen < n ? CHAN_CHUNK - t->olen : n;
        memcpy(t->obuf + t->olen, b, take);
        t->olen += take;
        b += take;
        n -= take;
        if (t->olen == CHAN_CHUNK) {
            r = tx_flush_opaque(t);
        }
    }
    return r;
}

static int tx_page(void *arg, struct rdmax_page_key key, const uint8_t *page)
{
    struct chan_tx *t = arg;
    int r = tx_flush_opaque(t);

    if (r < 0) {
        return r;
    }
    if (!t->enc) {
        return tx_bytes(t, page, RDMAX_PAGE_SIZE);
    }
    r = rdmax_lane_encoder_add(t->enc, key, page);
    if (r < 0) {
        return rdmax_session_error(t->s, r, "QEMU channel %u: encoding failed", t->k + 1);
    }
    return rdmax_lane_encoder_pending(t->enc) == RDMAX_BATCH_MAX_PAGES ? tx_flush_pages(t) : 0;
}

static const struct rdmax_mfd_sink tx_sink = {.bytes = tx_bytes, .page = tx_page};

/* The window is over: choose the level for the next (any channel thread). */
static void level_window(struct rdmax_channels *ch, uint64_t now)
{
    struct rdmax_level_window w = {0};
    unsigned n;

    if (pthread_mutex_trylock(&ch->lvl_mu) != 0) {
        return;
    }
    if (ch->win_start == 0 || now - ch->win_start >= CHAN_LEVEL_WINDOW_NS) {
        n = atomic_load(&ch->running);
        w.wall_ns = ch->win_start ? now - ch->win_start : 0;
        /* Per channel, as the controller's figures are per lane. */
        w.wait_ns = atomic_exchange(&ch->w_wait, 0) / (n ? n : 1);
        w.link_ns = atomic_exchange(&ch->w_link, 0) / (n ? n : 1);
        w.bytes = atomic_exchange(&ch->w_bytes, 0);
        w.wire = atomic_exchange(&ch->w_wire, 0);
        if (ch->win_start && ch->s->codec.zstd_level == 0) {
            atomic_store(&ch->level, rdmax_level_ctl_window(&ch->ctl, &w));
        }
        ch->win_start = now;
    }
    pthread_mutex_unlock(&ch->lvl_mu);
}

static void *send_chan_main(void *arg)
{
    struct chan *c = arg;
    struct rdmax_session *s = c->ch->s;
    uint8_t *buf = malloc(CHAN_CHUNK);
    struct rdmax_mfd_parser *mfd = rdmax_mfd_create();
    struct chan_tx t = {
        .s = s,
        .ch = c->ch,
        .k = c->k,
        .obuf = malloc(CHAN_CHUNK),
        .zcap = ZSTD_compressBound(CHAN_CHUNK),
        .z = ZSTD_createCCtx(),
        .compress = s->codec.zstd_level >= 0,
    };
    uint64_t total = 0;
    bool counted = false;

    t.zbuf = malloc(t.zcap);
    if (!buf || !mfd || !t.obuf || !t.zbuf || !t.z ||
        rdmax_lane_encoder_create(&(struct rdmax_codec_config){.zstd_level = s->codec.zstd_level},
                                  &t.enc) < 0) {
        rdmax_session_error(s, -ENOMEM, "out of memory");
        goto out;
    }
    atomic_store(&s->chan_stats[c->k], rdmax_lane_encoder_stats(t.enc));
    if (rdmax_session_connect_channel(s, c->k) < 0) {
        goto out;
    }
    atomic_fetch_add(&c->ch->running, 1);
    counted = true;
    for (;;) {
        struct pollfd pf = {.fd = c->qemu_fd, .events = POLLIN};
        uint64_t t0 = now_ns();
        bool waited = poll(&pf, 1, 0) == 0;
        ssize_t n = read(c->qemu_fd, buf, CHAN_CHUNK);
        uint64_t t1 = now_ns();
        if (waited) {
            atomic_fetch_add_explicit(&c->ch->w_wait, t1 - t0, memory_order_relaxed);
        }
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (rdmax_session_failed(s)) {
            goto out; /* our shutdown on error ended the read */
        }
        if (n < 0) {
            rdmax_session_error(s, -errno, "reading QEMU channel %u: %s", c->k + 1,
                                strerror(errno));
            goto out;
        }
        if (n == 0) {
            break;
        }
        total += (uint64_t)n;
        atomic_fetch_add_explicit(&s->c.chan_bytes, (uint64_t)n, memory_order_relaxed);
        atomic_fetch_add_explicit(&c->ch->w_bytes, (uint64_t)n, memory_order_relaxed);
        level_window(c->ch, t1);
        if (s->codec.zstd_level == 0) {
            rdmax_lane_encoder_set_level(t.enc,
                                         atomic_load_explicit(&c->ch->level, memory_order_relaxed));
        }
        /* What QEMU wrote goes out now: a preempt channel's page is urgent. */
        if (rdmax_mfd_feed(mfd, buf, (size_t)n, &tx_sink, &t) < 0 || tx_flush_pages(&t) < 0 ||
            tx_flush_opaque(&t) < 0) {
            goto out;
        }
    }
    {
        uint8_t eof[8];
        rdmax_put_be64(eof, total);
        chan_send(s, c->k, RDMAX_F_CHAN_EOF, 0, eof, sizeof(eof));
    }
out:
    if (counted) {
        atomic_fetch_sub(&c->ch->running, 1);
    }
    rdmax_session_drop_qemu_fd(s, c->k);
    close(c->qemu_fd);
    c->qemu_fd = -1;
    /* The stats stay readable until the session is written out: the encoder goes with ch. */
    c->enc = t.enc;
    ZSTD_freeCCtx(t.z);
    free(t.zbuf);
    free(t.obuf);
    rdmax_mfd_destroy(mfd);
    free(buf);
    return NULL;
}

/* A connection QEMU made: channel n, on a thread of its own. ch->mu held. */
static int send_chan_add(struct rdmax_channels *ch, int fd)
{
    struct rdmax_session *s = ch->s;
    struct chan *c;

    if (ch->n == RDMAX_CHAN_MAX) {
        close(fd);
        return rdmax_session_error(
            s, -EMFILE, "QEMU opened more than %u channels besides its main one", RDMAX_CHAN_MAX);
    }
    c = &ch->c[ch->n];
    c->ch = ch;
    c->k = ch->n;
    c->qemu_fd = fd;
    if (rdmax_session_add_qemu_fd(s, c->k, fd) < 0) {
        close(fd);
        return rdmax_session_failed(s);
    }
    if (start_thread(c, send_chan_main) < 0) {
        rdmax_session_drop_qemu_fd(s, c->k);
        close(fd);
        return rdmax_session_error(s, -EAGAIN, "cannot start the thread of QEMU channel %u",
                                   c->k + 1);
    }
    ch->n++;
    atomic_store_explicit(&s->c.channels, ch->n, memory_order_relaxed);
    return 0;
}

static void *acceptor_main(void *arg)
{
    struct rdmax_channels *ch = arg;
    struct rdmax_session *s = ch->s;

    for (;;) {
        struct pollfd p[3] = {
            {.fd = ch->listen_fd, .events = POLLIN},
            {.fd = ch->stop_fd, .events = POLLIN},
            {.fd = s->err_fd, .events = POLLIN},
        };
        if (poll(p, 3, -1) < 0) {
            if (errno == EINTR) {
                continue;
            }
            rdmax_session_error(s, -errno, "waiting for QEMU channels: %s", strerror(errno));
            break;
        }
        if (p[1].revents || p[2].revents) {
            break;
        }
        /* The listener is non-blocking, the socket accepted from it blocks. */
        int fd = accept4(ch->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) {
                continue;
            }
            rdmax_session_error(s, -errno, "accept on unix:%s: %s", ch->path, strerror(errno));
            break;
        }
        pthread_mutex_lock(&ch->mu);
        int r = send_chan_add(ch, fd);
        pthread_mutex_unlock(&ch->mu);
        if (r < 0) {
            break;
        }
    }
    return NULL;
}

struct rdmax_channels *rdmax_channels_send_create(struct rdmax_session *s, int listen_fd,
                                                  const char *path)
{
    struct rdmax_channels *ch = channels_new(s, path);

    if (!ch) {
        return NULL;
    }
    ch->listen_fd = listen_fd; /* non-blocking (front-unix.c): accepts here never hang */
    /* Unaccepted channels wait in the backlog until the session is connected. */
    s->features |= RDMAX_FEAT_CHANNELS | RDMAX_FEAT_CHAN_NOCACHE;
    s->chan_nocache = true;
    return ch;
}

int rdmax_channels_send_start(struct rdmax_channels *ch)
{
    if (pthread_create(&ch->acceptor, NULL, acceptor_main, ch) != 0) {
        return rdmax_session_error(ch->s, -EAGAIN, "cannot start the thread for QEMU channels");
    }
    ch->acceptor_started = true;
    return 0;
}

static void acceptor_stop(struct rdmax_channels *ch)
{
    if (ch->acceptor_started) {
        uint64_t one = 1;
        if (write(ch->stop_fd, &one, sizeof(one)) < 0) {
            /* an eventfd write fails only on overflow: it is readable anyway */
        }
        pthread_join(ch->acceptor, NULL);
        ch->acceptor_started = false;
    }
}

unsigned rdmax_channels_send_close(struct rdmax_channels *ch)
{
    unsigned n;

    acceptor_stop(ch);
    /*
     * A channel QEMU connected just before it ended the main stream is
     * still carried; with --serve the backlog holds the next migration's
     * main channel instead, so it is left alone.
     */
    while (!ch->s->o.serve && !rdmax_session_failed(ch->s)) {
        int fd = accept4(ch->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            break;
        }
        pthread_mutex_lock(&ch->mu);
        int r = send_chan_add(ch, fd);
        pthread_mutex_unlock(&ch->mu);
        if (r < 0) {
            break;
        }
    }
    pthread_mutex_lock(&ch->mu);
    n = ch->n;
    pthread_mutex_unlock(&ch->mu);
    return n;
}

/* --- receiver --------------------------------------------------------- */

static int write_all(int fd, const uint8_t *b, size_t n)
{
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w < 0) {
            return -errno;
        }
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Wait until the channels before c are connected to QEMU: 0, or the session's error. */
static int wait_turn(struct chan *c)
{
    struct rdmax_channels *ch = c->ch;
    int r = 0;

    pthread_mutex_lock(&ch->mu);
    while (ch->connected < c->k && (r = rdmax_session_failed(ch->s)) == 0) {
        rdmax_cond_wait_s(&ch->cv, &ch->mu, 0.05);
    }
    pthread_mutex_unlock(&ch->mu);
    return r;
}

/* Decoded pages gather in out, in order, and go to QEMU in one write per batch. */
struct chan_rx {
    uint8_t *out;
    size_t len;
};

static int rx_page(void *arg, struct rdmax_page_key key, const uint8_t *page)
{
    struct chan_rx *x = arg;

    (void)key;
    if (x->len + RDMAX_PAGE_SIZE > CHAN_CHUNK) {
        return -EMSGSIZE; /* a batch holds at most RDMAX_BATCH_MAX_PAGES */
    }
    memcpy(x->out + x->len, page, RDMAX_PAGE_SIZE);
    x->len += RDMAX_PAGE_SIZE;
    return 0;
}

static void *recv_chan_main(void *arg)
{
    struct chan *c = arg;
    struct rdmax_channels *ch = c->ch;
    struct rdmax_session *s = ch->s;
    struct rdmax_wire *w = &s->chan[c->k];
    uint8_t *buf = malloc(RDMAX_FRAME_MAX);
    uint8_t *out = malloc(CHAN_CHUNK);
    ZSTD_DCtx *z = ZSTD_createDCtx();
    uint64_t total = 0, unread = 0; /* delivered; came after the destination QEMU closed */
    bool ended = false;
    int r;

    c->qemu_fd = -1;
    struct rdmax_codec_config cfg = s->codec;
    if (s->chan_nocache) {
        cfg.cache_bytes = 0;
    }
    if (!buf || !out || !z || rdmax_lane_decoder_create(&cfg, &c->dec) < 0) {
        rdmax_session_error(s, -ENOMEM, "out of memory");
        goto out;
    }
    if (wait_turn(c) < 0) {
        goto out;
    }
    r = rdmax_unix_dial(ch->path, s->o.connect_timeout_ms);
    if (r < 0) {
        rdmax_session_error(s, r,
                            "connecting QEMU channel %u to the destination QEMU at unix:%s: %s",
                            c->k + 1, ch->path, strerror(-r));
        goto out;
    }
    c->qemu_fd = r;
    if (rdmax_session_add_qemu_fd(s, c->k, c->qemu_fd) < 0) {
        goto out;
    }
    pthread_mutex_lock(&ch->mu);
    ch->connected++;
    pthread_cond_broadcast(&ch->cv);
    pthread_mutex_unlock(&ch->mu);
    while (!ended) {
        struct rdmax_frame_hdr h;
        const uint8_t *data = buf;
        size_t len;

        /* No timeout of its own: a preempt channel idles for long; the control keep-alives watch
         * the peer. */
        r = rdmax_wire_recv(w, &h, buf, RDMAX_FRAME_MAX, -1);
        if (rdmax_session_failed(s)) {
            goto out;
        }
        if (r < 0) {
            rdmax_session_error(s, r, "QEMU channel %u from %s: %s", c->k + 1, w->conn->peer,
                                rdmax_conn_strerror(w->conn, r));
            goto out;
        }
        switch (h.type) {
        case RDMAX_F_CHAN_PAGES: {
            struct chan_rx x = {.out = out};
            int np = rdmax_lane_decoder_decode(c->dec, buf, h.len, rx_page, &x);
            if (np < 0) {
                rdmax_session_error(s, -EPROTO, "QEMU channel %u: undecodable page batch",
                                    c->k + 1);
                goto out;
            }
            data = out;
            len = x.len;
            goto write;
        }
        case RDMAX_F_CHAN_DATA:
            len = h.len;
            if (h.flags & RDMAX_FF_ZSTD) {
                size_t dn = ZSTD_decompressDCtx(z, out, CHAN_CHUNK, buf, h.len);
                if (ZSTD_isError(dn)) {
                    rdmax_session_error(s, -EPROTO, "QEMU channel %u: undecodable frame (%s)",
                                        c->k + 1, ZSTD_getErrorName(dn));
                    goto out;
                }
                data = out;
                len = dn;
            }
        write:
            if (c->qemu_fd < 0) {
                unread += len;
                if (unread > CHAN_UNREAD_MAX) {
                    rdmax_session_error(s, -EPIPE,
                                        "the destination QEMU closed QEMU channel %u, yet the "
                                        "source QEMU sent %llu more bytes on it",
                                        c->k + 1, (unsigned long long)unread);
                    goto out;
                }
                break;
            }
            r = write_all(c->qemu_fd, data, len);
            if ((r == -EPIPE || r == -ECONNRESET) && !rdmax_session_failed(s)) {
                /*
                 * QEMU 7.2's destination may finish (and close its multifd
                 * channels) before it reads a channel's last SYNC packet:
                 * over a plain socket those bytes would sit unread in the
                 * kernel, unseen by either QEMU. So the channel's rest is
                 * counted and dropped, not an error: the migration's
                 * verdict is QEMU's (the main stream, its return path).
                 */
                rdmax_session_drop_qemu_fd(s, c->k);
                close(c->qemu_fd);
                c->qemu_fd = -1;
                unread = len;
                break;
            }
            if (r < 0) {
                if (!rdmax_session_failed(s)) {
                    rdmax_session_error(s, r, "writing QEMU channel %u to the destination QEMU: %s",
                                        c->k + 1, strerror(-r));
                }
                goto out;
            }
            total += len;
            atomic_fetch_add_explicit(&s->c.chan_bytes, len, memory_order_relaxed);
            break;
        case RDMAX_F_CHAN_EOF:
            if (h.len != 8 || rdmax_get_be64(buf) != total + unread) {
                rdmax_session_error(s, -EPROTO,
                                    "QEMU channel %u ended after %llu bytes, the sender read %llu",
                                    c->k + 1, (unsigned long long)(total + unread),
                                    h.len == 8 ? (unsigned long long)rdmax_get_be64(buf) : 0ull);
                goto out;
            }
            if (c->qemu_fd >= 0) {
                /* QEMU sees the channel end as the source QEMU ended it. */
                shutdown(c->qemu_fd, SHUT_WR);
            } else {
                fprintf(stderr,
                        "rdma-x: note: the destination QEMU closed QEMU channel %u with its last "
                        "%llu bytes unread\n",
                        c->k + 1, (unsigned long long)unread);
            }
            ended = true;
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
            rdmax_session_error(s, -EPROTO, "sender sent an unexpected %s frame on QEMU channel %u",
                                rdmax_frame_type_name(h.type), c->k + 1);
            goto out;
        }
    }
    pthread_mutex_lock(&ch->mu);
    c->done = true;
    ch->done++;
    pthread_cond_broadcast(&ch->cv);
    pthread_mutex_unlock(&ch->mu);
out:
    if (c->qemu_fd >= 0) {
        rdmax_session_drop_qemu_fd(s, c->k);
        close(c->qemu_fd);
        c->qemu_fd = -1;
    }
    ZSTD_freeDCtx(z);
    free(out);
    free(buf);
    return NULL;
}

/* Channel k's connection is in (a handshake thread): deliver it. */
static void on_channel(void *arg, unsigned k)
{
    struct rdmax_channels *ch = arg;
    struct chan *c = &ch->c[k];

    pthread_mutex_lock(&ch->mu);
    c->ch = ch;
    c->k = k;
    if (start_thread(c, recv_chan_main) < 0) {
        pthread_mutex_unlock(&ch->mu);
        rdmax_session_error(ch->s, -EAGAIN, "cannot start the thread of QEMU channel %u", k + 1);
        return;
    }
    ch->n++;
    atomic_store_explicit(&ch->s->c.channels, ch->n, memory_order_relaxed);
    pthread_cond_broadcast(&ch->cv);
    pthread_mutex_unlock(&ch->mu);
}

struct rdmax_channels *rdmax_channels_recv_create(struct rdmax_session *s, const char *path)
{
    struct rdmax_channels *ch = channels_new(s, path);

    if (ch) {
        s->on_channel = on_channel;
        s->on_channel_arg = ch;
    }
    return ch;
}

int rdmax_channels_recv_wait(struct rdmax_channels *ch, unsigned n)
{
    struct rdmax_session *s = ch->s;
    uint64_t last_bytes = UINT64_MAX;
    unsigned last_n = 0, last_done = 0;
    double last_change = rdmax_now();
    int r = 0;

    pthread_mutex_lock(&ch->mu);
    while ((r = rdmax_session_failed(s)) == 0 && (ch->n < n || ch->done < n)) {
        uint64_t bytes = atomic_load_explicit(&s->c.chan_bytes, memory_order_relaxed);

        if (ch->n > n) {
            pthread_mutex_unlock(&ch->mu);
            return rdmax_session_error(s, -EPROTO, "sender carried %u QEMU channels, announced %u",
                                       ch->n, n);
        }
        if (bytes != last_bytes || ch->n != last_n || ch->done != last_done) {
            last_bytes = bytes;
            last_n = ch->n;
            last_done = ch->done;
            last_change = rdmax_now();
        } else if (rdmax_now() - last_change > s->o.timeout_ms / 1000.0) {
            unsigned k = ch->n < n ? ch->n : 0;
            for (unsigned i = 0; ch->n >= n && i < n; i++) {
                if (!ch->c[i].done) {
                    k = i;
                    break;
                }
            }
            pthread_mutex_unlock(&ch->mu);
            return rdmax_session_error(s, -ETIMEDOUT,
                                       ch->n < n
                                           ? "QEMU channel %u of %u never arrived (none for %d s)"
                                           : "QEMU channel %u of %u did not end (silent for %d s)",
                                       k + 1, n, s->o.timeout_ms / 1000);
        }
        rdmax_cond_wait_s(&ch->cv, &ch->mu, 0.1);
    }
    pthread_mutex_unlock(&ch->mu);
    atomic_store(&s->chan_closed, true);
    return r;
}

void rdmax_channels_join(struct rdmax_channels *ch)
{
    if (!ch) {
        return;
    }
    acceptor_stop(ch);
    for (unsigned k = 0; k < RDMAX_CHAN_MAX; k++) {
        if (ch->c[k].started) {
            pthread_join(ch->c[k].thread, NULL);
            ch->c[k].started = false;
        }
    }
}

void rdmax_channels_destroy(struct rdmax_channels *ch)
{
    if (!ch) {
        return;
    }
    rdmax_channels_join(ch);
    for (unsigned k = 0; k < RDMAX_CHAN_MAX; k++) {
        atomic_store(&ch->s->chan_stats[k], NULL);
        rdmax_lane_encoder_destroy(ch->c[k].enc);
        rdmax_lane_decoder_destroy(ch->c[k].dec);
    }
    if (ch->s->on_channel_arg == ch) {
        ch->s->on_channel = NULL;
        ch->s->on_channel_arg = NULL;
    }
    close(ch->stop_fd);
    pthread_mutex_destroy(&ch->mu);
    pthread_cond_destroy(&ch->cv);
    pthread_mutex_destroy(&ch->lvl_mu);
    free(ch);
}
