/* rdma-x: entry point. */
#define _GNU_SOURCE
#include "config.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>

#include "cli.h"
#include "recv.h"
#include "send.h"
#include "session.h"
#include "transport.h"

static const struct rdmax_transport_ops *pick_transport(void)
{
    const char *t = rdmax_s.o.transport;

    if (strcmp(t, "auto") != 0) {
        return rdmax_transport_find(t);
    }
    /* auto: tcp unless session.c finds an RDMA path at connect/accept time. */
    rdmax_s.auto_transport = true;
    return rdmax_transport_find("tcp");
}

int main(int argc, char **argv)
{
    int r;

    if (argc < 2) {
        rdmax_cli_usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        rdmax_cli_usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        printf("rdma-x %s (wire protocol v%u; transports: %s)\n", RDMAX_VERSION, RDMAX_WIRE_VERSION,
               rdmax_transport_list());
        return 0;
    }
    if (strcmp(argv[1], "keygen") == 0) {
        return rdmax_cli_keygen(argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "send") != 0 && strcmp(argv[1], "recv") != 0) {
        fprintf(stderr, "rdma-x: error: unknown command '%s' (expected send, recv or keygen)\n",
                argv[1]);
        return 2;
    }
    r = rdmax_cli_parse(argc - 1, argv + 1, &rdmax_s.o);
    if (r != 0) {
        return r > 0 ? 0 : 2;
    }
    /* A closed peer or QEMU pipe is an error to report, not a signal to die of. */
    signal(SIGPIPE, SIG_IGN);
    /*
     * QEMU's pipe to or from us defaults to 64 KiB: with 1 MiB both sides
     * wake each other ~16x less often per byte. 1 MiB is ~9 ms of a
     * 1 Gbit/s link, so QEMU's bandwidth estimate stays honest. A file or
     * a socket simply refuses, which is fine.
     */
    fcntl(rdmax_s.o.sender ? STDIN_FILENO : STDOUT_FILENO, F_SETPIPE_SZ, 1 << 20);
    rdmax_log_init();
    rdmax_s.t0 = rdmax_now();
    rdmax_s.tp = pick_transport();
    rdmax_s.topts.connect_timeout_ms = rdmax_s.o.connect_timeout_ms;
    /*
     * TCP_USER_TIMEOUT: a send blocked on a dead path fails after this
     * instead of ~15 min of retransmissions. Defence in depth: rdma-x's own
     * keep-alives on every connection report silence at --timeout, naming
     * the connection. Not shorter: Linux also aborts a connection whose
     * window stays closed this long (measured: 2.5 s closed with 2 s), so
     * it is also how long a peer's QEMU may stop reading (30 s at least).
     */
    rdmax_s.topts.user_timeout_ms =
        2 * rdmax_s.o.timeout_ms > 30000 ? 2 * rdmax_s.o.timeout_ms : 30000;
    rdmax_s.topts.pinned_max = rdmax_s.o.pinned_max;
    rdmax_s.topts.busy_poll = rdmax_s.o.busy_poll;
    if (rdmax_s.o.sender) {
        rdmax_s.nlanes = rdmax_s.o.lanes;
        rdmax_s.codec.zstd_level = rdmax_s.o.zstd_level;
        return rdmax_send_run();
    }
    return rdmax_recv_run();
}
