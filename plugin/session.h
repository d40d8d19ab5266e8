/*
 * What both sides share: options, the connections of one migration, the
 * handshake, keep-alives, and the one way out on failure.
 */
#ifndef RDMAX_SESSION_H
#define RDMAX_SESSION_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "crypt.h"
#include "lane-codec.h"
#include "sanitize.h"
#include "wire.h"

#define RDMAX_SLOTS_MAX 8u

struct rdmax_admission;

struct rdmax_opts {
    bool sender;
    const char *addr;       /* --to / --listen */
    const char *unix_path;  /* send --listen-unix / recv --connect-unix (this slot's) */
    /*
     * --serve with --listen-unix / --connect-unix given several times:
     * one slot per path, each carrying its own migrations, all at once
     * (main.c; slot k uses the port of addr + k). nslots 0 or 1: one.
     */
    const char *slot_path[RDMAX_SLOTS_MAX];
    unsigned nslots;
    unsigned slot;       /* this pipeline's slot, 0-based */
    const char *label;   /* with several slots: names this slot in its lines, else NULL */
    struct rdmax_admission *admission; /* recv: shared pre-flight bookkeeping, or NULL */
    bool serve;             /* --serve: migration after migration (main.c) */
    unsigned lanes;         /* 0: sender = cores, receiver = take the sender's */
    const char *stats_json; /* --stats-json */
    bool progress;          /* --progress */
    const char *transport;  /* tcp | rdma | auto */
    int timeout_ms;         /* peer silence before giving up */
    int connect_timeout_ms; /* sender: how long to retry connecting */
    uint64_t cache_bytes;   /* --cache-size, 0 = from the guest RAM size */
    int zstd_level;         /* --zstd-level: 0 adaptive, -1 off */
    uint64_t pinned_max;    /* --rdma-pinned-max, 0 = transport default */
    bool busy_poll;         /* --busy-poll */
    bool no_pace;           /* send --no-pace: take QEMU's stream unpaced (pace.h) */
    const char *psk_file;   /* --psk-file: mutual authentication */
    bool encrypt;           /* --encrypt: AES-256-GCM frames (needs a PSK) */
    uint64_t cache_max;     /* recv --cache-max: cap on lanes x cache, 0 = default */
    uint64_t host_reserve;  /* recv --host-reserve: memory the pre-flight leaves to the host */
    bool no_preflight;      /* recv --no-preflight */
    /* send --listen-disks-unix / recv --connect-disks-unix: NBD storage migration (disks.h) */
    const char *disks_path;
    const char *status_path; /* --status-socket: rdma-x status (status.h, main.c) */
    /*
     * Receiver with disks_path: where its accept loop hands disk
     * connections (they outlive the migration). Owned by main.c.
     */
    struct rdmax_disks *disks;
    /*
     * The QEMU side, set by the caller (main.c: 0 and 1; a test: pipes).
     * Sender: qemu_in carries the stream, qemu_out the return path to
     * QEMU. Receiver: qemu_in the return path from QEMU, qemu_out the
     * stream. Owned by the caller: valid until the pipeline is destroyed;
     * on error the pipeline points both at /dev/null at once (dup2), so
     * QEMU sees its pipes close while the numbers stay valid.
     */
    int qemu_in, qemu_out;
    /*
     * Sender with unix_path: the listening socket QEMU connects its main
     * channel to (main.c accepted that one already); its further channels
     * (multifd, postcopy preempt) are accepted from it (channels.c).
     * Owned by the pipeline from create on.
     */
    int unix_listen_fd;
};

