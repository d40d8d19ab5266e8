/*
 * rdmax-xfer: drives a transport through its ops table only, the way the
 * wire layer does (one send() per frame, recv() of exact byte counts), to
 * test and measure tcp and rdma without the rest of rdma-x.
 *
 *   rdmax-xfer recv --listen HOST:PORT [--conns N] [--out FILE] [--echo]
 *   rdmax-xfer send --to HOST:PORT [--conns N] [--in FILE | --bytes N]
 *                   [--frame BYTES] [--echo]
 *   common: [--transport rdma|tcp] [--busy-poll] [--pinned-max BYTES]
 *           [--timeout MS] [--json]
 *
 * Frames: a 16-byte header (magic, type, length, sequence; big-endian), then
 * the payload. The sender streams DATA frames on each of N connections
 * (one thread each), then END; the receiver answers END with a SUMMARY
 * carrying the byte count and a 64-bit hash of everything it received, which
 * the sender checks against its own. --in/--out carry a file byte-exactly
 * (N = 1). --echo makes the receiver send every DATA frame back, which the
 * sender reads and checks in a second thread: both directions of one
 * connection busy at once. --no-check leaves out the hash (the byte count is
 * still checked), to measure the transport rather than the hash under TCG.
 * A sender exits 1 with "rdmax-xfer: error: ..."
 * when the receiver goes away.
 *
 * Output (sender): one line per run (MBps = 10^6 B/s, MiBps = 2^20 B/s, the
 * unit of perftest's "MB/sec"), or the same as JSON with --json:
 *   XFER transport=rdma conns=1 frame=1048576 echo=0 busy_poll=0 bytes=...
 *        secs=... MBps=... MiBps=... check=ok
 */
#include "config.h"
#include "transport.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define XFER_MAGIC 0x58465231u /* "XFR1" */
#define XFER_HDR 16u
#define XFER_FRAME_MAX (64u * 1024 * 1024)
#define XFER_CONNS_MAX 64

enum xfer_type {
    XFER_DATA = 1,
    XFER_END = 2,
    XFER_SUMMARY = 3,
    XFER_DATA_NOCHECK = 4, /* DATA without the hash (--no-check) */
};

struct xfer_opts {
    const char *transport;
    char host[256];
    char port[16];
    int conns;
    const char *in;
    const char *out;
    uint64_t bytes;
    size_t frame;
    bool echo;
    bool nocheck;
    bool json;
    int timeout_ms;
    struct rdmax_transport_opts topts;
};

struct xfer_job {
    const struct xfer_opts *o;
    const struct rdmax_transport_ops *ops;
    struct rdmax_conn *c;
    int index;
    FILE *file;
    /* results */
    uint64_t bytes;
    uint64_t hash;
    uint64_t echo_bytes;
    uint64_t echo_hash;
    int rc;
    char err[256];
};

static double xfer_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void xfer_put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = v >> 16;
    p[2] = v >> 8;
    p[3] = v;
}

static uint32_t xfer_get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void xfer_put64(uint8_t *p, uint64_t v)
{
    xfer_put32(p, (uint32_t)(v >> 32));
    xfer_put32(p + 4, (uint32_t)v);
}

static uint64_t xfer_get64(const uint8_t *p)
{
    return (uint64_t)xfer_get32(p) << 32 | xfer_get32(p + 4);
}

/* A cheap running hash, 8 bytes at a time (the guest runs under TCG). */
static uint64_t xfer_hash(uint64_t h, const uint8_t *p, size_t len)
{
    uint64_t w;

    for (; len >= 8; p += 8, len -= 8) {
        memcpy(&w, p, 8);
        h = (h ^ w) * 0x100000001b3ull;
        h ^= h >> 29;
    }
    for (; len; p++, len--) {
        h = (h ^ *p) * 0x100000001b3ull;
    }
    return h;
}

static int xfer_send_frame(struct xfer_job *j, uint32_t type, uint32_t seq, const void *p,
                           size_t len)
{
    uint8_t hdr[XFER_HDR];
    struct iovec iov[2] = {{hdr, sizeof(hdr)}, {(void *)p, len}};

    xfer_put32(hdr, XFER_MAGIC);
    xfer_put32(hdr + 4, type);
    xfer_put32(hdr + 8, (uint32_t)len);
    xfer_put32(hdr + 12, seq);
    return j->ops->send(j->c, iov, len ? 2 : 1);
}

