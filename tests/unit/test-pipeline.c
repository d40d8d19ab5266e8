/*
 * The send and recv pipelines as objects, in one process: a recv object
 * listening on 127.0.0.1, its output into a pipe; a send object fed from
 * a pipe; each run() in its own thread, over the real TCP transport.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zstd.h>

#include "recv.h"
#include "send.h"
#include "stream-file.h"

static int free_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    cr_assert_geq(fd, 0);
    cr_assert_eq(bind(fd, (struct sockaddr *)&a, sizeof(a)), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&a, &al), 0);
    close(fd);
    return ntohs(a.sin_port);
}

/* One migration in this process: both pipelines and QEMU's four pipe ends. */
struct mig {
    char addr[64];
    struct rdmax_send *snd;
    struct rdmax_recv *rcv;
    pthread_t ts, tr, tfeed, tdrain;
    int rs, rr;
    int in_w;  /* we write the source stream here (send's qemu_in is the other end) */
    int out_r; /* we read the destination stream here (recv's qemu_out is the other end) */
    int send_in, send_out, recv_in, recv_out; /* the pipelines' ends, closed at the end */
    const uint8_t *stream;                    /* what to feed */
    size_t len;
    const uint8_t *want; /* what must come out, or NULL */
    size_t want_len;
    size_t cut_after;   /* close out_r after this many bytes (0: never) */
    size_t stall_after; /* stop writing (pipe left open) after this many bytes (0: never) */
    bool rp_open;       /* the destination QEMU keeps its return path open throughout */
    int rp_w;
    size_t got; /* bytes read from out_r */
    bool same;  /* every byte read equals want */
};

static struct rdmax_opts opts(bool sender, const char *addr, int in, int out)
{
    struct rdmax_opts o = {
        .sender = sender,
        .addr = addr,
        .lanes = sender ? 2 : 0,
        .transport = "tcp",
        .timeout_ms = 5000,
        .connect_timeout_ms = 10000,
        .cache_bytes = UINT64_MAX, /* from the stream's RAM size */
        .qemu_in = in,
        .qemu_out = out,
    };
    return o;
}

static void *send_main(void *arg)
{
    struct mig *m = arg;

    m->rs = rdmax_send_run(m->snd);
    return NULL;
}

static void *recv_main(void *arg)
{
    struct mig *m = arg;

    m->rr = rdmax_recv_run(m->rcv);
    return NULL;
}

/* Source QEMU: writes the stream, then closes it (a failed sender closes its end first). */
static void *feed_main(void *arg)
{
    struct mig *m = arg;
    size_t off = 0;

    while (off < m->len) {
        if (m->stall_after && off >= m->stall_after) {
            return NULL; /* a stalled QEMU: the pipe stays open until the runs returned */
        }
        ssize_t n = write(m->in_w, m->stream + off, m->len - off < 65536 ? m->len - off : 65536);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        off += (size_t)n;
    }
    close(m->in_w);
    return NULL;
}

/* Destination QEMU: reads and compares; with cut_after, closes its end mid-stream. */
static void *drain_main(void *arg)
{
    struct mig *m = arg;
    uint8_t buf[65536];

    m->same = true;
    for (;;) {
        ssize_t n = read(m->out_r, buf, sizeof(buf));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        if (m->want &&
            (m->got + (size_t)n > m->want_len || memcmp(buf, m->want + m->got, (size_t)n))) {
            m->same = false;
        }
        m->got += (size_t)n;
        if (m->cut_after && m->got >= m->cut_after) {
            break;
        }
    }
    close(m->out_r);
    return NULL;
}

static void mig_run(struct mig *m)
{
    int in[2], out[2], rp[2], null = open("/dev/null", O_RDWR);
    struct rdmax_opts ro, so;

    signal(SIGPIPE, SIG_IGN);
    cr_assert_geq(null, 0);
    cr_assert_eq(pipe(in), 0);
    cr_assert_eq(pipe(out), 0);
    cr_assert_eq(pipe(rp), 0);
    m->rp_w = rp[1];
    if (!m->rp_open) {
        close(rp[1]); /* the destination QEMU sends nothing back */
        m->rp_w = -1;
    }
    snprintf(m->addr, sizeof(m->addr), "127.0.0.1:%d", free_port());
    m->in_w = in[1];
    m->out_r = out[0];
    m->send_in = in[0];
    m->send_out = null;
    m->recv_in = rp[0];
    m->recv_out = out[1];
    ro = opts(false, m->addr, m->recv_in, m->recv_out);
    so = opts(true, m->addr, m->send_in, m->send_out);
    cr_assert_eq(rdmax_recv_create(&ro, &m->rcv), 0);
    cr_assert_eq(rdmax_send_create(&so, &m->snd), 0);
    pthread_create(&m->tdrain, NULL, drain_main, m);
    pthread_create(&m->tr, NULL, recv_main, m);
    pthread_create(&m->tfeed, NULL, feed_main, m);
    pthread_create(&m->ts, NULL, send_main, m);
    pthread_join(m->ts, NULL);
    pthread_join(m->tr, NULL);
    /* Both runs returned: they hold none of QEMU's pipes any more. */
    close(m->send_in);
    close(m->recv_out);
    m->send_in = m->recv_out = -1;
    pthread_join(m->tfeed, NULL);
    if (m->stall_after) {
        close(m->in_w);
    }
    if (m->rp_w >= 0) {
        close(m->rp_w);
    }
    pthread_join(m->tdrain, NULL);
}

