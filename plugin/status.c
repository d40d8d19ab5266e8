/* rdma-x: the status socket and `rdma-x status`; see status.h. */
#define _GNU_SOURCE
#include "status.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "disks.h"
#include "front-unix.h"
#include "session.h"

#define RATE_WINDOW_S 5.0 /* "now" in the rate: the last few seconds */

/* One slot's migration (main.c: one per --listen-unix / --connect-unix path). */
struct slot_status {
    struct rdmax_session *cur; /* mu: readable only while set */
    unsigned number;           /* mu: the slot's current migration's, or its last one's */
    unsigned ended;            /* mu: the slot's migrations that ended */
    double cur_t0;             /* mu */
    /* A few samples of bytes_in (status thread, mu), for the recent rate. */
    double sample_t[8];
    uint64_t sample_in[8];
    unsigned nsamples;
};

struct rdmax_status {
    char *path;
    bool sender;
    int listen_fd, stop_fd;
    pthread_t thread;
    bool started;
    double t0;
    pthread_mutex_t mu;
    struct slot_status slot[RDMAX_SLOTS_MAX]; /* mu */
    unsigned nslots;                          /* mu: slots seen so far */
    unsigned done, failed;                    /* mu: all slots together */
    struct rdmax_disks *disks;                /* mu */
};

static double mono(void)
{
    return rdmax_now();
}

/* Once a second: remember what the migration had moved, for its recent rate. mu held. */
static void sample(struct slot_status *ss)
{
    unsigned n = sizeof(ss->sample_t) / sizeof(ss->sample_t[0]);

    if (!ss->cur) {
        ss->nsamples = 0;
        return;
    }
    if (ss->nsamples == n) {
        memmove(ss->sample_t, ss->sample_t + 1, sizeof(ss->sample_t[0]) * (n - 1));
        memmove(ss->sample_in, ss->sample_in + 1, sizeof(ss->sample_in[0]) * (n - 1));
        ss->nsamples--;
    }
    ss->sample_t[ss->nsamples] = mono();
    ss->sample_in[ss->nsamples] = rdmax_stats_qemu_bytes(ss->cur);
    ss->nsamples++;
}

/* MiB/s over the last RATE_WINDOW_S seconds (0 without two samples). mu held. */
static double recent_rate(const struct slot_status *ss)
{
    double now = mono();
    uint64_t in = rdmax_stats_qemu_bytes(ss->cur);

    for (unsigned i = 0; i < ss->nsamples; i++) {
        if (now - ss->sample_t[i] <= RATE_WINDOW_S + 0.5 && now - ss->sample_t[i] > 0.5) {
            return (double)(in - ss->sample_in[i]) / (now - ss->sample_t[i]) / 1048576.0;
        }
    }
    return 0;
}

/* A receiver's session exists while it only listens: no migration yet. mu held. */
static bool in_flight(const struct rdmax_status *st, const struct slot_status *ss)
{
    return ss->cur && (st->sender || ss->cur->ctrl.conn);
}

/* The busiest slot's phase stands for the process. mu held. */
static const char *phase(const struct rdmax_status *st)
{
    bool connecting = false;

    for (unsigned k = 0; k < st->nslots; k++) {
        const struct slot_status *ss = &st->slot[k];
        if (ss->cur && ss->cur->ctrl.conn) {
            return "migrating";
        }
        connecting |= ss->cur && st->sender;
    }
    if (connecting) {
        return "connecting to the receiver";
    }
    return st->sender ? "waiting for QEMU" : "waiting for a sender";
}

static void migration_json(const struct rdmax_status *st, const struct slot_status *ss, FILE *f)
{
    fprintf(f, "{\"number\": %u, \"slot\": %u, \"socket\": ", ss->number,
            (unsigned)(ss - st->slot) + 1);
    if (ss->cur->o.unix_path) {
        rdmax_json_string(f, ss->cur->o.unix_path);
    } else {
        fprintf(f, "null");
    }
    fprintf(f, ", \"seconds\": %.1f, \"rate_mib_s\": %.1f, \"stats\": ", mono() - ss->cur_t0,
            recent_rate(ss));
    rdmax_stats_json(ss->cur, f, "running");
    fprintf(f, "}");
}