/* Reads one frame header; payload length in *len. */
static int xfer_recv_hdr(struct xfer_job *j, uint32_t *type, uint32_t *len, int timeout_ms)
{
    uint8_t hdr[XFER_HDR];
    int r = j->ops->recv(j->c, hdr, sizeof(hdr), timeout_ms);

    if (r < 0) {
        return r;
    }
    if (xfer_get32(hdr) != XFER_MAGIC) {
        snprintf(j->err, sizeof(j->err), "bad frame magic 0x%08x", xfer_get32(hdr));
        return -EBADMSG;
    }
    *type = xfer_get32(hdr + 4);
    *len = xfer_get32(hdr + 8);
    if (*len > XFER_FRAME_MAX) {
        snprintf(j->err, sizeof(j->err), "frame of %u bytes too large", *len);
        return -EBADMSG;
    }
    return 0;
}

static void xfer_fail(struct xfer_job *j, const char *what, int r)
{
    j->rc = r;
    if (!j->err[0]) {
        snprintf(j->err, sizeof(j->err), "%s: %s", what,
                 j->c && j->c->why[0] ? j->c->why : strerror(-r));
    }
}

/* ---- receiver ---------------------------------------------------------------- */

static void *xfer_serve(void *arg)
{
    struct xfer_job *j = arg;
    uint8_t *buf = malloc(XFER_FRAME_MAX);
    uint8_t sum[16];
    uint32_t type, len, seq = 0;
    int r;

    if (!buf) {
        xfer_fail(j, "malloc", -ENOMEM);
        return NULL;
    }
    j->hash = 0xcbf29ce484222325ull;
    for (;;) {
        r = xfer_recv_hdr(j, &type, &len, j->o->timeout_ms);
        if (r < 0) {
            xfer_fail(j, "recv header", r);
            break;
        }
        r = len ? j->ops->recv(j->c, buf, len, j->o->timeout_ms) : 0;
        if (r < 0) {
            xfer_fail(j, "recv payload", r);
            break;
        }
        if (type == XFER_END) {
            xfer_put64(sum, j->bytes);
            xfer_put64(sum + 8, j->hash);
            r = xfer_send_frame(j, XFER_SUMMARY, seq, sum, sizeof(sum));
            if (r < 0) {
                xfer_fail(j, "send summary", r);
            }
            break;
        }
        if (type != XFER_DATA && type != XFER_DATA_NOCHECK) {
            snprintf(j->err, sizeof(j->err), "unexpected frame type %u", type);
            j->rc = -EBADMSG;
            break;
        }
        j->bytes += len;
        if (type == XFER_DATA) {
            j->hash = xfer_hash(j->hash, buf, len);
        }
        if (j->file && fwrite(buf, 1, len, j->file) != len) {
            xfer_fail(j, "write output", -EIO);
            break;
        }
        if (j->o->echo) {
            r = xfer_send_frame(j, type, seq, buf, len);
            if (r < 0) {
                xfer_fail(j, "send echo", r);
                break;
            }
        }
        seq++;
    }
    free(buf);
    return NULL;
}