static void mig_end(struct mig *m)
{
    rdmax_send_destroy(m->snd);
    rdmax_recv_destroy(m->rcv);
    close(m->send_out);
    close(m->recv_in);
}

static const char *reason_send(struct mig *m)
{
    return rdmax_session_reason(rdmax_send_session(m->snd));
}

static const char *reason_recv(struct mig *m)
{
    return rdmax_session_reason(rdmax_recv_session(m->rcv));
}

static uint8_t *capture(size_t *len)
{
    const char *dir = getenv("RDMAX_TESTDATA");
    char path[4096];
    uint8_t *data;

    snprintf(path, sizeof(path), "%s/qemu-10.0/pc-10.0-linux-dirty.bin.zst", dir ? dir : ".");
    data = load_stream(path, len);
    if (!data) {
        cr_skip_test("no QEMU capture at %s", path);
    }
    return data;
}

Test(pipeline, a_qemu_stream_round_trips_byte_identical, .timeout = 120)
{
    struct mig m = {0};
    size_t len;
    uint8_t *data = capture(&len);

    m.stream = m.want = data;
    m.len = m.want_len = len;
    mig_run(&m);
    cr_assert_eq(m.rs, 0, "send: %s", reason_send(&m));
    cr_assert_eq(m.rr, 0, "recv: %s", reason_recv(&m));
    cr_assert_eq(m.got, len, "%zu of %zu bytes came out", m.got, len);
    cr_assert(m.same, "the stream came out different");
    mig_end(&m);
    free(data);
}

Test(pipeline, destination_closing_mid_stream_fails_both_with_its_reason, .timeout = 60)
{
    struct mig m = {0};
    size_t len;
    uint8_t *data = capture(&len);

    m.stream = data;
    m.len = len;
    m.cut_after = 8u << 20;
    m.rp_open = true; /* recv's return-path thread sits in a read of it: run() must still return */
    mig_run(&m);
    cr_assert_lt(m.rr, 0, "recv returned %d", m.rr);
    cr_assert_lt(m.rs, 0, "send returned %d", m.rs);
    cr_assert(strstr(reason_recv(&m), "destination QEMU closed the stream"), "recv: %s",
              reason_recv(&m));
    /* The ERROR frame arrived: the sender says what the receiver said. */
    cr_assert(strstr(reason_send(&m), "receiver: ") == reason_send(&m) &&
                  strstr(reason_send(&m), reason_recv(&m)),
              "send: %s / recv: %s", reason_send(&m), reason_recv(&m));
    mig_end(&m);
    free(data);
}

Test(pipeline, a_corrupt_stream_fails_both_with_the_parsers_reason, .timeout = 60)
{
    struct mig m = {0};
    size_t len = 1u << 20;
    uint8_t *data = malloc(len);
    uint64_t x = 0x9e3779b97f4a7c15ull;

    /*
     * QEMU's header (magic "QEVM", version 3), then garbage: the parser
     * carries what it does not understand as opaque bytes (so some may
     * reach the destination, as the source wrote them), and fails at the
     * end, where no end-of-stream marker came.
     */
    memcpy(data, "QEVM\0\0\0\3", 8);
    for (size_t i = 8; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data[i] = (uint8_t)x;
    }
    m.stream = data;
    m.len = len;
    m.rp_open = true;
    mig_run(&m);
    cr_assert_lt(m.rs, 0, "send returned %d", m.rs);
    cr_assert_lt(m.rr, 0, "recv returned %d", m.rr);
    cr_assert(strstr(reason_send(&m), "bad migration stream"), "send: %s", reason_send(&m));
    cr_assert(strstr(reason_recv(&m), "sender: ") == reason_recv(&m) &&
                  strstr(reason_recv(&m), reason_send(&m)),
              "recv: %s / send: %s", reason_recv(&m), reason_send(&m));
    mig_end(&m);
    free(data);
}

Test(pipeline, a_sender_waiting_on_a_stalled_qemu_still_ends_with_the_receivers_error,
     .timeout = 60)
{
    struct mig m = {0};
    size_t len;
    uint8_t *data = capture(&len);

    m.stream = data;
    m.len = len;
    m.stall_after = 16u << 20; /* then the source QEMU writes nothing, pipe open */
    m.cut_after = 1;           /* the destination QEMU goes away at its first bytes */
    m.rp_open = true;
    mig_run(&m);
    cr_assert_lt(m.rr, 0, "recv returned %d", m.rr);
    cr_assert_lt(m.rs, 0, "send returned %d", m.rs);
    cr_assert(strstr(reason_send(&m), "receiver: destination QEMU closed the stream"), "send: %s",
              reason_send(&m));
    mig_end(&m);
    free(data);
}