static void snapshot(struct rdmax_status *st, FILE *f, bool json)
{
    pthread_mutex_lock(&st->mu);
    double up = mono() - st->t0;
    const struct slot_status *first = NULL;
    unsigned flying = 0;
    for (unsigned k = 0; k < st->nslots; k++) {
        if (in_flight(st, &st->slot[k])) {
            first = first ? first : &st->slot[k];
            flying++;
        }
    }
    if (json) {
        fprintf(f,
                "{\"role\": \"%s\", \"pid\": %d, \"uptime_seconds\": %.1f, "
                "\"migrations_done\": %u, \"migrations_failed\": %u, \"phase\": \"%s\", "
                "\"slots\": %u, \"migration\": ",
                st->sender ? "send" : "recv", (int)getpid(), up, st->done, st->failed, phase(st),
                st->nslots);
        /* "migration": the first in flight, as before slots; "migrations": all of them. */
        if (first) {
            migration_json(st, first, f);
        } else {
            fprintf(f, "null");
        }
        fprintf(f, ", \"migrations\": [");
        for (unsigned k = 0, n = 0; k < st->nslots; k++) {
            if (in_flight(st, &st->slot[k])) {
                fprintf(f, n++ ? ", " : "");
                migration_json(st, &st->slot[k], f);
            }
        }
        fprintf(f, "], \"disks\": ");
        if (st->disks) {
            rdmax_disks_report(st->disks, f, true);
        } else {
            fprintf(f, "null");
        }
        fprintf(f, "}\n");
    } else {
        fprintf(f, "rdma-x %s (pid %d), up %.0f s: %u migrations done, %u failed; %s",
                st->sender ? "send" : "recv", (int)getpid(), up, st->done, st->failed, phase(st));
        if (st->nslots > 1) {
            fprintf(f, " (%u of %u slots busy)", flying, st->nslots);
        }
        fprintf(f, "\n");
        for (unsigned k = 0; k < st->nslots; k++) {
            const struct slot_status *ss = &st->slot[k];
            if (!in_flight(st, ss)) {
                continue;
            }
            if (st->nslots > 1) {
                fprintf(f, "slot %u (%s) ", k + 1,
                        ss->cur->o.unix_path ? ss->cur->o.unix_path : "-");
            }
            fprintf(f, "migration %u: %.1f s, %.1f MiB/s now; ", ss->number, mono() - ss->cur_t0,
                    recent_rate(ss));
            rdmax_stats_summary(ss->cur, f);
            fprintf(f, "\n");
        }
        if (st->disks) {
            rdmax_disks_report(st->disks, f, false);
            fprintf(f, "\n");
        }
    }
    pthread_mutex_unlock(&st->mu);
}

/* One client: its request line ("json" or "text"), then the snapshot, then close. */
static void answer(struct rdmax_status *st, int c)
{
    char req[16] = "";
    struct pollfd p = {.fd = c, .events = POLLIN};
    FILE *f;

    if (poll(&p, 1, 200) == 1) {
        ssize_t n = read(c, req, sizeof(req) - 1);
        req[n > 0 ? n : 0] = '\0';
    }
    f = fdopen(c, "w");
    if (!f) {
        close(c);
        return;
    }
    snapshot(st, f, strncmp(req, "text", 4) != 0);
    fclose(f); /* a client gone meanwhile: nothing to do */
}

static void *status_main(void *arg)
{
    struct rdmax_status *st = arg;

    for (;;) {
        struct pollfd p[2] = {{.fd = st->listen_fd, .events = POLLIN},
                              {.fd = st->stop_fd, .events = POLLIN}};
        int n = poll(p, 2, 1000);
        if (n < 0 && errno != EINTR) {
            break;
        }
        if (n > 0 && p[1].revents) {
            break;
        }
        pthread_mutex_lock(&st->mu);
        for (unsigned k = 0; k < st->nslots; k++) {
            sample(&st->slot[k]);
        }
        pthread_mutex_unlock(&st->mu);
        if (n > 0 && (p[0].revents & POLLIN)) {
            int c = accept4(st->listen_fd, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0) {
                answer(st, c);
            }
        }
    }
    return NULL;
}

