#define _GNU_SOURCE
/*
 * TCP transport: one socket per connection. Works everywhere; the fallback
 * when no RDMA device reaches the peer.
 *
 * Socket buffers are kept moderate: bytes parked in kernel buffers count as
 * "sent" for QEMU, whose bandwidth estimate (and so its switchover decision)
 * must stay honest.
 */
#include "transport.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TCP_DEFAULT_SNDBUF (512u << 10) /* the kernel doubles it */
/*
 * What rdma-x holds between QEMU and the wire must be a few ms of link,
 * not MiB (docs/wire-protocol.md, "Flow control"): bytes sitting in a
 * socket are bytes QEMU counted as sent. Unsent bytes per socket stay
 * below NOTSENT_LOWAT (the send buffer keeps room for what is in flight),
 * and the receive buffer is bounded instead of autotuned to 6 MiB: a
 * receiver that falls behind then pushes back at once.
 */
#define TCP_NOTSENT_LOWAT_BYTES (256u << 10)
#define TCP_DEFAULT_RCVBUF (1u << 20) /* the kernel doubles it */

/*
 * rx_next reads what it was asked for and at most TCP_RX_AHEAD bytes more
 * (the next frame's header, a few small frames), all in one recv() when the
 * socket holds them: one call per frame instead of a header and a payload
 * read. The bytes read ahead move to the front when the frame is released,
 * so every frame starts at the front (where the cache is warm) and the
 * buffer grows only to the largest frame plus TCP_RX_AHEAD (from
 * TCP_RX_BUF up): a lane holds about what it did when it read each frame
 * into a buffer of its own.
 */
#define TCP_RX_AHEAD 4096u
#define TCP_RX_BUF (64u << 10)

struct tcp_conn {
    struct rdmax_conn base; /* first: container_of by cast */
    int fd;                 /* set at create; shutdown() may act on it from any thread */
    /*
     * Receive buffer of rx_next/rx_release and recv: owned by the receiving
     * thread, no lock. Bytes [rx_head, rx_tail) came from the socket and
     * are not consumed yet; the first ones are on loan between rx_next and
     * rx_release. Allocated at the first rx_next, freed by close.
     */
    uint8_t *rx;
    size_t rx_cap;
    size_t rx_head, rx_tail;
};

struct tcp_listener {
    struct rdmax_listener base;
    int fd;
    struct rdmax_transport_opts opts; /* for the accepted connections */
};

static struct tcp_conn *tcp_conn_of(struct rdmax_conn *c)
{
    return (struct tcp_conn *)c;
}

static void tcp_tune(int fd, const struct rdmax_transport_opts *o)
{
    int one = 1;
    int buf = (int)(o && o->sndbuf ? o->sndbuf : TCP_DEFAULT_SNDBUF);

    int rcv = TCP_DEFAULT_RCVBUF, lowat = TCP_NOTSENT_LOWAT_BYTES;

    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
    setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    /*
     * A blackholed path (no ACK, no RST) must not hold a blocked send for
     * the kernel's ~15 minutes of retransmissions: the kernel gives up
     * after this long and the send fails with ETIMEDOUT.
     */
    if (o && o->user_timeout_ms > 0) {
        unsigned ut = (unsigned)o->user_timeout_ms;
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &ut, sizeof(ut));
    }
}

static void tcp_name_peer(struct tcp_conn *c)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char h[64], p[16];

    if (getpeername(c->fd, (struct sockaddr *)&ss, &sl) == 0 &&
        getnameinfo((struct sockaddr *)&ss, sl, h, sizeof(h), p, sizeof(p),
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
        snprintf(c->base.peer, sizeof(c->base.peer), "%s:%s", h, p);
    }
}

static struct tcp_conn *tcp_conn_new(int fd)
{
    struct tcp_conn *c = calloc(1, sizeof(*c));

    if (!c) {
        close(fd);
        return NULL;
    }
    c->base.ops = &rdmax_tcp_ops;
    c->fd = fd;
    tcp_name_peer(c);
    return c;
}

static int tcp_listen(const char *host, const char *port, const struct rdmax_transport_opts *o,
                      struct rdmax_listener **out)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res, *ai;
    int fd = -1, r, err = EADDRNOTAVAIL, one = 1;
    struct tcp_listener *l;

    r = getaddrinfo(host, port, &hints, &res);
    if (r != 0) {
        return r == EAI_SYSTEM ? -errno : -EADDRNOTAVAIL;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        {
            /* Before listen(): accepted sockets inherit it, and the window scale follows it. */
            int rcv = TCP_DEFAULT_RCVBUF;
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcv, sizeof(rcv));
        }
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0) {
            break;
        }
        err = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0) {
        return -err;
    }
    l = calloc(1, sizeof(*l));
    if (!l) {
        close(fd);
        return -ENOMEM;
    }
    l->base.ops = &rdmax_tcp_ops;
    l->fd = fd;
    if (o) {
        l->opts = *o;
        l->opts.why = NULL; /* the caller's buffer is for this call only */
        l->opts.why_len = 0;
    }
    *out = &l->base;
    return 0;
}

