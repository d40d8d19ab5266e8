/*
 * What both sides share: options, the connections of one migration, the
 * handshake, keep-alives, and the one way out on failure.
 */
#ifndef RDMAX_SESSION_H
#define RDMAX_SESSION_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "crypt.h"
#include "lane-codec.h"
#include "sanitize.h"
#include "wire.h"

struct rdmax_opts {
    bool sender;
    const char *addr;       /* --to / --listen */
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
    const char *psk_file;   /* --psk-file: mutual authentication */
    bool encrypt;           /* --encrypt: AES-256-GCM frames (needs a PSK) */
    uint64_t cache_max;     /* recv --cache-max: cap on lanes x cache, 0 = default */
};

/* Counters: written by the data threads, read by stats/progress (relaxed). */
struct rdmax_counters {
    _Atomic uint64_t bytes_in;   /* QEMU stream bytes (sender: read, receiver: written) */
    _Atomic uint64_t pages;      /* page payloads carried in lanes */
    _Atomic uint64_t ctrl_bytes; /* control bytes (stream minus page payloads) */
    _Atomic uint64_t rp_bytes;   /* return-path bytes relayed */
    _Atomic uint64_t zero_pages; /* QEMU ZERO records seen */
};

struct rdmax_session {
    struct rdmax_opts o;                     /* set at start, read-only */
    const struct rdmax_transport_ops *tp;    /* set at start, read-only */
    struct rdmax_transport_opts topts;       /* set at start, read-only */
    struct rdmax_wire ctrl;                  /* control connection */
    struct rdmax_wire lane[RDMAX_LANES_MAX]; /* one connection per lane */
    unsigned nlanes;                         /* set by the handshake */
    struct rdmax_codec_config codec;         /* set by the handshake */
    uint64_t session_id;
    double t0; /* monotonic start, seconds */
    struct rdmax_counters c;
    _Atomic(const struct rdmax_lane_stats *) lane_stats[RDMAX_LANES_MAX];
    _Atomic bool finishing;     /* the end is acknowledged: the peer may go */
    bool auto_transport;        /* --transport auto: chosen at connect/accept */
    uint32_t features;          /* RDMAX_FEAT_*, from the options; set at start */
    uint8_t psk[RDMAX_PSK_MAX]; /* set at start, read-only */
    size_t psk_len;             /* 0: no --psk-file */
};

extern struct rdmax_session rdmax_s;

/*
 * How far ahead of use the lanes' page caches are faulted in, all lanes
 * together: enough to keep first-touch faults off the page path, small
 * enough that a peer who announces a large cache and sends nothing does
 * not make this side touch it.
 */
#define POPULATE_AHEAD_TOTAL ((size_t)64 << 20)

double rdmax_now(void);

/*
 * Fail the migration: print "rdma-x: error: <reason>", close the QEMU side
 * at once (so QEMU notices), write the stats, tell the peer, exit 1.
 * Callable from any thread; the first caller wins.
 */
__attribute__((noreturn, format(printf, 1, 2))) void rdmax_fail(const char *fmt, ...);

/* Map a wire/transport -errno to words for rdmax_fail. */
const char *rdmax_wire_strerror(int err);

/* Sender: connect control then every lane, with the handshake. */
void rdmax_session_connect(void);
/* Receiver: accept one migration (control + lanes); refuse everything else. */
void rdmax_session_accept(void);

/* Load the --psk-file key and set the feature bits; fails the run on error. */
void rdmax_session_init(void);

/*
 * Route glib log messages (the transports' warnings) to stderr as
 * "rdma-x: warning: ..."; quiet while probing a transport that may be absent.
 */
void rdmax_log_init(void);
void rdmax_log_quiet(bool quiet);

/*
 * Keep-alives (every second, or --timeout / 4) on the control connection,
 * both ways, and from the sender on every lane.
 */
void rdmax_keepalive_start(void);

/* Stats (stats.c). */
void rdmax_stats_write(const char *result);
void rdmax_progress_start(void);
void rdmax_progress_final(void);

#endif