int rdmax_status_start(const char *path, bool sender, struct rdmax_status **out)
{
    struct rdmax_status *st = calloc(1, sizeof(*st));

    *out = NULL;
    if (!st || !(st->path = strdup(path))) {
        fprintf(stderr, "rdma-x: error: out of memory\n");
        free(st);
        return -1;
    }
    st->sender = sender;
    st->t0 = mono();
    st->stop_fd = eventfd(0, EFD_CLOEXEC);
    pthread_mutex_init(&st->mu, NULL);
    st->listen_fd = st->stop_fd < 0 ? -1 : rdmax_unix_listen(path);
    if (st->listen_fd < 0) {
        if (st->stop_fd < 0) {
            fprintf(stderr, "rdma-x: error: eventfd: %s\n", strerror(errno));
        } else {
            close(st->stop_fd);
        }
        pthread_mutex_destroy(&st->mu);
        free(st->path);
        free(st);
        return -1;
    }
    st->started = pthread_create(&st->thread, NULL, status_main, st) == 0;
    if (!st->started) {
        fprintf(stderr, "rdma-x: error: cannot start the status thread\n");
        st->started = false;
        rdmax_status_stop(st);
        return -1;
    }
    *out = st;
    return 0;
}

void rdmax_status_begin(struct rdmax_status *st, unsigned k, struct rdmax_session *s)
{
    if (!st || k >= RDMAX_SLOTS_MAX) {
        return;
    }
    pthread_mutex_lock(&st->mu);
    struct slot_status *ss = &st->slot[k];
    ss->cur = s;
    ss->number = ss->ended + 1;
    ss->cur_t0 = mono();
    ss->nsamples = 0;
    st->nslots = k + 1 > st->nslots ? k + 1 : st->nslots;
    pthread_mutex_unlock(&st->mu);
}

void rdmax_status_end(struct rdmax_status *st, unsigned k, bool ok)
{
    if (!st || k >= RDMAX_SLOTS_MAX) {
        return;
    }
    pthread_mutex_lock(&st->mu);
    st->slot[k].cur = NULL;
    st->slot[k].ended++;
    if (ok) {
        st->done++;
    } else {
        st->failed++;
    }
    pthread_mutex_unlock(&st->mu);
}

void rdmax_status_slots(struct rdmax_status *st, unsigned n)
{
    if (st) {
        pthread_mutex_lock(&st->mu);
        st->nslots = n < RDMAX_SLOTS_MAX ? n : RDMAX_SLOTS_MAX;
        pthread_mutex_unlock(&st->mu);
    }
}

void rdmax_status_disks(struct rdmax_status *st, struct rdmax_disks *d)
{
    if (st) {
        pthread_mutex_lock(&st->mu);
        st->disks = d;
        pthread_mutex_unlock(&st->mu);
    }
}

void rdmax_status_stop(struct rdmax_status *st)
{
    if (!st) {
        return;
    }
    if (st->started) {
        uint64_t one = 1;
        if (write(st->stop_fd, &one, sizeof(one)) != sizeof(one)) {
            /* an eventfd takes it: cannot happen */
        }
        pthread_join(st->thread, NULL);
    }
    close(st->listen_fd);
    unlink(st->path);
    close(st->stop_fd);
    pthread_mutex_destroy(&st->mu);
    free(st->path);
    free(st);
}

int rdmax_status_cli(int argc, char **argv)
{
    const char *path = NULL;
    bool json = false;
    char buf[65536];
    int fd;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = true;
        } else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            printf("Usage: rdma-x status PATH [--json]\n"
                   "\n"
                   "Print what the rdma-x started with '--status-socket PATH' is doing: its\n"
                   "migration in flight (bytes, rate, tier mix), how many were done or\n"
                   "failed, its disk connections. --json: the same as one JSON object.\n");
            return 0;
        } else if (!path && argv[i][0] != '-') {
            path = argv[i];
        } else {
            fprintf(stderr,
                    "rdma-x: error: unexpected argument '%s' (see 'rdma-x status --help')\n",
                    argv[i]);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "rdma-x: error: 'rdma-x status' needs the PATH of a --status-socket\n");
        return 2;
    }
    fd = rdmax_unix_dial(path, 0);
    if (fd < 0) {
        fprintf(stderr, "rdma-x: error: no rdma-x answers at %s: %s\n", path, strerror(-fd));
        return 1;
    }
    if (write(fd, json ? "json\n" : "text\n", 5) != 5) {
        fprintf(stderr, "rdma-x: error: %s: %s\n", path, strerror(errno));
        close(fd);
        return 1;
    }
    for (;;) {
        ssize_t n = read(fd, buf, sizeof(buf));
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            fprintf(stderr, "rdma-x: error: reading from %s: %s\n", path, strerror(errno));
            close(fd);
            return 1;
        }
        if (n == 0) {
            break;
        }
        if (fwrite(buf, 1, (size_t)n, stdout) != (size_t)n) {
            break;
        }
    }
    close(fd);
    return fflush(stdout) == 0 ? 0 : 1;
}