static int tcp_accept(struct rdmax_listener *base, int timeout_ms, struct rdmax_conn **out)
{
    struct tcp_listener *l = (struct tcp_listener *)base;
    struct pollfd pfd = {.fd = l->fd, .events = POLLIN};
    struct tcp_conn *c;
    int fd, r;

    r = poll(&pfd, 1, timeout_ms);
    if (r < 0) {
        return -errno;
    }
    if (r == 0) {
        return -ETIMEDOUT;
    }
    fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) {
        /* The client gave up already: nothing to accept, not an error. */
        return errno == EAGAIN || errno == ECONNABORTED || errno == EINTR ? -ETIMEDOUT : -errno;
    }
    tcp_tune(fd, &l->opts);
    c = tcp_conn_new(fd);
    if (!c) {
        return -ENOMEM;
    }
    *out = &c->base;
    return 0;
}

static void tcp_listener_close(struct rdmax_listener *base)
{
    struct tcp_listener *l = (struct tcp_listener *)base;

    if (l) {
        close(l->fd);
        free(l);
    }
}

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * connect() without blocking past deadline: a host that drops SYNs would
 * otherwise hold a blocking connect for ~2 minutes. 0 or the errno.
 */
static int tcp_connect_until(int fd, const struct addrinfo *ai, int64_t deadline)
{
    int fl = fcntl(fd, F_GETFL), err = 0;
    socklen_t el = sizeof(err);

    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        return errno;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        if (errno != EINPROGRESS) {
            return errno;
        }
        for (;;) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            int64_t left = deadline - now_ms();
            int r = poll(&pfd, 1, left > 0 ? (int)left : 0);
            if (r < 0 && errno == EINTR) {
                continue;
            }
            if (r < 0) {
                return errno;
            }
            if (r == 0) {
                return ETIMEDOUT;
            }
            break;
        }
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el) < 0) {
            return errno;
        }
        if (err) {
            return err;
        }
    }
    return fcntl(fd, F_SETFL, fl) < 0 ? errno : 0;
}

static int tcp_connect(const char *host, const char *port, const struct rdmax_transport_opts *o,
                       struct rdmax_conn **out)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    int64_t deadline = now_ms() + (o ? o->connect_timeout_ms : 10000);
    int err = ECONNREFUSED;

    for (;;) {
        struct addrinfo *res, *ai;
        int r = getaddrinfo(host, port, &hints, &res);
        if (r != 0) {
            return r == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
        }
        for (ai = res; ai; ai = ai->ai_next) {
            int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
            if (fd < 0) {
                err = errno;
                continue;
            }
            tcp_tune(fd, o);
            err = tcp_connect_until(fd, ai, deadline);
            if (err == 0) {
                struct tcp_conn *c = tcp_conn_new(fd);
                freeaddrinfo(res);
                if (!c) {
                    return -ENOMEM;
                }
                *out = &c->base;
                return 0;
            }
            close(fd);
        }
        freeaddrinfo(res);
        /* The receiver may still be starting: retry refused connections. */
        if ((err != ECONNREFUSED && err != ENETUNREACH) || now_ms() >= deadline) {
            return -err;
        }
        usleep(50 * 1000);
    }
}

static int tcp_send(struct rdmax_conn *base, const struct iovec *iov, int iovcnt)
{
    struct tcp_conn *c = tcp_conn_of(base);
    struct iovec v[RDMAX_CONN_IOV_MAX];
    int n = iovcnt;

    if (n > RDMAX_CONN_IOV_MAX) {
        return -EINVAL;
    }
    memcpy(v, iov, sizeof(*iov) * n);
    struct iovec *p = v;
    while (n > 0) {
        struct msghdr m = {.msg_iov = p, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return errno == EPIPE ? -ECONNRESET : -errno;
        }
        while (n > 0 && (size_t)w >= p->iov_len) {
            w -= (ssize_t)p->iov_len;
            p++;
            n--;
        }
        if (n > 0) {
            p->iov_base = (uint8_t *)p->iov_base + w;
            p->iov_len -= (size_t)w;
        }
    }
    return 0;
}

