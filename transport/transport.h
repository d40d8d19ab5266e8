/*
 * Transport ops: how rdma-x moves wire frames between the two hosts.
 *
 * Every transport (tcp.c, rdma.c) exports one const ops table, listed in
 * transport.c. The data path above it (transport/wire.c) speaks in whole
 * frames for sending (gathered from the caller's iovecs) and in exact byte
 * counts for receiving, either copied out (recv) or lent in place from the
 * transport's own memory (rx_next/rx_release), so a transport may be a byte
 * stream (TCP) or a message transport (RDMA SEND/RECV) underneath.
 *
 * Threads: one connection is used by at most one sending thread and at most
 * one receiving thread at a time (the wire layer serialises senders with its
 * own mutex). shutdown() may be called from any thread to wake both.
 *
 * Return convention: 0 or -errno (see docs/errors.md).
 */
#ifndef RDMAX_TRANSPORT_H
#define RDMAX_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct rdmax_transport_ops;

/* Embedded as the first member of each transport's own connection struct. */
struct rdmax_conn {
    const struct rdmax_transport_ops *ops; /* set by the transport, read-only */
    char peer[128];                        /* "host:port" for messages */
    /*
     * Why the connection failed, in words the errno cannot carry ("" until
     * then): written once by the transport before the failing call
     * returns, read by the owner for its reason. Transports do not log;
     * the session words every message.
     */
    char why[192];
};

struct rdmax_listener {
    const struct rdmax_transport_ops *ops;
    /* Why the last accept() turned a connection away ("" if it said nothing). */
    char why[192];
};

/* Options given to listen/connect; set by the CLI, read-only afterwards. */
struct rdmax_transport_opts {
    int connect_timeout_ms; /* give up connecting after this long */
    int user_timeout_ms;    /* tcp: TCP_USER_TIMEOUT (unacknowledged data), 0 = kernel default */
    size_t sndbuf;          /* socket buffer hint, 0 = transport default */
    size_t pinned_max;      /* rdma: bound on registered memory per process */
    int busy_poll;          /* rdma: poll the CQ instead of sleeping on events */
    /*
     * listen/connect: where to write, as one line, why they failed (they
     * return -errno either way; "" when the errno says it all). NULL: the
     * transport logs it as a glib warning instead. A buffer belongs to one
     * call: concurrent connects each need their own (copy the options).
     */
    char *why;
    size_t why_len;
};

struct rdmax_transport_ops {
    const char *name; /* "tcp", "rdma" */

    /*
     * Bind and listen on host:port (host may be "0.0.0.0", "::", a name).
     * Called once by the receiver's main thread.
     */
    int (*listen)(const char *host, const char *port, const struct rdmax_transport_opts *o,
                  struct rdmax_listener **out);

    /*
     * Wait up to timeout_ms (-1: forever) for one incoming connection.
     * Returns -ETIMEDOUT when none came. The connection belongs to the
     * caller until close(). -ECONNABORTED: one incoming connection was
     * turned away (not rdma-x, no memory to pin for it...; l->why says
     * why). Any error leaves the listener usable.
     */
    int (*accept)(struct rdmax_listener *l, int timeout_ms, struct rdmax_conn **out);

    /* Stop listening and free the listener. Accepts NULL. */
    void (*listener_close)(struct rdmax_listener *l);

    /*
     * Connect to host:port, retrying refused connections until
     * o->connect_timeout_ms passed; never blocks longer than that (a host
     * that drops SYNs gives -ETIMEDOUT). May be called from several
     * threads at once (the sender connects its lanes in parallel).
     */
    int (*connect)(const char *host, const char *port, const struct rdmax_transport_opts *o,
                   struct rdmax_conn **out);

