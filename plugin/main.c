/* rdma-x: entry point. */
#define _GNU_SOURCE
#include "config.h"

#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "admission.h"
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
        rdmax_status_begin(st, o.slot, rdmax_send_session(p));
        r = rdmax_send_run(p);
        status = rdmax_session_finish(rdmax_send_session(p), r);
        rdmax_status_end(st, o.slot, status == 0);
        rdmax_send_destroy(p);
    } else {
        struct rdmax_recv *p;
        if (rdmax_recv_create(&o, &p) < 0) {
            fprintf(stderr, "rdma-x: error: out of memory\n");
            return 1;
        }
        rdmax_status_begin(st, o.slot, rdmax_recv_session(p));
        r = rdmax_recv_run(p);
        status = rdmax_session_finish(rdmax_recv_session(p), r);
        rdmax_status_end(st, o.slot, status == 0);
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

/*
 * One slot: its socket path, its port, its migrations one after another
 * (--serve) or its one migration. Slots share the process's disks,
 * status socket and pre-flight bookkeeping, nothing else.
 */
struct slot {
    struct rdmax_opts o;
    struct rdmax_status *st;
    char addr[320];
    char stats[PATH_MAX];
    pthread_t thread;
    bool started;
    int status;
};

static void *slot_main(void *arg)
{
    struct slot *sl = arg;
    const struct rdmax_opts *o = &sl->o;

    for (unsigned n = 1;; n++) {
        double t0 = rdmax_now();
        sl->status = run_one(sl->o, sl->st);
        if (!o->serve) {
            break;
        }
        fprintf(stderr, "rdma-x: note: %s%smigration %u %s; ready for the next one\n",
                o->label ? o->label : "", o->label ? ": " : "", n,
                sl->status == 0 ? "done" : "failed");
        if (sl->status != 0 && rdmax_now() - t0 < 1.0) {
            /* Failing at once again and again (a peer that keeps refusing): not in a tight loop. */
            struct timespec ts = {1, 0};
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

/* Slot k's address: addr's port + k ([IPv6] kept). 0, or -1 after its error line. */
static int slot_addr(const char *addr, unsigned k, char *out, size_t out_len)
{
    char host[256], port[32], err[400], *end;
    unsigned long p;

    if (rdmax_addr_split(addr, host, sizeof(host), port, sizeof(port), err, sizeof(err)) < 0) {
        fprintf(stderr, "rdma-x: error: %s\n", err);
        return -1;
    }
    p = strtoul(port, &end, 10);
    if (*end || end == port) {
        fprintf(stderr, "rdma-x: error: slots need a numeric port in %s (slot k uses PORT+k)\n",
                addr);
        return -1;
    }
    if (p + k > 65535) {
        fprintf(stderr, "rdma-x: error: slot %u would use port %lu of %s: past 65535\n", k + 1,
                p + k, addr);
        return -1;
    }
    snprintf(out, out_len, strchr(host, ':') ? "[%s]:%lu" : "%s:%lu", host, p + k);
    return 0;
}

/* Stop listening for QEMU: the slots' sockets go. */
static void slots_unlisten(struct slot *slots, unsigned n)
{
    for (unsigned k = 0; k < n; k++) {
        if (slots[k].o.sender && slots[k].o.unix_listen_fd >= 0) {
            close(slots[k].o.unix_listen_fd);
            unlink(slots[k].o.unix_path);
            slots[k].o.unix_listen_fd = -1;
        }
    }
}

/*
 * Each slot's options: its path, port, stats file and label. The
 * listeners live as long as we do: QEMU's multifd and preempt channels
 * come to them too, and with --serve the next migration's main channel
 * waits in the backlog while one runs. 0, or -1 after one error line.
 */
static int slots_init(const struct rdmax_opts *o, struct slot *slots, unsigned n)
{
    for (unsigned k = 0; k < n; k++) {
        slots[k].o = *o;
        slots[k].o.unix_listen_fd = -1;
    }
    for (unsigned k = 0; k < n; k++) {
        struct slot *sl = &slots[k];
        sl->o.slot = k;
        if (n > 1) {
            sl->o.unix_path = o->slot_path[k];
            sl->o.label = o->slot_path[k];
            if (slot_addr(o->addr, k, sl->addr, sizeof(sl->addr)) < 0) {
                slots_unlisten(slots, n);
                return -1;
            }
            sl->o.addr = sl->addr;
            if (o->stats_json) {
                snprintf(sl->stats, sizeof(sl->stats), "%s.%u", o->stats_json, k + 1);
                sl->o.stats_json = sl->stats;
            }
        }
        if (sl->o.unix_path && o->sender) {
            sl->o.unix_listen_fd = rdmax_unix_listen(sl->o.unix_path);
            if (sl->o.unix_listen_fd < 0) {
                slots_unlisten(slots, n);
                return -1;
            }
        }
    }
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
    unsigned nslots = o.nslots > 1 ? o.nslots : 1;
    struct slot *slots = calloc(nslots, sizeof(*slots));
    struct rdmax_admission *adm = NULL;
    if (!slots || (!o.sender && nslots > 1 && rdmax_admission_create(&adm) < 0)) {
        fprintf(stderr, "rdma-x: error: out of memory\n");
        free(slots);
        return 1;
    }
    o.admission = adm;
    if (slots_init(&o, slots, nslots) < 0) {
        rdmax_admission_destroy(adm);
        free(slots);
        return 1;
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
        slots_unlisten(slots, nslots);
        rdmax_admission_destroy(adm);
        free(slots);
        return 1;
    }
    if (disks) {
        o.disks = o.sender ? NULL : disks;
        rdmax_status_disks(st, disks);
    }
    rdmax_status_slots(st, nslots);
    for (unsigned k = 0; k < nslots; k++) {
        slots[k].st = st;
        slots[k].o.disks = o.disks;
    }
    if (nslots == 1) {
        slot_main(&slots[0]);
    } else {
        for (unsigned k = 0; k < nslots; k++) {
            slots[k].started = pthread_create(&slots[k].thread, NULL, slot_main, &slots[k]) == 0;
            if (!slots[k].started) {
                /* The others serve on; this slot's QEMU finds no listener. */
                fprintf(stderr, "rdma-x: error: cannot start the thread of slot %s\n",
                        slots[k].o.unix_path);
                slots[k].status = 1;
            }
        }
        for (unsigned k = 0; k < nslots; k++) {
            if (slots[k].started) {
                pthread_join(slots[k].thread, NULL);
            }
        }
    }
    status = 0;
    for (unsigned k = 0; k < nslots; k++) {
        status |= slots[k].status;
    }
    if (status != 0) {
        rdmax_disks_abort(disks); /* nothing will close them now: QEMU's job fails */
    }
    rdmax_status_disks(st, NULL);
    if (rdmax_disks_finish(disks) < 0) {
        status = 1;
    }
    rdmax_status_stop(st);
    slots_unlisten(slots, nslots);
    rdmax_admission_destroy(adm);
    free(slots);
    return status;
}