/* Counters: written by the data threads, read by stats/progress (relaxed). */
struct rdmax_counters {
    _Atomic uint64_t bytes_in;   /* QEMU stream bytes (sender: read, receiver: written) */
    _Atomic uint64_t pages;      /* page payloads carried in lanes */
    _Atomic uint64_t ctrl_bytes; /* control bytes (stream minus page payloads) */
    _Atomic uint64_t rp_bytes;   /* return-path bytes relayed */
    _Atomic uint64_t zero_pages; /* QEMU ZERO records seen */
    _Atomic uint64_t chan_bytes; /* bytes of QEMU's further channels (multifd, preempt) */
    _Atomic uint32_t channels;   /* how many of those channels */
    _Atomic bool opaque_tail;    /* sender: the parser passed the stream's end through opaque */
};

struct rdmax_ring;
struct rdmax_intake;
struct accept_state;

#define RDMAX_REASON_MAX 512

/*
 * One migration, one side: what the send and recv pipelines share. Created
 * and destroyed by the pipeline (send.c, recv.c); no process-wide state.
 */
struct rdmax_session {
    struct rdmax_opts o;                     /* set at create, read-only */
    const struct rdmax_transport_ops *tp;    /* set at create; auto: at connect/accept */
    struct rdmax_transport_opts topts;       /* set at create, read-only */
    struct rdmax_wire ctrl;                  /* control connection (conn set under mu) */
    struct rdmax_wire lane[RDMAX_LANES_MAX]; /* one connection per lane (conn set under mu) */
    unsigned nlanes;                         /* set by the handshake */
    struct rdmax_codec_config codec;         /* set by the handshake */
    uint64_t session_id;
    double t0; /* monotonic start, seconds */
    struct rdmax_counters c;
    _Atomic(const struct rdmax_lane_stats *) lane_stats[RDMAX_LANES_MAX];
    _Atomic bool finishing;     /* the end is acknowledged: the peer may go */
    bool auto_transport;        /* --transport auto: chosen at connect/accept */
    uint32_t features;          /* RDMAX_FEAT_*, from the options; set at start */
    uint64_t guest_ram;         /* sender: the guest's RAM from the stream (0: unknown) */
    uint8_t psk[RDMAX_PSK_MAX]; /* set at start, read-only */
    size_t psk_len;             /* 0: no --psk-file */

    /*
     * The sticky error (QEMU's QEMUFile error): the first one any thread
     * records wins; err is set after reason, so a reader that sees err
     * may read reason. Everything below is protected by mu unless marked.
     */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* broadcast on error, on FIN and as the farewell ends */
    _Atomic int err;   /* 0, or the first -errno (any thread may read) */
    char reason[RDMAX_REASON_MAX];
    bool err_from_peer; /* the peer's ERROR frame: it knows, no need to tell it */
    int err_fd;         /* eventfd, readable once err is set (poll with QEMU's fds) */
    int stop_fd;        /* eventfd, readable once the run ends: timer threads stop */
    int null_fd;        /* /dev/null, dup2'ed over QEMU's fds on error */
    struct rdmax_ring *rings[RDMAX_LANES_MAX + 1]; /* aborted on error */
    unsigned nrings;
    struct rdmax_intake *intake; /* aborted on error */
    bool fin_acked;              /* sender: the receiver's FIN_ACK came */
    bool reader_running;         /* the control reader runs (it drains on error) */
    bool reader_done;            /* ... and has returned */
    bool farewell_started, farewell_sent, farewell_done;
    pthread_t farewell, farewell_send;

    /* Threads the session starts (keep-alives, progress); joined by rdmax_session_stop. */
    pthread_t keepalive, lane_keepalive[RDMAX_LANES_MAX], progress;
    bool keepalive_started, progress_started;
    unsigned lane_keepalives;
    double prog_last_t;    /* progress thread only */
    uint64_t prog_last_in; /* progress thread only */