static int tcp_recv(struct rdmax_conn *base, void *buf, size_t len, int timeout_ms)
{
    struct tcp_conn *c = tcp_conn_of(base);
    int64_t deadline = timeout_ms < 0 ? 0 : now_ms() + timeout_ms;
    uint8_t *p = buf;

    if (c->rx_tail > c->rx_head) {
        /* What rx_next read ahead comes first. */
        size_t k = c->rx_tail - c->rx_head;

        if (k > len) {
            k = len;
        }
        memcpy(p, c->rx + c->rx_head, k);
        c->rx_head += k;
        if (c->rx_head == c->rx_tail) {
            c->rx_head = c->rx_tail = 0;
        }
        p += k;
        len -= k;
    }
    while (len > 0) {
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        int64_t left = timeout_ms < 0 ? -1 : deadline - now_ms();
        /* One deadline for the whole call, not one per chunk. */
        int r = poll(&pfd, 1, left < 0 ? (timeout_ms < 0 ? -1 : 0) : (int)left);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        if (r == 0) {
            return -ETIMEDOUT;
        }
        ssize_t n = recv(c->fd, p, len, 0);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            return -errno;
        }
        if (n == 0) {
            return -ECONNRESET;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Room for len + TCP_RX_AHEAD bytes from rx_head on: move the unconsumed bytes to the front, or
 * grow. */
static int tcp_rx_room(struct tcp_conn *c, size_t len)
{
    size_t have = c->rx_tail - c->rx_head, want = len + TCP_RX_AHEAD;

    if (c->rx_head + want <= c->rx_cap) {
        return 0;
    }
    if (want > c->rx_cap) {
        size_t cap = c->rx_cap ? c->rx_cap : TCP_RX_BUF;
        uint8_t *b;

        while (cap < want) {
            cap *= 2;
        }
        /* Not realloc: it would copy (and touch) the whole old buffer, not the few bytes held. */
        b = malloc(cap);
        if (!b) {
            return -ENOMEM;
        }
        if (have) {
            memcpy(b, c->rx + c->rx_head, have);
        }
        free(c->rx);
        c->rx = b;
        c->rx_cap = cap;
    } else if (c->rx_head && have) {
        memmove(c->rx, c->rx + c->rx_head, have);
    }
    c->rx_head = 0;
    c->rx_tail = have;
    return 0;
}

static int tcp_rx_next(struct rdmax_conn *base, size_t len, uint8_t **out, int timeout_ms)
{
    struct tcp_conn *c = tcp_conn_of(base);
    int64_t deadline = timeout_ms < 0 ? 0 : now_ms() + timeout_ms;
    int r;

    if (len > RDMAX_RX_LEND_MAX) {
        return -EMSGSIZE;
    }
    r = tcp_rx_room(c, len);
    if (r < 0) {
        return r;
    }
    while (c->rx_tail - c->rx_head < len) {
        /* What the socket holds, up to TCP_RX_AHEAD past the loan: poll only when it is empty. */
        size_t end = c->rx_head + len + TCP_RX_AHEAD;
        ssize_t n = recv(c->fd, c->rx + c->rx_tail,
                         (end < c->rx_cap ? end : c->rx_cap) - c->rx_tail, MSG_DONTWAIT);

        if (n > 0) {
            c->rx_tail += (size_t)n;
            continue;
        }
        if (n == 0) {
            return -ECONNRESET;
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            return -errno;
        }
        struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
        int64_t left = timeout_ms < 0 ? -1 : deadline - now_ms();
        /* One deadline for the whole call, as in tcp_recv. */
        r = poll(&pfd, 1, left < 0 ? (timeout_ms < 0 ? -1 : 0) : (int)left);
        if (r < 0 && errno != EINTR) {
            return -errno;
        }
        if (r == 0) {
            return -ETIMEDOUT;
        }
    }
    *out = c->rx + c->rx_head;
    return 0;
}

static void tcp_rx_release(struct rdmax_conn *base, size_t len)
{
    struct tcp_conn *c = tcp_conn_of(base);

    c->rx_head += len;
    if (c->rx_head >= c->rx_tail) {
        c->rx_head = c->rx_tail = 0;
    } else if (c->rx_tail - c->rx_head <= TCP_RX_AHEAD) {
        /* A few bytes read ahead: the next frame starts at the front, where the cache is warm. */
        memmove(c->rx, c->rx + c->rx_head, c->rx_tail - c->rx_head);
        c->rx_tail -= c->rx_head;
        c->rx_head = 0;
    }
}

static void tcp_shutdown(struct rdmax_conn *base)
{
    shutdown(tcp_conn_of(base)->fd, SHUT_RDWR);
}

static void tcp_close(struct rdmax_conn *base)
{
    if (base) {
        close(tcp_conn_of(base)->fd);
        free(tcp_conn_of(base)->rx);
        free(base);
    }
}

const struct rdmax_transport_ops rdmax_tcp_ops = {
    .name = "tcp",
    .listen = tcp_listen,
    .accept = tcp_accept,
    .listener_close = tcp_listener_close,
    .connect = tcp_connect,
    .send = tcp_send,
    .recv = tcp_recv,
    .rx_next = tcp_rx_next,
    .rx_release = tcp_rx_release,
    .shutdown = tcp_shutdown,
    .close = tcp_close,
};