static int xfer_recv_main(struct xfer_opts *o, const struct rdmax_transport_ops *ops)
{
    struct rdmax_listener *l;
    struct xfer_job jobs[XFER_CONNS_MAX];
    pthread_t th[XFER_CONNS_MAX];
    uint64_t total = 0;
    double t0 = 0, t1;
    int r, failed = 0;

    memset(jobs, 0, sizeof(jobs));
    r = ops->listen(o->host, o->port, &o->topts, &l);
    if (r < 0) {
        fprintf(stderr, "rdmax-xfer: error: listen %s:%s: %s\n", o->host, o->port, strerror(-r));
        return 1;
    }
    fprintf(stderr, "rdmax-xfer: listening on %s:%s (%s)\n", o->host, o->port, ops->name);
    for (int i = 0; i < o->conns; i++) {
        jobs[i].o = o;
        jobs[i].ops = ops;
        jobs[i].index = i;
        r = ops->accept(l, -1, &jobs[i].c);
        if (r == -ECONNABORTED) {
            /* One client turned away; the listener goes on, as rdma-x recv's does. */
            fprintf(stderr, "rdmax-xfer: note: accept: %s\n", l->why);
            i--;
            continue;
        }
        if (r < 0) {
            fprintf(stderr, "rdmax-xfer: error: accept: %s\n", l->why[0] ? l->why : strerror(-r));
            return 1;
        }
        if (i == 0) {
            t0 = xfer_now();
        }
        if (o->out && i == 0) {
            jobs[i].file = strcmp(o->out, "-") ? fopen(o->out, "wb") : stdout;
            if (!jobs[i].file) {
                fprintf(stderr, "rdmax-xfer: error: %s: %s\n", o->out, strerror(errno));
                return 1;
            }
        }
        pthread_create(&th[i], NULL, xfer_serve, &jobs[i]);
    }
    for (int i = 0; i < o->conns; i++) {
        pthread_join(th[i], NULL);
        total += jobs[i].bytes;
        if (jobs[i].rc) {
            failed = 1;
            fprintf(stderr, "rdmax-xfer: error: connection %d (%s): %s\n", i, jobs[i].c->peer,
                    jobs[i].err);
        }
        if (jobs[i].file && jobs[i].file != stdout && fclose(jobs[i].file) != 0) {
            failed = 1;
            fprintf(stderr, "rdmax-xfer: error: %s: %s\n", o->out, strerror(errno));
        }
        if (jobs[i].file == stdout) {
            fflush(stdout);
        }
        ops->close(jobs[i].c);
    }
    t1 = xfer_now();
    ops->listener_close(l);
    fprintf(stderr, "rdmax-xfer: received %" PRIu64 " bytes in %.3f s (%.1f MB/s)%s\n", total,
            t1 - t0, total / (t1 - t0) / 1e6, failed ? ", FAILED" : "");
    return failed;
}

/* ---- sender ------------------------------------------------------------------ */

static void *xfer_echo_reader(void *arg)
{
    struct xfer_job *j = arg;
    uint8_t *buf = malloc(XFER_FRAME_MAX);
    uint32_t type, len;
    int r;

    j->echo_hash = 0xcbf29ce484222325ull;
    if (!buf) {
        xfer_fail(j, "malloc", -ENOMEM);
        return NULL;
    }
    for (;;) {
        /* Without echo nothing comes until the summary: wait as long as it takes. */
        r = xfer_recv_hdr(j, &type, &len, j->o->echo ? j->o->timeout_ms : -1);
        if (r == 0 && len) {
            r = j->ops->recv(j->c, buf, len, j->o->timeout_ms);
        }
        if (r < 0) {
            xfer_fail(j, "recv echo", r);
            break;
        }
        if (type == XFER_SUMMARY) {
            if (len != 16) {
                snprintf(j->err, sizeof(j->err), "bad summary");
                j->rc = -EBADMSG;
            } else if (xfer_get64(buf) != j->bytes ||
                       (!j->o->nocheck && xfer_get64(buf + 8) != j->hash)) {
                snprintf(j->err, sizeof(j->err),
                         "receiver got %" PRIu64 " bytes hash %016" PRIx64 ", sent %" PRIu64
                         " hash %016" PRIx64,
                         xfer_get64(buf), xfer_get64(buf + 8), j->bytes, j->hash);
                j->rc = -EBADMSG;
            }
            break;
        }
        j->echo_bytes += len;
        if (!j->o->nocheck) {
            j->echo_hash = xfer_hash(j->echo_hash, buf, len);
        }
    }
    free(buf);
    return NULL;
}