    /*
     * QEMU's further channels (multifd, postcopy preempt; unix front end
     * only), one connection each, so a channel QEMU's destination reads
     * slowly never holds up another (channels.c). Under mu unless marked.
     */
    struct rdmax_wire chan[RDMAX_CHAN_MAX]; /* conn set under mu */
    int chan_qemu_fd[RDMAX_CHAN_MAX];       /* QEMU's socket of channel k or -1: shut on error */
    /* Sender: channel k's page encoder counters, once it has one (channels.c). */
    _Atomic(const struct rdmax_lane_stats *) chan_stats[RDMAX_CHAN_MAX];
    bool peer_channels; /* receiver: the sender may open channels (set with the control conn) */
    bool chan_nocache;  /* channel page codecs have no cache (sender: always; receiver: peer's) */
    /* Receiver: channel k's connection is in (called from a handshake thread). */
    void (*on_channel)(void *arg, unsigned k);
    void *on_channel_arg;
    struct accept_state *late; /* receiver: still accepting channels after the lanes */
    pthread_t late_thread;
    bool late_started;
    _Atomic bool chan_closed; /* receiver: every channel ended, accept no more (any thread) */
};

/*
 * How far ahead of use the lanes' page caches are faulted in, all lanes
 * together: enough to keep first-touch faults off the page path, small
 * enough that a peer who announces a large cache and sends nothing does
 * not make this side touch it.
 */
#define POPULATE_AHEAD_TOTAL ((size_t)64 << 20)

double rdmax_now(void);

/*
 * pthread_cond_timedwait for at most `seconds` (> 0) from now: the waits
 * here re-check their condition, and a session error, in a loop.
 */
void rdmax_cond_wait_s(pthread_cond_t *cv, pthread_mutex_t *mu, double seconds);

/*
 * Set up s for one run with options o (copied): transport, timeouts, the
 * PSK, the error machinery. 0 or -errno; an error in the options (say, an
 * unreadable --psk-file) is recorded as the session's error, so run()
 * returns it with its reason.
 */
int rdmax_session_init(struct rdmax_session *s, const struct rdmax_opts *o);
/* Free what init and the run allocated. Every thread of s has ended. */
void rdmax_session_destroy(struct rdmax_session *s);

/*
 * Record an error: the first caller's err (-errno) and reason win, later
 * ones are ignored. Wakes every waiter: QEMU's fds go to /dev/null (QEMU
 * notices at once), the registered rings and intake are aborted, every
 * lane connection is shut down, err_fd and stop_fd turn readable, FIN
 * waits end; and the farewell starts: an ERROR frame with the reason to
 * the peer on the control connection, best effort, and at most ~1 s later
 * the control connection is shut down too. Returns the session's error
 * (the first one), so callers can `return rdmax_session_error(...)`.
 * Callable from any thread.
 */
__attribute__((format(printf, 3, 4))) int rdmax_session_error(struct rdmax_session *s, int err,
                                                              const char *fmt, ...);
/* The same, for an ERROR frame the peer sent (no ERROR goes back). */
__attribute__((format(printf, 3, 4))) int rdmax_session_peer_error(struct rdmax_session *s, int err,
                                                                   const char *fmt, ...);

/* The sticky error: 0 or -errno. Cheap, any thread. */
static inline int rdmax_session_failed(struct rdmax_session *s)
{
    return atomic_load_explicit(&s->err, memory_order_acquire);
}
/* Its reason ("" while none); valid until destroy once failed. */
const char *rdmax_session_reason(struct rdmax_session *s);

/* Abort r / in too when the session fails (at once if it already has). */
void rdmax_session_add_ring(struct rdmax_session *s, struct rdmax_ring *r);
void rdmax_session_set_intake(struct rdmax_session *s, struct rdmax_intake *in);

/*
 * The control reader: call start before creating it (false: the session
 * failed already, do not start it) and done as it returns. While the
 * session has failed, the reader keeps reading and dropping frames until
 * the peer closes (the farewell's drain: see session.c) or the farewell
 * cuts the connection.
 */
bool rdmax_session_reader_start(struct rdmax_session *s);
void rdmax_session_reader_done(struct rdmax_session *s);