    /*
     * Send all bytes of iov (at most RDMAX_CONN_IOV_MAX entries) as one
     * unit (one wire frame). Blocks while the peer applies back-pressure.
     * The iov buffers are the caller's; they are only read until return
     * (tcp: the kernel has copied them; rdma: into registered send slots).
     * Returns 0, -EINVAL for too many entries, or
     * -ECONNRESET/-EPIPE/-ETIMEDOUT/... on failure.
     */
    int (*send)(struct rdmax_conn *c, const struct iovec *iov, int iovcnt);

    /*
     * Receive exactly len bytes into buf within timeout_ms (-1: forever)
     * in all: a peer dripping one byte at a time cannot stretch it.
     * Returns 0, -ECONNRESET when the peer closed (also cleanly) before
     * len bytes came, -ETIMEDOUT, or another -errno.
     */
    int (*recv)(struct rdmax_conn *c, void *buf, size_t len, int timeout_ms);

    /*
     * Receive by lending (optional: NULL in a transport without its own
     * receive buffer; wire.c then reads with recv into a buffer of its own).
     *
     * rx_next: make the next len bytes of the stream readable in place, in
     * one piece, and point *p at them; within timeout_ms (-1: forever) in
     * all. Consumes nothing: calling it again with a larger len (say, the
     * header first, then header + payload) extends the same loan, and *p
     * may move then (earlier pointers are void). The bytes belong to the
     * transport; the receiving thread borrows them until rx_release (or
     * the next rx_next) and may modify them in place (decrypt). They lie
     * in the transport's own memory: a socket buffer (tcp) or a
     * registered receive slot (rdma; a bounce buffer when the bytes span
     * slots). Returns 0, -EMSGSIZE when len is more than the transport
     * can lend at once (RDMAX_RX_LEND_MAX; nothing is consumed, the
     * connection is then unusable for framing), -ECONNRESET when the peer
     * closed before len bytes came, -ETIMEDOUT, or another -errno.
     *
     * rx_release: the receiving thread is done with the first len bytes
     * of the loan (len <= the last rx_next's); they are consumed and the
     * transport may reuse their memory (tcp: read over it; rdma: re-post
     * the slot and return its credit). Any pointer from rx_next is void.
     *
     * recv and rx_next may be mixed on one connection, but not while a
     * loan is outstanding: recv first hands out what rx_next read ahead.
     */
    int (*rx_next)(struct rdmax_conn *c, size_t len, uint8_t **p, int timeout_ms);
    void (*rx_release)(struct rdmax_conn *c, size_t len);

    /* Wake any thread blocked in send/recv on c; they return -ECONNRESET. */
    void (*shutdown)(struct rdmax_conn *c);

    /* Free the connection. Accepts NULL. No other thread may be inside c. */
    void (*close)(struct rdmax_conn *c);
};

/* Entries of one send(): a frame header, a batch header, a run per page, and spare. */
#define RDMAX_CONN_IOV_MAX 80

/*
 * The most rx_next lends at once: a whole frame (wire.h RDMAX_FRAME_MAX
 * plus its header) with room to spare. Memory grows to what the caller
 * asks for, and the wire asks only after checking a frame's length
 * against its own cap, so a peer cannot make it grow past that.
 */
#define RDMAX_RX_LEND_MAX ((size_t)(4u << 20) + 4096u)

extern const struct rdmax_transport_ops rdmax_tcp_ops;
#ifdef RDMAX_HAVE_RDMA
extern const struct rdmax_transport_ops rdmax_rdma_ops;
#endif

/* The transport called name, or NULL when it is unknown or not built. */
const struct rdmax_transport_ops *rdmax_transport_find(const char *name);

/* Comma-separated names of the transports this binary was built with. */
const char *rdmax_transport_list(void);

/*
 * Split "host:port" or "[v6addr]:port" into its parts. Returns 0 or
 * -EINVAL with the reason in err.
 */
int rdmax_addr_split(const char *spec, char *host, size_t host_len, char *port, size_t port_len,
                     char *err, size_t err_len);

#endif