static void *xfer_stream(void *arg)
{
    struct xfer_job *j = arg;
    const struct xfer_opts *o = j->o;
    uint8_t *buf = malloc(o->frame);
    uint64_t x = 0x9e3779b97f4a7c15ull * (j->index + 1), left = o->bytes;
    bool forever = !o->in && o->bytes == 0;
    pthread_t reader;
    uint32_t seq = 0;
    size_t len;
    int r = 0;

    j->hash = 0xcbf29ce484222325ull;
    if (!buf) {
        xfer_fail(j, "malloc", -ENOMEM);
        return NULL;
    }
    for (size_t i = 0; i + 8 <= o->frame; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(buf + i, &x, 8);
    }
    pthread_create(&reader, NULL, xfer_echo_reader, j);
    for (;;) {
        if (j->file) {
            len = fread(buf, 1, o->frame, j->file);
            if (len == 0) {
                if (ferror(j->file)) {
                    xfer_fail(j, "read input", -EIO);
                    r = -EIO;
                }
                break;
            }
        } else {
            if (!forever && left == 0) {
                break;
            }
            len = forever || left > o->frame ? o->frame : left;
            memcpy(buf, &seq, sizeof(seq) < len ? sizeof(seq) : len);
        }
        if (!o->nocheck) {
            j->hash = xfer_hash(j->hash, buf, len);
        }
        r = xfer_send_frame(j, o->nocheck ? XFER_DATA_NOCHECK : XFER_DATA, seq++, buf, len);
        if (r < 0) {
            xfer_fail(j, "send", r);
            break;
        }
        j->bytes += len;
        left -= forever ? 0 : len;
    }
    if (r == 0) {
        r = xfer_send_frame(j, XFER_END, seq, NULL, 0);
        if (r < 0) {
            xfer_fail(j, "send end", r);
        }
    }
    if (r < 0) {
        j->ops->shutdown(j->c); /* wakes the reader */
    }
    pthread_join(reader, NULL);
    if (j->rc == 0 && o->echo && (j->echo_bytes != j->bytes || j->echo_hash != j->hash)) {
        snprintf(j->err, sizeof(j->err), "echo came back as %" PRIu64 " bytes, sent %" PRIu64,
                 j->echo_bytes, j->bytes);
        j->rc = -EBADMSG;
    }
    free(buf);
    return NULL;
}

static int xfer_send_main(struct xfer_opts *o, const struct rdmax_transport_ops *ops)
{
    struct xfer_job jobs[XFER_CONNS_MAX];
    pthread_t th[XFER_CONNS_MAX];
    uint64_t total = 0;
    double t0, t1;
    int r, failed = 0;

    memset(jobs, 0, sizeof(jobs));
    for (int i = 0; i < o->conns; i++) {
        jobs[i].o = o;
        jobs[i].ops = ops;
        jobs[i].index = i;
        r = ops->connect(o->host, o->port, &o->topts, &jobs[i].c);
        if (r < 0) {
            fprintf(stderr, "rdmax-xfer: error: connect %s:%s: %s\n", o->host, o->port,
                    strerror(-r));
            return 1;
        }
    }
    if (o->in) {
        jobs[0].file = strcmp(o->in, "-") ? fopen(o->in, "rb") : stdin;
        if (!jobs[0].file) {
            fprintf(stderr, "rdmax-xfer: error: %s: %s\n", o->in, strerror(errno));
            return 1;
        }
    }
    t0 = xfer_now();
    for (int i = 0; i < o->conns; i++) {
        pthread_create(&th[i], NULL, xfer_stream, &jobs[i]);
    }
    for (int i = 0; i < o->conns; i++) {
        pthread_join(th[i], NULL);
        total += jobs[i].bytes;
        if (jobs[i].rc) {
            failed = 1;
            fprintf(stderr, "rdmax-xfer: error: connection %d: %s\n", i, jobs[i].err);
        }
    }
    t1 = xfer_now();
    for (int i = 0; i < o->conns; i++) {
        ops->close(jobs[i].c);
    }
    if (jobs[0].file && jobs[0].file != stdin) {
        fclose(jobs[0].file);
    }
    if (o->json) {
        printf("{\"transport\":\"%s\",\"conns\":%d,\"frame\":%zu,\"echo\":%s,\"busy_poll\":%s,"
               "\"bytes\":%" PRIu64 ",\"secs\":%.3f,\"MBps\":%.1f,\"MiBps\":%.1f,"
               "\"check\":\"%s\"}\n",
               ops->name, o->conns, o->frame, o->echo ? "true" : "false",
               o->topts.busy_poll ? "true" : "false", total, t1 - t0, total / (t1 - t0) / 1e6,
               total / (t1 - t0) / 1048576.0, failed ? "FAILED" : "ok");
    } else {
        printf("XFER transport=%s conns=%d frame=%zu echo=%d busy_poll=%d hash=%d bytes=%" PRIu64
               " secs=%.3f MBps=%.1f MiBps=%.1f check=%s\n",
               ops->name, o->conns, o->frame, o->echo, o->topts.busy_poll, !o->nocheck, total,
               t1 - t0, total / (t1 - t0) / 1e6, total / (t1 - t0) / 1048576.0,
               failed ? "FAILED" : "ok");
    }
    fflush(stdout);
    return failed;
}

/* ---- main -------------------------------------------------------------------- */