/*
 * End of a run, either way: stop the timer threads (keep-alives,
 * progress) and join them; on error also wait for the farewell to end
 * (bounded) and shut every connection down. The run's own threads must
 * still be joined by the caller afterwards (they are all woken by then).
 */
void rdmax_session_stop(struct rdmax_session *s);
/* Shut every connection down (wakes its threads). */
void rdmax_session_shutdown_all(struct rdmax_session *s);

/*
 * The one exit path, after run() returned r: on error print
 * "rdma-x: error: REASON" on stderr, then (either way) the --progress line
 * and --stats-json ("ok" or the reason). Returns the exit status, 0 or 1.
 */
int rdmax_session_finish(struct rdmax_session *s, int r);

/* Map a wire/transport -errno to words for a reason. */
const char *rdmax_wire_strerror(int err);

/* The words for err on c: the transport's own reason when it gave one. */
const char *rdmax_conn_strerror(const struct rdmax_conn *c, int err);

/*
 * Sender: connect control then every lane, with the handshake. 0 or
 * -errno; the reason is the session's error (rdmax_session_reason).
 */
int rdmax_session_connect(struct rdmax_session *s);
/*
 * Receiver: accept one migration (control + lanes); refuse everything else. As connect.
 * When the sender announced QEMU channels, accepting goes on in the
 * background for their connections (on_channel is called for each) until
 * chan_closed is set or the run stops.
 */
int rdmax_session_accept(struct rdmax_session *s);

/* Sender: connect QEMU channel k (its own connection, s->chan[k]). 0 or the session's error. */
int rdmax_session_connect_channel(struct rdmax_session *s, unsigned k);

/*
 * Sender: connect disk connection k to the receiver into w, with its own
 * handshake. s is a session of its own (disks.c makes one per disk
 * connection: a disk outlives migrations); its error state is not touched.
 * 0, or -errno with the reason in err.
 */
int rdmax_session_connect_disk(struct rdmax_session *s, struct rdmax_wire *w, unsigned k,
                               char *err, size_t err_len);

/*
 * QEMU's socket of channel k: shut down at once (both ways) if the session
 * fails, so QEMU sees the failure on every channel. Add returns the
 * session's error (fd shut already) if it failed before; drop before
 * closing fd.
 */
int rdmax_session_add_qemu_fd(struct rdmax_session *s, unsigned k, int fd);
void rdmax_session_drop_qemu_fd(struct rdmax_session *s, unsigned k);

/*
 * Route glib log messages (the transports' warnings) to stderr as
 * "rdma-x: warning: ..."; quiet while probing a transport that may be
 * absent (log.c: glib's handler is per process by nature).
 */
void rdmax_log_init(void);
void rdmax_log_quiet(bool quiet);

/*
 * Keep-alives (every second, or --timeout / 4) on the control connection,
 * both ways, and from the sender on every lane. Joined by rdmax_session_stop.
 */
void rdmax_keepalive_start(struct rdmax_session *s);

/* Stats (stats.c). */
void rdmax_stats_write(struct rdmax_session *s, const char *result);
/* The same figures as one JSON object on f (rdma-x status, status.c); any thread while s runs. */
void rdmax_stats_json(struct rdmax_session *s, FILE *f, const char *result);
/* One line of the same: bytes, ratio, pages, tier mix (rdma-x status). */
void rdmax_stats_summary(struct rdmax_session *s, FILE *f);
/* s as a JSON string, quoted and escaped. */
void rdmax_json_string(FILE *f, const char *s);
/* Bytes of QEMU's stream and its further channels so far. */
uint64_t rdmax_stats_qemu_bytes(struct rdmax_session *s);
void rdmax_progress_start(struct rdmax_session *s);
void rdmax_progress_final(struct rdmax_session *s);

/* Wait until fd is ready for events (POLLIN / POLLOUT) or the session failed: 0 or its error. */
int rdmax_session_wait_fd(struct rdmax_session *s, int fd, short events);

#endif
