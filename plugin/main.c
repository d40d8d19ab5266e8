/* rdma-x: entry point. */
#define _GNU_SOURCE
#include "config.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "cli.h"
#include "crypt.h"
#include "disks.h"
#include "front-unix.h"
#include "recv.h"
#include "send.h"
#include "session.h"
#include "status.h"
#include "transport.h"
#include "version.h"

/*
 * One migration: open QEMU's side, run the pipeline, close it again. The
 * exit status, 0 or 1 (the error line is printed).
 */
static int run_one(struct rdmax_opts o, struct rdmax_status *st)
{
    int r, status;

    o.qemu_in = STDIN_FILENO;
    o.qemu_out = STDOUT_FILENO;
    if (o.unix_path && !o.sender && o.serve) {
        /* recv.c connects once a sender is in: the next destination QEMU may not exist yet. */
        o.qemu_in = o.qemu_out = -1;
    } else if (o.unix_path) {
        /*
         * unix: front end: one socket carries the stream one way and the
         * return path the other, as stdin and stdout do for exec:. Two
         * numbers for it, so the pipeline's dup2 on error closes both.
         */
        int fd = o.sender ? rdmax_unix_accept(o.unix_listen_fd, o.unix_path)
                          : rdmax_unix_connect(o.unix_path, o.connect_timeout_ms);
        if (fd < 0) {
            return 1;
        }
        o.qemu_in = fd;
        o.qemu_out = dup(fd);
        if (o.qemu_out < 0) {
            fprintf(stderr, "rdma-x: error: dup: %m\n");
            close(fd);
            return 1;
        }
    }
    /*
     * QEMU's pipe to or from us defaults to 64 KiB: with 1 MiB both sides
     * wake each other ~16x less often per byte. 1 MiB is ~9 ms of a
     * 1 Gbit/s link, so QEMU's bandwidth estimate stays honest. A file or
     * a socket simply refuses, which is fine.
     */
    if (!o.unix_path) {
        fcntl(o.sender ? o.qemu_in : o.qemu_out, F_SETPIPE_SZ, 1 << 20);
    }
    /*
     * The one exit path: run returns 0 or -errno once every thread ended
     * (on error QEMU's pipes were closed at once and the peer told);
     * finish prints the reason and writes the stats.
     */
    if (o.sender) {
        struct rdmax_send *p;
        if (rdmax_send_create(&o, &p) < 0) {
            fprintf(stderr, "rdma-x: error: out of memory\n");
            return 1;
        }
        rdmax_status_begin(st, rdmax_send_session(p));
        r = rdmax_send_run(p);
        status = rdmax_session_finish(rdmax_send_session(p), r);
        rdmax_status_end(st, status == 0);
        rdmax_send_destroy(p);
    } else {
        struct rdmax_recv *p;
        if (rdmax_recv_create(&o, &p) < 0) {
            fprintf(stderr, "rdma-x: error: out of memory\n");
            return 1;
        }
        rdmax_status_begin(st, rdmax_recv_session(p));
        r = rdmax_recv_run(p);
        status = rdmax_session_finish(rdmax_recv_session(p), r);
        rdmax_status_end(st, status == 0);
        rdmax_recv_destroy(p);
    }
    if (o.unix_path && o.qemu_in >= 0) {
        close(o.qemu_in);
        close(o.qemu_out);
    }
    return status;
}

/*
 * What would fail every migration alike fails the start instead: a
 * service must not spin through "migration N failed" on a bad key file.
 */
static int check_start(const struct rdmax_opts *o)
{
    uint8_t key[RDMAX_PSK_MAX];
    size_t len;
    char err[400];

    if (o->psk_file && rdmax_psk_load(o->psk_file, key, sizeof(key), &len, err, sizeof(err)) < 0) {
        fprintf(stderr, "rdma-x: error: %s\n", err);
        return -1;
    }
    OPENSSL_cleanse(key, sizeof(key));
    return 0;
}

int main(int argc, char **argv)
{
    struct rdmax_opts o = {0};
    int r, status;

    if (argc < 2) {
        rdmax_cli_usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        rdmax_cli_usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0 ||
        strcmp(argv[1], "version") == 0) {
        rdmax_version_print(stdout);
        if (fflush(stdout) != 0) {
            fprintf(stderr, "rdma-x: error: writing the version: %m\n");
            return 1;
        }
        return 0;
    }
    if (strcmp(argv[1], "keygen") == 0) {
        return rdmax_cli_keygen(argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "status") == 0) {
        return rdmax_status_cli(argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "send") != 0 && strcmp(argv[1], "recv") != 0) {
        fprintf(stderr,
                "rdma-x: error: unknown command '%s' (expected send, recv, status or keygen)\n",
                argv[1]);
        return 2;
    }
    r = rdmax_cli_parse(argc - 1, argv + 1, &o);
    if (r != 0) {
        return r > 0 ? 0 : 2;
    }
    /* A closed peer or QEMU pipe is an error to report, not a signal to die of. */
    signal(SIGPIPE, SIG_IGN);
    rdmax_log_init();
    if (check_start(&o) < 0) {
        return 1;
    }
    if (o.unix_path && o.sender) {
        /*
         * The listener lives as long as we do: QEMU's multifd and preempt
         * channels come to it too, and with --serve the next migration's
         * main channel waits in its backlog while one runs.
         */
        o.unix_listen_fd = rdmax_unix_listen(o.unix_path);
        if (o.unix_listen_fd < 0) {
            return 1;
        }
    }
    /*
     * Disk (NBD) connections come before the migration and end after it,
     * so they belong to the process, not to one migration; so does the
     * status socket.
     */
    struct rdmax_disks *disks = NULL;
    struct rdmax_status *st = NULL;
    if ((o.status_path && rdmax_status_start(o.status_path, o.sender, &st) < 0) ||
        (o.disks_path && rdmax_disks_start(&o, &disks) < 0)) {
        rdmax_status_stop(st);
        if (o.unix_path && o.sender) {
            close(o.unix_listen_fd);
            unlink(o.unix_path);
        }
        return 1;
    }
    if (disks) {
        o.disks = o.sender ? NULL : disks;
        rdmax_status_disks(st, disks);
    }
    for (unsigned n = 1;; n++) {
        double t0 = rdmax_now();
        status = run_one(o, st);
        if (!o.serve) {
            break;
        }
        fprintf(stderr, "rdma-x: note: migration %u %s; ready for the next one\n", n,
                status == 0 ? "done" : "failed");
        if (status != 0 && rdmax_now() - t0 < 1.0) {
            /* Failing at once again and again (a peer that keeps refusing): not in a tight loop. */
            struct timespec ts = {1, 0};
            nanosleep(&ts, NULL);
        }
    }
    if (status != 0) {
        rdmax_disks_abort(disks); /* nothing will close them now: QEMU's job fails */
    }
    rdmax_status_disks(st, NULL);
    if (rdmax_disks_finish(disks) < 0) {
        status = 1;
    }
    rdmax_status_stop(st);
    if (o.unix_path && o.sender) {
        close(o.unix_listen_fd);
        unlink(o.unix_path);
    }
    return status;
}