static uint64_t xfer_size(const char *s)
{
    char *end;
    uint64_t v = strtoull(s, &end, 0);

    switch (*end) {
    case 'k':
    case 'K':
        return v << 10;
    case 'm':
    case 'M':
        return v << 20;
    case 'g':
    case 'G':
        return v << 30;
    default:
        return v;
    }
}

static void xfer_usage(FILE *f)
{
    fprintf(f, "Usage: rdmax-xfer recv --listen HOST:PORT [--conns N] [--out FILE] [--echo]\n"
               "       rdmax-xfer send --to HOST:PORT [--conns N] [--in FILE | --bytes N]\n"
               "                       [--frame BYTES] [--echo] [--no-check]\n"
               "  common: [--transport rdma|tcp] [--busy-poll] [--pinned-max BYTES]\n"
               "          [--timeout MS] [--json]\n"
               "--bytes 0 without --in streams until the connection fails.\n");
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"listen", required_argument, NULL, 'l'},
        {"to", required_argument, NULL, 't'},
        {"transport", required_argument, NULL, 'T'},
        {"conns", required_argument, NULL, 'n'},
        {"in", required_argument, NULL, 'i'},
        {"out", required_argument, NULL, 'o'},
        {"bytes", required_argument, NULL, 'b'},
        {"frame", required_argument, NULL, 'f'},
        {"echo", no_argument, NULL, 'e'},
        {"busy-poll", no_argument, NULL, 'p'},
        {"pinned-max", required_argument, NULL, 'm'},
        {"timeout", required_argument, NULL, 'w'},
        {"json", no_argument, NULL, 'j'},
        {"help", no_argument, NULL, 'h'},
        {"no-check", no_argument, NULL, 'N'},
        {NULL, 0, NULL, 0},
    };
    struct xfer_opts o = {
        .transport = "rdma",
        .conns = 1,
        .bytes = 256u << 20,
        .frame = 1u << 20,
        .timeout_ms = 10000,
        .topts = {.connect_timeout_ms = 10000},
    };
    const struct rdmax_transport_ops *ops;
    const char *addr = NULL, *mode;
    char err[160];
    int c;

    if (argc < 2 || (strcmp(argv[1], "send") && strcmp(argv[1], "recv"))) {
        xfer_usage(argc < 2 ? stderr : stdout);
        return argc < 2 || strcmp(argv[1], "--help") ? 2 : 0;
    }
    mode = argv[1];
    optind = 2;
    while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
        switch (c) {
        case 'l':
        case 't':
            addr = optarg;
            break;
        case 'T':
            o.transport = optarg;
            break;
        case 'n':
            o.conns = atoi(optarg);
            break;
        case 'i':
            o.in = optarg;
            break;
        case 'o':
            o.out = optarg;
            break;
        case 'b':
            o.bytes = xfer_size(optarg);
            break;
        case 'f':
            o.frame = (size_t)xfer_size(optarg);
            break;
        case 'e':
            o.echo = true;
            break;
        case 'p':
            o.topts.busy_poll = 1;
            break;
        case 'm':
            o.topts.pinned_max = (size_t)xfer_size(optarg);
            break;
        case 'w':
            o.timeout_ms = atoi(optarg);
            break;
        case 'j':
            o.json = true;
            break;
        case 'N':
            o.nocheck = true;
            break;
        case 'h':
            xfer_usage(stdout);
            return 0;
        default:
            xfer_usage(stderr);
            return 2;
        }
    }
    if (!addr || o.conns < 1 || o.conns > XFER_CONNS_MAX || o.frame < 1 ||
        o.frame > XFER_FRAME_MAX || ((o.in || o.out) && o.conns != 1)) {
        xfer_usage(stderr);
        return 2;
    }
    if (rdmax_addr_split(addr, o.host, sizeof(o.host), o.port, sizeof(o.port), err, sizeof(err)) <
        0) {
        fprintf(stderr, "rdmax-xfer: error: %s\n", err);
        return 2;
    }
    ops = rdmax_transport_find(o.transport);
    if (!ops) {
        fprintf(stderr, "rdmax-xfer: error: transport '%s' not built (have: %s)\n", o.transport,
                rdmax_transport_list());
        return 2;
    }
    return strcmp(mode, "send") == 0 ? xfer_send_main(&o, ops) : xfer_recv_main(&o, ops);
}
