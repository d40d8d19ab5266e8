/*
 * RDMA transport: librdmacm for connection management, libibverbs for the
 * data path. The same ops as tcp.c, so the wire layer above cannot tell
 * them apart.
 *
 * One connection = one rdma_cm_id with one RC QP, its own protection domain,
 * completion queue (shared by send and receive), completion channel,
 * rdma_cm event channel and one registered, page-aligned buffer pool:
 *
 *     [ send slot 0 .. n_send-1 | receive slot 0 .. n_recv-1 ]   msg_size each
 *
 * Guest memory is never registered: send() copies the frame into send slots
 * (a frame larger than one slot becomes several messages), recv() copies out
 * of receive slots, so the registered memory is bounded by the pool sizes
 * (o->pinned_max for the whole process, see rdma_pool_plan()).
 *
 * Messages are IBV_WR_SEND_WITH_IMM. The immediate carries credits: the
 * number of receive slots the sender of the message has re-posted since it
 * last said so. A message with payload is "data"; a zero-length message is
 * "credit-only".
 *
 * Flow control (credits):
 *  - Each side posts n_data + reserve receive WRs. Its hello (private data of
 *    rdma_connect/rdma_accept) offers n_data credits and its slot size.
 *  - A data message costs the sender one credit; the receiver returns it once
 *    the application has consumed the slot and the WR is re-posted.
 *  - Owed credits ride on the next data message going the other way, or, once
 *    credit_batch (n_data / 2) are owed, go back in a credit-only message.
 *    Credit-only messages land in the reserve WRs and are re-posted as soon
 *    as they are polled, not when the application reads. Since every
 *    credit-only message carries at least credit_batch credits and at most
 *    n_data credits are outstanding, at most n_data / credit_batch (= the
 *    reserve, 2) of them can be un-polled at the peer, so the sender never
 *    posts more than the receiver has posted receive WRs. rnr_retry = 7 is
 *    only a safety net.
 *  - No deadlock: when a receiver waits for data while owing fewer than
 *    credit_batch credits, the sender still holds more than
 *    n_data - credit_batch >= 1 credits.
 *
 * Threads: at most one sending and one receiving thread per connection
 * (transport.h). Both need completions (the sender for credits and free send
 * slots, the receiver for data), so whichever thread waits first becomes the
 * "poller" and sleeps on the completion channel, the cm event channel and
 * an eventfd (written by shutdown()) at once; the other waits on a condition
 * variable that the poller signals after each batch of completions. With
 * o->busy_poll the poller spins on ibv_poll_cq instead of sleeping.
 *
 * Teardown: close() waits (bounded) until every posted send has completed,
 * i.e. was acknowledged by the peer's HCA, then rdma_disconnect()s, so a
 * sender that closes right after its last send() loses nothing. The peer
 * sees RDMA_CM_EVENT_DISCONNECTED (also when this process dies: the kernel
 * destroys the cm_id, which sends a DREQ) and its recv() returns what was
 * already received, then -ECONNRESET.
 *
 * Errors: listen and connect say why they failed in the caller's buffer
 * (rdmax_transport_opts.why; a warning when it gives none), accept in the
 * listener's why, a connection's first data-path error (sticky) in its
 * why, with the verb name and strerror; all return -errno. Nothing else is
 * logged: the session words the messages.
 */
#define G_LOG_DOMAIN "rdmax-rdma"

#include "config.h"
#include "transport.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <glib.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <infiniband/verbs.h>
#include <rdma/rdma_cma.h>

#define RDMA_HELLO_MAGIC 0x52445852u /* "RDXR" */
#define RDMA_HELLO_VERSION 1

#define RDMA_MSG_SIZE_DEFAULT (64u * 1024)
#define RDMA_MSG_SIZE_MIN 4096u
#define RDMA_MSG_SIZE_MAX (4u * 1024 * 1024)
#define RDMA_SLOTS_MIN 2u  /* per direction */
#define RDMA_SLOTS_MAX 64u /* per direction */
#define RDMA_RESERVE 2u    /* receive WRs for credit-only messages */

/*
 * Default bound on registered memory per process. Where RLIMIT_MEMLOCK
 * applies, 6 MiB: it fits Debian's default 8 MiB with room left for the
 * provider's queues. Where it does not (unlimited, or CAP_IPC_LOCK), 64 MiB.
 * The bound is spread over the connections expected (control + one lane per
 * CPU, the CLI's default, at least 9); each gets up to RDMA_SLOTS_WINDOW slots
 * per direction (1 MiB in flight: measured 1.2-3.5x faster than 256 KiB for
 * one connection in the Soft-RoCE guest), at least RDMA_SLOTS_MIN, with
 * smaller slots (down to RDMA_MSG_SIZE_FLOOR) when the bound is tight.
 */
#define RDMA_PINNED_DEFAULT (6u * 1024 * 1024)
#define RDMA_PINNED_DEFAULT_UNLOCKED (64u * 1024 * 1024)
#define RDMA_PINNED_HEADROOM (1u * 1024 * 1024)
#define RDMA_CONNS_EXPECTED_MIN 9u
#define RDMA_CONNS_EXPECTED_MAX 65u
#define RDMA_SLOTS_WINDOW 16u /* per direction, unless the bound is set */
#define RDMA_MSG_SIZE_FLOOR 8192u

#define RDMA_CQ_BATCH 16
#define RDMA_RESOLVE_MS 2000
#define RDMA_ESTABLISH_MS 5000
#define RDMA_CONNECT_DEFAULT_MS 10000
#define RDMA_RETRY_MS 100
#define RDMA_DRAIN_MS 3000

/* wr_id = kind << 32 | slot */
enum rdma_wr_kind {
    RDMA_WR_SEND = 1, /* data message from send slot */
    RDMA_WR_CTRL = 2, /* credit-only message, no slot */
    RDMA_WR_RECV = 3, /* receive slot */
};

#define RDMA_WRID(kind, slot) (((uint64_t)(kind) << 32) | (uint32_t)(slot))
#define RDMA_WRID_KIND(id) ((unsigned)((id) >> 32))
#define RDMA_WRID_SLOT(id) ((unsigned)((id)&0xffffffffu))

/* Private data of rdma_connect()/rdma_accept(); big-endian on the wire. */
struct rdma_hello {
    uint32_t magic;
    uint16_t version;
    uint16_t reserved;
    uint32_t msg_size; /* sender's receive slot size: the largest message it takes */
    uint32_t credits;  /* receive slots it offers (n_data) */
};

enum rdma_conn_state {
    RDMA_CONN_INIT,        /* resources being set up; no traffic yet */
    RDMA_CONN_CONNECTED,   /* ESTABLISHED: data may flow both ways */
    RDMA_CONN_PEER_CLOSED, /* DISCONNECTED seen: received data may still be read */
    RDMA_CONN_FAILED,      /* completion or cm error; c->error says which */
};

struct rdma_conn {
    struct rdmax_conn base; /* first: container_of */

    /* Set at create, read-only afterwards. */
    struct rdma_event_channel *ech; /* this connection's cm events */
    struct rdma_cm_id *id;
    struct ibv_pd *pd;
    struct ibv_comp_channel *cch;
    struct ibv_cq *cq;
    uint8_t *mem; /* the pool: n_send + n_recv slots of msg_size */
    size_t mem_len;
    size_t pinned; /* bytes counted in rdma_pinned_total */
    struct ibv_mr *mr;
    size_t msg_size;       /* our slot size */
    size_t send_max;       /* largest message the peer takes (set at ESTABLISHED) */
    unsigned n_send;       /* send slots */
    unsigned n_data;       /* receive slots offered as credits */
    unsigned n_recv;       /* n_data + RDMA_RESERVE receive WRs */
    unsigned credit_batch; /* return credits in groups of this many */
    int wake_fd;           /* eventfd: shutdown() wakes the poller */
    bool busy_poll;

    pthread_mutex_t lock;
    pthread_cond_t cond;

    /* Protected by lock. */
    enum rdma_conn_state state;
    int error;            /* first error, -errno; 0 while fine */
    bool shut;            /* shutdown() was called */
    bool polling;         /* a thread owns the CQ/fd wait; others use cond */
    bool spinning;        /* the busy-polling thread polls the CQ unlocked */
    unsigned credits;     /* data messages we may still post */
    unsigned credits_max; /* what the peer offered in its hello */
    unsigned owed;        /* re-posted receive WRs not yet reported to the peer */
    unsigned ctrl_inflight;
    unsigned send_inflight; /* posted sends (data + credit-only) not completed */
    unsigned *send_free;    /* stack of free send slots */
    unsigned n_send_free;
    unsigned *ready; /* ring of receive slots holding unread data */
    unsigned ready_head;
    unsigned ready_count;
    uint32_t *recv_len; /* payload bytes in each receive slot */
    size_t ready_off;   /* bytes of the head slot already read */

    /*
     * Slot ownership: a send slot popped from send_free belongs to the
     * sending thread (it copies into it without the lock) until posted, then
     * to the HCA until its completion pushes it back. A receive slot belongs
     * to the HCA while posted, then (through ready) to the receiving thread,
     * which copies out of it without the lock (recv) or lends it in place
     * (rx_next, until rx_release) and re-posts it when empty.
     */

    /*
     * rx_next's bounce buffer, for a loan that spans receive slots (a frame
     * longer than what is left of the head slot): owned by the receiving
     * thread, no lock. bounced: the loan is bounce[0..bounce_len), already
     * consumed from the slots; else the loan lies in the head slot from
     * ready_off on and nothing is consumed until rx_release.
     */
    uint8_t *bounce;
    size_t bounce_cap, bounce_len;
    bool bounced;
};

struct rdma_listener {
    struct rdmax_listener base; /* first */
    struct rdma_event_channel *ech;
    struct rdma_cm_id *id;
    struct rdmax_transport_opts opts;
    char where[80];
};

/* Registered bytes of all connections of this process. */
static atomic_size_t rdma_pinned_total;

static struct rdma_conn *rdma_conn_of(struct rdmax_conn *c)
{
    return (struct rdma_conn *)((char *)c - offsetof(struct rdma_conn, base));
}

static int64_t rdma_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Milliseconds left until deadline (INT64_MAX: forever -> -1). */
static int rdma_left_ms(int64_t deadline)
{
    int64_t left;

    if (deadline == INT64_MAX) {
        return -1;
    }
    left = deadline - rdma_now_ms();
    if (left <= 0) {
        return 0;
    }
    return left > INT32_MAX ? INT32_MAX : (int)left;
}

static int64_t rdma_deadline(int timeout_ms)
{
    return timeout_ms < 0 ? INT64_MAX : rdma_now_ms() + timeout_ms;
}

/* errno after a failed call, as -errno; never 0. */
static int rdma_errno(void)
{
    return errno > 0 ? -errno : -EIO;
}

static const char *rdma_peer_name(const struct rdma_conn *c)
{
    return c->base.peer[0] ? c->base.peer : "peer";
}

static int rdma_set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        return rdma_errno();
    }
    return 0;
}

static void rdma_memlock_hint(char *buf, size_t len)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        snprintf(buf, len,
                 "locked-memory limit (RLIMIT_MEMLOCK) is %llu KiB with %zu KiB registered "
                 "already: raise it (ulimit -l unlimited; LimitMEMLOCK=infinity in a systemd "
                 "unit; '* - memlock unlimited' in /etc/security/limits.conf) or lower "
                 "the bound (--rdma-pinned-max, RDMAX_RDMA_PINNED_MAX)",
                 (unsigned long long)(rl.rlim_cur / 1024), atomic_load(&rdma_pinned_total) / 1024);
    } else {
        snprintf(buf, len,
                 "locked-memory limit is unlimited; the device or the system "
                 "is out of memory");
    }
}

/* A size from the environment (K/M/G suffixes), 0 when unset or invalid. */
static size_t rdma_env_size(const char *name)
{
    const char *s = getenv(name);
    unsigned long long v;
    char *end;

    if (!s || !*s) {
        return 0;
    }
    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s) {
        return 0;
    }
    switch (*end) {
    case 'k':
    case 'K':
        v <<= 10;
        break;
    case 'm':
    case 'M':
        v <<= 20;
        break;
    case 'g':
    case 'G':
        v <<= 30;
        break;
    default:
        break;
    }
    return (size_t)v;
}

/* May this process lock memory beyond RLIMIT_MEMLOCK (CAP_IPC_LOCK)? */
static bool rdma_can_lock_freely(void)
{
    struct rlimit rl;
    unsigned long long eff = 0;
    char line[256];
    FILE *f;

    if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur == RLIM_INFINITY) {
        return true;
    }
    f = fopen("/proc/self/status", "r");
    if (!f) {
        return false;
    }
    while (fgets(line, sizeof(line), f)) {
        if (sscanf(line, "CapEff: %llx", &eff) == 1) {
            break;
        }
    }
    fclose(f);
    return eff & (1ull << 14); /* CAP_IPC_LOCK */
}

/*
 * The bound on registered memory for this process: o->pinned_max, else
 * $RDMAX_RDMA_PINNED_MAX, else the defaults above, lowered to fit a finite
 * RLIMIT_MEMLOCK.
 */
static size_t rdma_pinned_budget(const struct rdmax_transport_opts *o, bool *explicit_bound)
{
    struct rlimit rl;
    size_t b;

    *explicit_bound = true;
    if (o && o->pinned_max) {
        return o->pinned_max;
    }
    b = rdma_env_size("RDMAX_RDMA_PINNED_MAX");
    if (b) {
        return b;
    }
    *explicit_bound = false;
    if (rdma_can_lock_freely()) {
        return RDMA_PINNED_DEFAULT_UNLOCKED;
    }
    b = RDMA_PINNED_DEFAULT;
    if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur < (rlim_t)b + RDMA_PINNED_HEADROOM) {
        b = rl.rlim_cur > 2 * RDMA_PINNED_HEADROOM ? rl.rlim_cur - RDMA_PINNED_HEADROOM
                                                   : rl.rlim_cur / 2;
    }
    return b;
}

/* Connections this process will likely open: control + one lane per CPU. */
static size_t rdma_conns_expected(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN) + 1;

    if (n < (long)RDMA_CONNS_EXPECTED_MIN) {
        return RDMA_CONNS_EXPECTED_MIN;
    }
    return n > (long)RDMA_CONNS_EXPECTED_MAX ? RDMA_CONNS_EXPECTED_MAX : (size_t)n;
}

static size_t rdma_msg_size(void)
{
    size_t v = rdma_env_size("RDMAX_RDMA_MSG_SIZE");

    if (!v) {
        return RDMA_MSG_SIZE_DEFAULT;
    }
    if (v < RDMA_MSG_SIZE_MIN) {
        v = RDMA_MSG_SIZE_MIN;
    }
    if (v > RDMA_MSG_SIZE_MAX) {
        v = RDMA_MSG_SIZE_MAX;
    }
    return (v + 4095) & ~(size_t)4095;
}

/*
 * Size this connection's pool and reserve it against the process bound:
 * bound / connections expected, split evenly between send and receive slots
 * (plus the credit reserve), RDMA_SLOTS_MIN..RDMA_SLOTS_WINDOW per direction
 * (RDMA_SLOTS_MAX when the bound was given). Slots shrink from 64 KiB towards
 * RDMA_MSG_SIZE_FLOOR when the share is small; when the bound is nearly used
 * up, later connections get fewer or smaller slots; below the minimum,
 * -ENOMEM with a message.
 */
static int rdma_pool_plan(struct rdma_conn *c, const struct rdmax_transport_opts *o, char *why,
                          size_t why_len)
{
    bool explicit_bound;
    size_t budget = rdma_pinned_budget(o, &explicit_bound);
    size_t msg = rdma_msg_size();
    size_t per_conn = budget / rdma_conns_expected();
    size_t used, need;
    unsigned n, n_max = explicit_bound ? RDMA_SLOTS_MAX : RDMA_SLOTS_WINDOW;

    while (msg > RDMA_MSG_SIZE_FLOOR && per_conn < (2 * RDMA_SLOTS_MIN + RDMA_RESERVE) * msg) {
        msg /= 2;
    }
    if (per_conn / msg < 2 * RDMA_SLOTS_MIN + RDMA_RESERVE) {
        n = RDMA_SLOTS_MIN;
    } else {
        n = (unsigned)((per_conn / msg - RDMA_RESERVE) / 2);
    }
    if (n > n_max) {
        n = n_max;
    }
    for (;;) {
        need = (size_t)(2 * n + RDMA_RESERVE) * msg;
        used = atomic_load(&rdma_pinned_total);
        if (used + need <= budget) {
            if (atomic_compare_exchange_weak(&rdma_pinned_total, &used, used + need)) {
                break;
            }
            continue;
        }
        if (n > RDMA_SLOTS_MIN) {
            n--;
            continue;
        }
        if (msg > RDMA_MSG_SIZE_FLOOR) {
            msg /= 2;
            continue;
        }
        snprintf(why, why_len,
                 "pinned-memory budget exhausted: %zu KiB of %zu KiB registered, "
                 "%zu KiB more needed for a connection: raise the bound (--rdma-pinned-max, "
                 "RDMAX_RDMA_PINNED_MAX)",
                 used / 1024, budget / 1024, need / 1024);
        return -ENOMEM;
    }
    c->pinned = need;
    c->msg_size = msg;
    c->n_send = n;
    c->n_data = n;
    c->n_recv = n + RDMA_RESERVE;
    c->credit_batch = n / 2 ? n / 2 : 1;
    c->mem_len = need;
    return 0;
}

static struct rdma_conn *rdma_conn_alloc(const struct rdmax_transport_opts *o)
{
    struct rdma_conn *c = calloc(1, sizeof(*c));
    pthread_condattr_t ca;

    if (!c) {
        return NULL;
    }
    c->base.ops = &rdmax_rdma_ops;
    c->busy_poll = (o && o->busy_poll) || rdma_env_size("RDMAX_RDMA_BUSY_POLL") > 0;
    c->state = RDMA_CONN_INIT;
    c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->wake_fd < 0) {
        g_warning("rdma: eventfd: %s", g_strerror(errno));
        free(c);
        return NULL;
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cond, &ca);
    pthread_condattr_destroy(&ca);
    return c;
}

/* Frees everything c holds, whatever stage its setup reached. */
static void rdma_conn_free(struct rdma_conn *c)
{
    if (!c) {
        return;
    }
    if (c->id && c->id->qp) {
        rdma_destroy_qp(c->id);
    }
    if (c->mr) {
        ibv_dereg_mr(c->mr);
    }
    free(c->mem);
    if (c->pinned) {
        atomic_fetch_sub(&rdma_pinned_total, c->pinned);
    }
    if (c->cq) {
        ibv_destroy_cq(c->cq);
    }
    if (c->cch) {
        ibv_destroy_comp_channel(c->cch);
    }
    if (c->pd) {
        ibv_dealloc_pd(c->pd);
    }
    if (c->id) {
        rdma_destroy_id(c->id);
    }
    if (c->ech) {
        rdma_destroy_event_channel(c->ech);
    }
    free(c->send_free);
    free(c->ready);
    free(c->recv_len);
    free(c->bounce);
    close(c->wake_fd);
    pthread_cond_destroy(&c->cond);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

static uint8_t *rdma_send_slot(struct rdma_conn *c, unsigned slot)
{
    return c->mem + (size_t)slot * c->msg_size;
}

static uint8_t *rdma_recv_slot(struct rdma_conn *c, unsigned slot)
{
    return c->mem + (size_t)(c->n_send + slot) * c->msg_size;
}

static int rdma_slot_post_recv(struct rdma_conn *c, unsigned slot)
{
    struct ibv_sge sge = {
        .addr = (uintptr_t)rdma_recv_slot(c, slot),
        .length = (uint32_t)c->msg_size,
        .lkey = c->mr->lkey,
    };
    struct ibv_recv_wr wr = {
        .wr_id = RDMA_WRID(RDMA_WR_RECV, slot),
        .sg_list = &sge,
        .num_sge = 1,
    };
    struct ibv_recv_wr *bad;
    int r = ibv_post_recv(c->id->qp, &wr, &bad);

    return r ? -r : 0;
}

/*
 * Everything a connection needs before rdma_connect()/rdma_accept(): PD,
 * completion channel + CQ, RC QP, the registered pool, and all receive WRs
 * posted. c->id must be bound to a device (id->verbs set).
 */
static int rdma_conn_setup(struct rdma_conn *c, const struct rdmax_transport_opts *o, char *why,
                           size_t why_len)
{
    struct ibv_qp_init_attr qa;
    char hint[320];
    int cqe, r;

    r = rdma_pool_plan(c, o, why, why_len);
    if (r < 0) {
        return r;
    }
    c->send_free = calloc(c->n_send, sizeof(*c->send_free));
    c->ready = calloc(c->n_recv, sizeof(*c->ready));
    c->recv_len = calloc(c->n_recv, sizeof(*c->recv_len));
    if (!c->send_free || !c->ready || !c->recv_len) {
        snprintf(why, why_len, "out of memory");
        return -ENOMEM;
    }
    for (unsigned i = 0; i < c->n_send; i++) {
        c->send_free[i] = c->n_send - 1 - i;
    }
    c->n_send_free = c->n_send;

    c->pd = ibv_alloc_pd(c->id->verbs);
    if (!c->pd) {
        r = rdma_errno();
        snprintf(why, why_len, "ibv_alloc_pd: %s", g_strerror(-r));
        return r;
    }
    c->cch = ibv_create_comp_channel(c->id->verbs);
    if (!c->cch) {
        r = rdma_errno();
        snprintf(why, why_len, "ibv_create_comp_channel: %s", g_strerror(-r));
        return r;
    }
    r = rdma_set_nonblock(c->cch->fd);
    if (r < 0) {
        snprintf(why, why_len, "fcntl(completion channel): %s", g_strerror(-r));
        return r;
    }
    cqe = (int)(c->n_send + RDMA_RESERVE + c->n_recv);
    c->cq = ibv_create_cq(c->id->verbs, cqe, c, c->cch, 0);
    if (!c->cq) {
        r = rdma_errno();
        snprintf(why, why_len, "ibv_create_cq(%d entries): %s", cqe, g_strerror(-r));
        return r;
    }
    r = ibv_req_notify_cq(c->cq, 0);
    if (r) {
        snprintf(why, why_len, "ibv_req_notify_cq: %s", g_strerror(r));
        return -r;
    }
    memset(&qa, 0, sizeof(qa));
    qa.send_cq = c->cq;
    qa.recv_cq = c->cq;
    qa.qp_type = IBV_QPT_RC;
    qa.sq_sig_all = 1;
    qa.cap.max_send_wr = c->n_send + RDMA_RESERVE;
    qa.cap.max_recv_wr = c->n_recv;
    qa.cap.max_send_sge = 1;
    qa.cap.max_recv_sge = 1;
    if (rdma_create_qp(c->id, c->pd, &qa)) {
        r = rdma_errno();
        snprintf(why, why_len, "rdma_create_qp(%u send, %u recv WRs): %s", c->n_send + RDMA_RESERVE,
                 c->n_recv, g_strerror(-r));
        return r;
    }
    r = posix_memalign((void **)&c->mem, 4096, c->mem_len);
    if (r) {
        c->mem = NULL;
        snprintf(why, why_len, "posix_memalign(%zu): %s", c->mem_len, g_strerror(r));
        return -r;
    }
    memset(c->mem, 0, c->mem_len);
    c->mr = ibv_reg_mr(c->pd, c->mem, c->mem_len, IBV_ACCESS_LOCAL_WRITE);
    if (!c->mr) {
        r = rdma_errno();
        if (r == -ENOMEM || r == -EPERM || r == -EFAULT || r == -EAGAIN) {
            rdma_memlock_hint(hint, sizeof(hint));
        } else {
            hint[0] = '\0';
        }
        snprintf(why, why_len, "ibv_reg_mr(%zu KiB): %s%s%s", c->mem_len / 1024, g_strerror(-r),
                 hint[0] ? "; " : "", hint);
        return r;
    }
    for (unsigned i = 0; i < c->n_recv; i++) {
        r = rdma_slot_post_recv(c, i);
        if (r < 0) {
            snprintf(why, why_len, "ibv_post_recv: %s", g_strerror(-r));
            return r;
        }
    }
    return 0;
}

static void rdma_hello_make(const struct rdma_conn *c, struct rdma_hello *h)
{
    memset(h, 0, sizeof(*h));
    h->magic = htonl(RDMA_HELLO_MAGIC);
    h->version = htons(RDMA_HELLO_VERSION);
    h->msg_size = htonl((uint32_t)c->msg_size);
    h->credits = htonl(c->n_data);
}

/* Validates the peer's hello (peer input) and takes its sizes. */
static int rdma_hello_take(struct rdma_conn *c, const void *data, size_t len, char *why,
                           size_t why_len)
{
    struct rdma_hello h;
    uint32_t msg, credits;

    if (!data || len < sizeof(h)) {
        snprintf(why, why_len, "peer sent no rdma-x hello (%zu bytes of private data)", len);
        return -EPROTO;
    }
    memcpy(&h, data, sizeof(h));
    if (ntohl(h.magic) != RDMA_HELLO_MAGIC) {
        snprintf(why, why_len, "peer is not rdma-x (hello magic 0x%x)", ntohl(h.magic));
        return -EPROTO;
    }
    if (ntohs(h.version) != RDMA_HELLO_VERSION) {
        snprintf(why, why_len, "peer speaks rdma transport version %u, we speak %u",
                 ntohs(h.version), RDMA_HELLO_VERSION);
        return -EPROTO;
    }
    msg = ntohl(h.msg_size);
    credits = ntohl(h.credits);
    if (msg < RDMA_MSG_SIZE_MIN || msg > RDMA_MSG_SIZE_MAX || credits < 1 ||
        credits > RDMA_SLOTS_MAX) {
        snprintf(why, why_len, "peer hello out of range (slot %u bytes, %u credits)", msg, credits);
        return -EPROTO;
    }
    c->send_max = msg < c->msg_size ? msg : c->msg_size;
    c->credits = credits;
    c->credits_max = credits;
    return 0;
}

static void rdma_name_peer(struct rdma_conn *c)
{
    struct sockaddr *sa = rdma_get_peer_addr(c->id);
    char h[INET6_ADDRSTRLEN], p[8];
    socklen_t sl;

    if (!sa) {
        return;
    }
    sl = sa->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6) : sizeof(struct sockaddr_in);
    if (getnameinfo(sa, sl, h, sizeof(h), p, sizeof(p), NI_NUMERICHOST | NI_NUMERICSERV) == 0) {
        snprintf(c->base.peer, sizeof(c->base.peer), "%s:%s", h, p);
    }
}

/* Records the first error of c and its reason, for the owner's message. */
static void G_GNUC_PRINTF(3, 4) rdma_fail_locked(struct rdma_conn *c, int err, const char *fmt, ...)
{
    va_list ap;
    char msg[256];

    if (c->error) {
        return;
    }
    c->error = err;
    c->state = RDMA_CONN_FAILED;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    snprintf(c->base.why, sizeof(c->base.why), "rdma: %.180s", msg);
    g_debug("rdma: %s: %s", rdma_peer_name(c), msg);
    pthread_cond_broadcast(&c->cond);
}

static int rdma_post_send_locked(struct rdma_conn *c, enum rdma_wr_kind kind, unsigned slot,
                                 size_t len)
{
    struct ibv_sge sge = {
        .addr = (uintptr_t)rdma_send_slot(c, slot),
        .length = (uint32_t)len,
        .lkey = c->mr->lkey,
    };
    struct ibv_send_wr wr = {
        .wr_id = RDMA_WRID(kind, slot),
        .sg_list = len ? &sge : NULL,
        .num_sge = len ? 1 : 0,
        .opcode = IBV_WR_SEND_WITH_IMM,
        .send_flags = IBV_SEND_SIGNALED,
        .imm_data = htonl(c->owed),
    };
    struct ibv_send_wr *bad;
    int r;

    r = ibv_post_send(c->id->qp, &wr, &bad);
    if (r) {
        rdma_fail_locked(c, -r, "ibv_post_send: %s", g_strerror(r));
        return -r;
    }
    c->owed = 0;
    c->send_inflight++;
    return 0;
}

/* Returns owed credits in a credit-only message when enough are owed. */
static void rdma_return_credits_locked(struct rdma_conn *c)
{
    if (c->owed < c->credit_batch || c->ctrl_inflight >= RDMA_RESERVE ||
        c->state != RDMA_CONN_CONNECTED) {
        return;
    }
    if (rdma_post_send_locked(c, RDMA_WR_CTRL, 0, 0) == 0) {
        c->ctrl_inflight++;
    }
}

static void rdma_complete_locked(struct rdma_conn *c, const struct ibv_wc *wc)
{
    unsigned kind = RDMA_WRID_KIND(wc->wr_id);
    unsigned slot = RDMA_WRID_SLOT(wc->wr_id);
    bool ok = wc->status == IBV_WC_SUCCESS;

    switch (kind) {
    case RDMA_WR_SEND:
        assert(slot < c->n_send && c->n_send_free < c->n_send);
        c->send_free[c->n_send_free++] = slot;
        c->send_inflight--;
        break;
    case RDMA_WR_CTRL:
        c->ctrl_inflight--;
        c->send_inflight--;
        break;
    case RDMA_WR_RECV:
        if (!ok) {
            break;
        }
        assert(slot < c->n_recv);
        if (wc->wc_flags & IBV_WC_WITH_IMM) {
            uint32_t got = ntohl(wc->imm_data);

            /* Peer input: never more than we offered in total. */
            if (got > c->credits_max || c->credits + got > c->credits_max) {
                rdma_fail_locked(c, -EPROTO, "peer returned %u credits, %u held of %u", got,
                                 c->credits, c->credits_max);
                return;
            }
            c->credits += got;
        }
        if (wc->byte_len == 0) {
            /* Credit-only: hand the WR straight back. */
            if (c->state == RDMA_CONN_CONNECTED) {
                int r = rdma_slot_post_recv(c, slot);

                if (r < 0) {
                    rdma_fail_locked(c, r, "ibv_post_recv: %s", g_strerror(-r));
                }
            }
            break;
        }
        if (wc->byte_len > c->msg_size || c->ready_count >= c->n_recv) {
            rdma_fail_locked(c, -EPROTO, "message of %u bytes overran the receive slots",
                             wc->byte_len);
            return;
        }
        c->recv_len[slot] = wc->byte_len;
        c->ready[(c->ready_head + c->ready_count) % c->n_recv] = slot;
        c->ready_count++;
        break;
    default:
        rdma_fail_locked(c, -EIO, "completion with unknown wr_id 0x%" PRIx64, wc->wr_id);
        return;
    }
    if (!ok) {
        /* Flushes after a disconnect or shutdown are expected; others are not. */
        if (wc->status == IBV_WC_WR_FLUSH_ERR &&
            (c->state == RDMA_CONN_PEER_CLOSED || c->shut || c->error)) {
            return;
        }
        rdma_fail_locked(c, -ECONNRESET, "%s completion failed: %s (vendor error 0x%x)",
                         kind == RDMA_WR_RECV ? "receive" : "send", ibv_wc_status_str(wc->status),
                         wc->vendor_err);
    }
}

/* Drains the CQ. Returns the number of completions handled, or -errno. */
static int rdma_progress_locked(struct rdma_conn *c)
{
    struct ibv_wc wc[RDMA_CQ_BATCH];
    int n, total = 0;

    if (c->spinning) {
        return 0; /* another thread owns the CQ right now */
    }
    for (;;) {
        n = ibv_poll_cq(c->cq, RDMA_CQ_BATCH, wc);
        if (n < 0) {
            rdma_fail_locked(c, -EIO, "ibv_poll_cq failed (%d)", n);
            return -EIO;
        }
        for (int i = 0; i < n; i++) {
            rdma_complete_locked(c, &wc[i]);
        }
        total += n;
        if (n < RDMA_CQ_BATCH) {
            break;
        }
    }
    if (total) {
        rdma_return_credits_locked(c);
        pthread_cond_broadcast(&c->cond);
    }
    return total;
}

static void rdma_cm_event_locked(struct rdma_conn *c)
{
    struct rdma_cm_event *ev;

    while (rdma_get_cm_event(c->ech, &ev) == 0) {
        switch (ev->event) {
        case RDMA_CM_EVENT_DISCONNECTED:
            if (c->state == RDMA_CONN_CONNECTED) {
                c->state = RDMA_CONN_PEER_CLOSED;
                g_debug("%s: peer disconnected", rdma_peer_name(c));
            }
            break;
        case RDMA_CM_EVENT_DEVICE_REMOVAL:
            rdma_fail_locked(c, -ENODEV, "RDMA device removed");
            break;
        case RDMA_CM_EVENT_ESTABLISHED:
            if (c->state == RDMA_CONN_INIT) {
                c->state = RDMA_CONN_CONNECTED;
            }
            break;
        default:
            g_debug("%s: cm event %s", rdma_peer_name(c), rdma_event_str(ev->event));
            break;
        }
        rdma_ack_cm_event(ev);
    }
    pthread_cond_broadcast(&c->cond);
}

static int rdma_cond_wait_locked(struct rdma_conn *c, int64_t deadline)
{
    struct timespec ts;
    int r;

    if (deadline == INT64_MAX) {
        pthread_cond_wait(&c->cond, &c->lock);
        return 0;
    }
    ts.tv_sec = deadline / 1000;
    ts.tv_nsec = (deadline % 1000) * 1000000;
    r = pthread_cond_timedwait(&c->cond, &c->lock, &ts);
    return r == ETIMEDOUT ? -ETIMEDOUT : 0;
}

/* Sleeps on the completion channel, the cm channel and the wake eventfd. */
static int rdma_sleep_locked(struct rdma_conn *c, int64_t deadline)
{
    struct pollfd pfd[3] = {
        {.fd = c->cch->fd, .events = POLLIN},
        {.fd = c->ech->fd, .events = POLLIN},
        {.fd = c->wake_fd, .events = POLLIN},
    };
    struct ibv_cq *ev_cq;
    void *ev_ctx;
    uint64_t v;
    int n, r;

    r = ibv_req_notify_cq(c->cq, 0);
    if (r) {
        rdma_fail_locked(c, -r, "ibv_req_notify_cq: %s", g_strerror(r));
        return -r;
    }
    /* Completions that came before the CQ was armed raise no event. */
    n = rdma_progress_locked(c);
    if (n != 0) {
        return n < 0 ? n : 0;
    }
    pthread_mutex_unlock(&c->lock);
    r = poll(pfd, 3, rdma_left_ms(deadline));
    if (r < 0) {
        r = errno == EINTR ? 0 : rdma_errno();
    }
    pthread_mutex_lock(&c->lock);
    if (r < 0) {
        rdma_fail_locked(c, r, "poll: %s", g_strerror(-r));
        return r;
    }
    if (pfd[0].revents) {
        if (ibv_get_cq_event(c->cch, &ev_cq, &ev_ctx) == 0) {
            ibv_ack_cq_events(ev_cq, 1);
        } else if (errno != EAGAIN) {
            r = rdma_errno();
            rdma_fail_locked(c, r, "ibv_get_cq_event: %s", g_strerror(-r));
            return r;
        }
    }
    if (pfd[1].revents) {
        rdma_cm_event_locked(c);
    }
    if (pfd[2].revents) {
        if (read(c->wake_fd, &v, sizeof(v)) < 0) {
            /* EAGAIN: another thread read it; nothing to do. */
        }
    }
    n = rdma_progress_locked(c);
    if (n < 0) {
        return n;
    }
    if (r == 0 && n == 0) {
        return -ETIMEDOUT;
    }
    return 0;
}

/*
 * Busy polling: spins on the CQ without c->lock (holding it would starve the
 * other thread of this connection, which could then never take the lock
 * between two spins), glancing at the cm channel now and then. While
 * c->spinning, only this thread polls the CQ, so completions are handled in
 * the order the CQ gives them.
 */
static int rdma_spin_locked(struct rdma_conn *c, int64_t deadline)
{
    struct pollfd pfd = {.fd = c->ech->fd, .events = POLLIN};
    struct ibv_wc wc[RDMA_CQ_BATCH];
    bool cm = false, late = false;
    int n;

    n = rdma_progress_locked(c);
    if (n != 0) {
        return n < 0 ? n : 0;
    }
    c->spinning = true;
    pthread_mutex_unlock(&c->lock);
    for (unsigned i = 1;; i++) {
        n = ibv_poll_cq(c->cq, RDMA_CQ_BATCH, wc);
        if (n != 0 || __atomic_load_n(&c->shut, __ATOMIC_RELAXED)) {
            break;
        }
        if ((i & 1023) == 0) {
            if (poll(&pfd, 1, 0) > 0) {
                cm = true;
                break;
            }
            if (rdma_left_ms(deadline) == 0) {
                late = true;
                break;
            }
            sched_yield();
        }
    }
    pthread_mutex_lock(&c->lock);
    c->spinning = false;
    if (n < 0) {
        rdma_fail_locked(c, -EIO, "ibv_poll_cq failed (%d)", n);
        return -EIO;
    }
    for (int k = 0; k < n; k++) {
        rdma_complete_locked(c, &wc[k]);
    }
    if (cm) {
        rdma_cm_event_locked(c);
    }
    n = rdma_progress_locked(c); /* the rest, credits, wake-ups */
    if (n < 0) {
        return n;
    }
    rdma_return_credits_locked(c);
    pthread_cond_broadcast(&c->cond);
    return late ? -ETIMEDOUT : 0;
}

/*
 * Waits until something happens on c (completions, a cm event, shutdown)
 * or the deadline passes. One thread at a time owns the CQ; another waits
 * on c->cond for it. Called and returns with c->lock held. Returns 0 (the
 * caller re-checks its condition), -ETIMEDOUT or a sticky error.
 */
static int rdma_wait_locked(struct rdma_conn *c, int64_t deadline)
{
    int r;

    if (c->polling) {
        return rdma_cond_wait_locked(c, deadline);
    }
    c->polling = true;
    r = c->busy_poll ? rdma_spin_locked(c, deadline) : rdma_sleep_locked(c, deadline);
    c->polling = false;
    pthread_cond_broadcast(&c->cond);
    return r;
}

/* Why c cannot send now: 0 when it can. */
static int rdma_send_state_locked(const struct rdma_conn *c)
{
    if (c->shut) {
        return -ECONNRESET;
    }
    if (c->error) {
        return c->error;
    }
    if (c->state != RDMA_CONN_CONNECTED) {
        return -ECONNRESET;
    }
    return 0;
}

/* ---- connection management ------------------------------------------------ */

/* Waits for the next cm event on ech until deadline. */
static int rdma_cm_next(struct rdma_event_channel *ech, int64_t deadline, struct rdma_cm_event **ev)
{
    struct pollfd pfd = {.fd = ech->fd, .events = POLLIN};
    int r, left;

    for (;;) {
        if (rdma_get_cm_event(ech, ev) == 0) {
            return 0;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            return rdma_errno();
        }
        left = rdma_left_ms(deadline);
        if (left == 0) {
            return -ETIMEDOUT;
        }
        r = poll(&pfd, 1, left);
        if (r < 0 && errno != EINTR) {
            return rdma_errno();
        }
    }
}

/*
 * Waits for the cm event `want` on c's channel. For ESTABLISHED on the
 * active side, takes the peer's hello from it. Maps failure events to
 * -errno with a reason in why.
 */
static int rdma_cm_expect(struct rdma_conn *c, enum rdma_cm_event_type want, bool take_hello,
                          int64_t deadline, const char *what, char *why, size_t why_len)
{
    struct rdma_cm_event *ev;
    int r, status;

    r = rdma_cm_next(c->ech, deadline, &ev);
    if (r == -ETIMEDOUT) {
        snprintf(why, why_len, "%s: timed out", what);
        return r;
    }
    if (r < 0) {
        snprintf(why, why_len, "rdma_get_cm_event: %s", g_strerror(-r));
        return r;
    }
    status = ev->status;
    if (ev->event == want) {
        r = 0;
        if (take_hello) {
            r = rdma_hello_take(c, ev->param.conn.private_data, ev->param.conn.private_data_len,
                                why, why_len);
        }
        rdma_ack_cm_event(ev);
        return r;
    }
    switch (ev->event) {
    case RDMA_CM_EVENT_ADDR_ERROR:
        r = status < 0 ? status : -EHOSTUNREACH;
        snprintf(why, why_len, "rdma_resolve_addr: %s (no RDMA device reaches the peer?)",
                 g_strerror(-r));
        break;
    case RDMA_CM_EVENT_ROUTE_ERROR:
        r = status < 0 ? status : -ENETUNREACH;
        snprintf(why, why_len, "rdma_resolve_route: %s", g_strerror(-r));
        break;
    case RDMA_CM_EVENT_REJECTED:
        r = -ECONNREFUSED;
        snprintf(why, why_len, "%s: rejected by peer (status %d%s)", what, status,
                 status == 8 ? ": nobody listens on that port" : "");
        break;
    case RDMA_CM_EVENT_UNREACHABLE:
        r = -ETIMEDOUT;
        snprintf(why, why_len, "%s: peer unreachable (status %d)", what, status);
        break;
    case RDMA_CM_EVENT_CONNECT_ERROR:
        r = -ECONNREFUSED;
        snprintf(why, why_len, "%s: connect error (status %d)", what, status);
        break;
    case RDMA_CM_EVENT_DISCONNECTED:
        r = -ECONNRESET;
        snprintf(why, why_len, "%s: disconnected", what);
        break;
    case RDMA_CM_EVENT_DEVICE_REMOVAL:
        r = -ENODEV;
        snprintf(why, why_len, "%s: RDMA device removed", what);
        break;
    default:
        r = -EPROTO;
        snprintf(why, why_len, "%s: unexpected cm event %s (status %d)", what,
                 rdma_event_str(ev->event), status);
        break;
    }
    rdma_ack_cm_event(ev);
    return r;
}

static void rdma_conn_param(struct rdma_conn_param *p, const struct rdma_hello *h)
{
    memset(p, 0, sizeof(*p));
    p->private_data = h;
    p->private_data_len = sizeof(*h);
    p->responder_resources = 0;
    p->initiator_depth = 0;
    p->retry_count = 7;
    p->rnr_retry_count = 7; /* infinite: a safety net, credits prevent RNR */
}

/* 0 when the system has at least one RDMA device, else -ENODEV with why. */
static int rdma_have_device(char *why, size_t why_len)
{
    struct ibv_context **list;
    int n = 0;

    list = rdma_get_devices(&n);
    if (list) {
        rdma_free_devices(list);
    }
    if (n <= 0) {
        snprintf(why, why_len, "no RDMA device found (rdma_get_devices; is the driver loaded?)");
        return -ENODEV;
    }
    return 0;
}

static int rdma_channel_new(struct rdma_event_channel **out, char *why, size_t why_len)
{
    struct rdma_event_channel *ech = rdma_create_event_channel();
    int r;

    if (!ech) {
        r = rdma_errno();
        if (r == -ENOENT || r == -ENODEV) {
            r = -ENODEV;
        }
        snprintf(why, why_len, "rdma_create_event_channel: %s%s", g_strerror(-r),
                 r == -ENODEV ? " (rdma_ucm not loaded?)" : "");
        return r;
    }
    r = rdma_set_nonblock(ech->fd);
    if (r < 0) {
        snprintf(why, why_len, "fcntl(cm channel): %s", g_strerror(-r));
        rdma_destroy_event_channel(ech);
        return r;
    }
    *out = ech;
    return 0;
}

/* One attempt to connect to dst; on failure c is freed and why says why. */
static int rdma_connect_once(const struct sockaddr *dst, const struct rdmax_transport_opts *o,
                             int64_t deadline, struct rdma_conn **out, char *why, size_t why_len)
{
    struct rdma_conn_param param;
    struct rdma_hello hello;
    struct rdma_conn *c;
    int64_t step;
    int r;

    c = rdma_conn_alloc(o);
    if (!c) {
        snprintf(why, why_len, "out of memory");
        return -ENOMEM;
    }
    r = rdma_channel_new(&c->ech, why, why_len);
    if (r < 0) {
        goto err_free;
    }
    if (rdma_create_id(c->ech, &c->id, c, RDMA_PS_TCP)) {
        r = rdma_errno();
        snprintf(why, why_len, "rdma_create_id: %s", g_strerror(-r));
        goto err_free;
    }
    step = rdma_now_ms() + RDMA_RESOLVE_MS;
    if (rdma_resolve_addr(c->id, NULL, (struct sockaddr *)dst, RDMA_RESOLVE_MS)) {
        r = rdma_errno();
        snprintf(why, why_len, "rdma_resolve_addr: %s", g_strerror(-r));
        goto err_free;
    }
    r = rdma_cm_expect(c, RDMA_CM_EVENT_ADDR_RESOLVED, false, step + 500, "rdma_resolve_addr", why,
                       why_len);
    if (r < 0) {
        goto err_free;
    }
    step = rdma_now_ms() + RDMA_RESOLVE_MS;
    if (rdma_resolve_route(c->id, RDMA_RESOLVE_MS)) {
        r = rdma_errno();
        snprintf(why, why_len, "rdma_resolve_route: %s", g_strerror(-r));
        goto err_free;
    }
    r = rdma_cm_expect(c, RDMA_CM_EVENT_ROUTE_RESOLVED, false, step + 500, "rdma_resolve_route",
                       why, why_len);
    if (r < 0) {
        goto err_free;
    }
    r = rdma_conn_setup(c, o, why, why_len);
    if (r < 0) {
        goto err_free;
    }
    rdma_hello_make(c, &hello);
    rdma_conn_param(&param, &hello);
    if (rdma_connect(c->id, &param)) {
        r = rdma_errno();
        snprintf(why, why_len, "rdma_connect: %s", g_strerror(-r));
        goto err_free;
    }
    step = rdma_now_ms() + RDMA_ESTABLISH_MS;
    r = rdma_cm_expect(c, RDMA_CM_EVENT_ESTABLISHED, true, step < deadline ? deadline : step,
                       "rdma_connect", why, why_len);
    if (r < 0) {
        goto err_free;
    }
    c->state = RDMA_CONN_CONNECTED;
    rdma_name_peer(c);
    *out = c;
    return 0;

err_free:
    rdma_conn_free(c);
    return r;
}

static bool rdma_connect_retriable(int r)
{
    return r == -ECONNREFUSED || r == -ETIMEDOUT || r == -ECONNRESET;
}

/* Why listen/connect failed: into the caller's buffer, else a warning. */
static void G_GNUC_PRINTF(5, 6) rdma_why(const struct rdmax_transport_opts *o, const char *verb,
                                         const char *host, const char *port, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    if (o && o->why && o->why_len) {
        vsnprintf(o->why, o->why_len, fmt, ap);
    } else {
        gchar *msg = g_strdup_vprintf(fmt, ap);
        g_warning("rdma: %s %s:%s: %s", verb, host, port, msg);
        g_free(msg);
    }
    va_end(ap);
}

static int rdma_op_connect(const char *host, const char *port, const struct rdmax_transport_opts *o,
                           struct rdmax_conn **out)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    struct addrinfo *res, *ai;
    struct rdma_conn *c = NULL;
    char why[512] = "";
    int64_t deadline;
    int r, tmo;

    tmo = o && o->connect_timeout_ms > 0 ? o->connect_timeout_ms : RDMA_CONNECT_DEFAULT_MS;
    deadline = rdma_now_ms() + tmo;
    r = rdma_have_device(why, sizeof(why));
    if (r < 0) {
        rdma_why(o, "connect", host, port, "%s", why);
        return r;
    }
    r = getaddrinfo(host, port, &hints, &res);
    if (r != 0) {
        rdma_why(o, "connect", host, port, "getaddrinfo: %s", gai_strerror(r));
        return r == EAI_SYSTEM ? rdma_errno() : -EHOSTUNREACH;
    }
    for (;;) {
        for (ai = res; ai; ai = ai->ai_next) {
            r = rdma_connect_once(ai->ai_addr, o, deadline, &c, why, sizeof(why));
            if (r == 0 || !rdma_connect_retriable(r)) {
                break;
            }
        }
        if (r == 0 || !rdma_connect_retriable(r) || rdma_left_ms(deadline) == 0) {
            break;
        }
        g_debug("connect %s:%s: %s; retrying", host, port, why);
        usleep(RDMA_RETRY_MS * 1000);
    }
    freeaddrinfo(res);
    if (r < 0) {
        rdma_why(o, "connect", host, port, "%s", why);
        return r;
    }
    g_debug("connected to %s: %u send slots, %u credits of %zu bytes", c->base.peer, c->n_send,
            c->credits, c->send_max);
    *out = &c->base;
    return 0;
}

static int rdma_op_listen(const char *host, const char *port, const struct rdmax_transport_opts *o,
                          struct rdmax_listener **out)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *res;
    struct rdma_listener *l;
    char why[320] = "";
    int r;

    r = rdma_have_device(why, sizeof(why));
    if (r < 0) {
        rdma_why(o, "listen", host, port, "%s", why);
        return r;
    }
    r = getaddrinfo(host, port, &hints, &res);
    if (r != 0) {
        rdma_why(o, "listen", host, port, "getaddrinfo: %s", gai_strerror(r));
        return r == EAI_SYSTEM ? rdma_errno() : -EADDRNOTAVAIL;
    }
    l = calloc(1, sizeof(*l));
    if (!l) {
        r = -ENOMEM;
        goto err_res;
    }
    l->base.ops = &rdmax_rdma_ops;
    if (o) {
        l->opts = *o;
        l->opts.why = NULL; /* the caller's buffer is for this call only */
        l->opts.why_len = 0;
    }
    snprintf(l->where, sizeof(l->where), "%s:%s", host, port);
    r = rdma_channel_new(&l->ech, why, sizeof(why));
    if (r < 0) {
        goto err_free;
    }
    if (rdma_create_id(l->ech, &l->id, l, RDMA_PS_TCP)) {
        r = rdma_errno();
        snprintf(why, sizeof(why), "rdma_create_id: %s", g_strerror(-r));
        goto err_channel;
    }
    if (rdma_bind_addr(l->id, res->ai_addr)) {
        r = rdma_errno();
        snprintf(why, sizeof(why), "rdma_bind_addr: %s%s", g_strerror(-r),
                 r == -EADDRNOTAVAIL || r == -ENODEV ? " (no RDMA device has this address)" : "");
        goto err_id;
    }
    if (rdma_listen(l->id, 64)) {
        r = rdma_errno();
        snprintf(why, sizeof(why), "rdma_listen: %s", g_strerror(-r));
        goto err_id;
    }
    freeaddrinfo(res);
    *out = &l->base;
    return 0;

err_id:
    rdma_destroy_id(l->id);
err_channel:
    rdma_destroy_event_channel(l->ech);
err_free:
    free(l);
err_res:
    freeaddrinfo(res);
    rdma_why(o, "listen", host, port, "%s", why[0] ? why : g_strerror(-r));
    return r;
}

/* Sets up and accepts the connection request on id (taken over by c). */
static int rdma_accept_one(struct rdma_listener *l, struct rdma_cm_id *id,
                           const struct rdma_hello *peer, size_t peer_len, struct rdma_conn **out,
                           char *why, size_t why_len)
{
    struct rdma_conn_param param;
    struct rdma_hello hello;
    struct rdma_conn *c;
    int r;

    c = rdma_conn_alloc(&l->opts);
    if (!c) {
        snprintf(why, why_len, "out of memory");
        r = -ENOMEM;
        goto err_reject;
    }
    r = rdma_channel_new(&c->ech, why, why_len);
    if (r < 0) {
        goto err_free;
    }
    if (rdma_migrate_id(id, c->ech)) {
        r = rdma_errno();
        snprintf(why, why_len, "rdma_migrate_id: %s", g_strerror(-r));
        goto err_free;
    }
    c->id = id;
    id->context = c;
    rdma_name_peer(c);
    r = rdma_conn_setup(c, &l->opts, why, why_len);
    if (r < 0) {
        goto err_reject_conn;
    }
    r = rdma_hello_take(c, peer, peer_len, why, why_len);
    if (r < 0) {
        goto err_reject_conn;
    }
    rdma_hello_make(c, &hello);
    rdma_conn_param(&param, &hello);
    if (rdma_accept(c->id, &param)) {
        r = rdma_errno();
        snprintf(why, why_len, "rdma_accept: %s", g_strerror(-r));
        goto err_free_conn;
    }
    r = rdma_cm_expect(c, RDMA_CM_EVENT_ESTABLISHED, false, rdma_now_ms() + RDMA_ESTABLISH_MS,
                       "rdma_accept", why, why_len);
    if (r < 0) {
        goto err_free_conn;
    }
    c->state = RDMA_CONN_CONNECTED;
    *out = c;
    return 0;

err_reject_conn:
    rdma_reject(c->id, NULL, 0);
err_free_conn:
    rdma_conn_free(c);
    return r;
err_free:
    rdma_conn_free(c);
err_reject:
    rdma_reject(id, NULL, 0);
    rdma_destroy_id(id);
    return r;
}

static int rdma_op_accept(struct rdmax_listener *base, int timeout_ms, struct rdmax_conn **out)
{
    struct rdma_listener *l = (struct rdma_listener *)base;
    int64_t deadline = rdma_deadline(timeout_ms);
    unsigned char pdata[256];
    struct rdma_cm_event *ev;
    struct rdma_conn *c = NULL;
    struct rdma_cm_id *id;
    char why[512] = "";
    size_t plen;
    int r;

    for (;;) {
        r = rdma_cm_next(l->ech, deadline, &ev);
        if (r == -ETIMEDOUT) {
            return r;
        }
        if (r < 0) {
            snprintf(base->why, sizeof(base->why), "rdma_get_cm_event: %s", g_strerror(-r));
            return r;
        }
        if (ev->event != RDMA_CM_EVENT_CONNECT_REQUEST) {
            r = ev->event == RDMA_CM_EVENT_DEVICE_REMOVAL ? -ENODEV : 0;
            g_debug("accept on %s: cm event %s", l->where, rdma_event_str(ev->event));
            rdma_ack_cm_event(ev);
            if (r < 0) {
                snprintf(base->why, sizeof(base->why), "RDMA device removed");
                return r;
            }
            continue;
        }
        id = ev->id;
        plen = ev->param.conn.private_data_len;
        if (plen > sizeof(pdata)) {
            plen = sizeof(pdata);
        }
        if (ev->param.conn.private_data) {
            memcpy(pdata, ev->param.conn.private_data, plen);
        } else {
            plen = 0;
        }
        /* rdma_migrate_id() waits until the request event is acked. */
        rdma_ack_cm_event(ev);
        r = rdma_accept_one(l, id, (const struct rdma_hello *)pdata, plen, &c, why, sizeof(why));
        if (r == 0) {
            break;
        }
        /*
         * That one connection failed (not rdma-x, rejected, no memory to
         * pin for it, never established): it is turned away, the caller
         * hears why, and the listener keeps listening, so one bad client
         * cannot end the receiver.
         */
        snprintf(base->why, sizeof(base->why), "%s", why);
        return -ECONNABORTED;
    }
    g_debug("accepted %s: %u send slots, %u credits of %zu bytes", c->base.peer, c->n_send,
            c->credits, c->send_max);
    *out = &c->base;
    return 0;
}

static void rdma_op_listener_close(struct rdmax_listener *base)
{
    struct rdma_listener *l = (struct rdma_listener *)base;
    struct rdma_cm_event *ev;

    if (!l) {
        return;
    }
    /* Turn away requests that were queued but never accepted. */
    while (rdma_get_cm_event(l->ech, &ev) == 0) {
        struct rdma_cm_id *id = ev->event == RDMA_CM_EVENT_CONNECT_REQUEST ? ev->id : NULL;

        rdma_ack_cm_event(ev);
        if (id) {
            rdma_reject(id, NULL, 0);
            rdma_destroy_id(id);
        }
    }
    rdma_destroy_id(l->id);
    rdma_destroy_event_channel(l->ech);
    free(l);
}

/* ---- data path ------------------------------------------------------------ */

static int rdma_op_send(struct rdmax_conn *base, const struct iovec *iov, int iovcnt)
{
    struct rdma_conn *c = rdma_conn_of(base);
    size_t left = 0, off = 0, len, n;
    unsigned slot;
    uint8_t *dst;
    int i = 0, r = 0;

    for (int k = 0; k < iovcnt; k++) {
        left += iov[k].iov_len;
    }
    pthread_mutex_lock(&c->lock);
    while (left > 0) {
        /* Reap completions: frees send slots and collects credits. */
        r = rdma_progress_locked(c);
        if (r < 0) {
            break;
        }
        while ((r = rdma_send_state_locked(c)) == 0 && (c->credits == 0 || c->n_send_free == 0)) {
            r = rdma_wait_locked(c, INT64_MAX);
            if (r < 0) {
                break;
            }
        }
        if (r < 0) {
            break;
        }
        slot = c->send_free[--c->n_send_free];
        c->credits--;
        len = left < c->send_max ? left : c->send_max;

        /* The slot is ours until posted: copy without the lock. */
        pthread_mutex_unlock(&c->lock);
        dst = rdma_send_slot(c, slot);
        for (size_t done = 0; done < len; done += n) {
            while (iov[i].iov_len == off) {
                i++;
                off = 0;
            }
            n = iov[i].iov_len - off;
            if (n > len - done) {
                n = len - done;
            }
            memcpy(dst + done, (const uint8_t *)iov[i].iov_base + off, n);
            off += n;
        }
        pthread_mutex_lock(&c->lock);

        r = rdma_send_state_locked(c);
        if (r == 0) {
            r = rdma_post_send_locked(c, RDMA_WR_SEND, slot, len);
        }
        if (r < 0) {
            c->send_free[c->n_send_free++] = slot;
            break;
        }
        left -= len;
    }
    pthread_mutex_unlock(&c->lock);
    return r < 0 ? r : 0;
}

/* The receiving thread is done with slot: post it again, owe a credit. */
static void rdma_repost_locked(struct rdma_conn *c, unsigned slot)
{
    int r;

    if (c->state != RDMA_CONN_CONNECTED) {
        return;
    }
    r = rdma_slot_post_recv(c, slot);
    if (r < 0) {
        rdma_fail_locked(c, r, "ibv_post_recv: %s", g_strerror(-r));
        return;
    }
    c->owed++;
    rdma_return_credits_locked(c);
}

static int rdma_op_recv(struct rdmax_conn *base, void *buf, size_t len, int timeout_ms)
{
    struct rdma_conn *c = rdma_conn_of(base);
    int64_t deadline = rdma_deadline(timeout_ms);
    uint8_t *out = buf;
    const uint8_t *src;
    unsigned slot;
    size_t n;
    int r = 0;

    pthread_mutex_lock(&c->lock);
    while (len > 0) {
        if (c->shut) {
            r = -ECONNRESET;
            break;
        }
        if (c->ready_count == 0) {
            r = rdma_progress_locked(c);
            if (r < 0 && c->ready_count == 0) {
                break;
            }
            r = 0;
        }
        if (c->ready_count > 0) {
            slot = c->ready[c->ready_head];
            src = rdma_recv_slot(c, slot) + c->ready_off;
            n = c->recv_len[slot] - c->ready_off;
            if (n > len) {
                n = len;
            }
            /* The head slot is ours until re-posted: copy without the lock. */
            pthread_mutex_unlock(&c->lock);
            memcpy(out, src, n);
            pthread_mutex_lock(&c->lock);
            out += n;
            len -= n;
            c->ready_off += n;
            if (c->ready_off == c->recv_len[slot]) {
                c->ready_head = (c->ready_head + 1) % c->n_recv;
                c->ready_count--;
                c->ready_off = 0;
                rdma_repost_locked(c, slot);
            }
            deadline = rdma_deadline(timeout_ms);
            continue;
        }
        if (c->error) {
            r = c->error;
            break;
        }
        if (c->state != RDMA_CONN_CONNECTED) {
            r = -ECONNRESET;
            break;
        }
        r = rdma_wait_locked(c, deadline);
        if (r < 0 && (r == -ETIMEDOUT || c->ready_count == 0)) {
            break;
        }
        r = 0;
    }
    pthread_mutex_unlock(&c->lock);
    return r;
}

/* Until a receive slot holds data (0), or the error recv would return. */
static int rdma_rx_wait_locked(struct rdma_conn *c, int64_t deadline)
{
    int r;

    for (;;) {
        if (c->shut) {
            return -ECONNRESET;
        }
        if (c->ready_count == 0) {
            r = rdma_progress_locked(c);
            if (r < 0 && c->ready_count == 0) {
                return r;
            }
        }
        if (c->ready_count > 0) {
            return 0;
        }
        if (c->error) {
            return c->error;
        }
        if (c->state != RDMA_CONN_CONNECTED) {
            return -ECONNRESET;
        }
        r = rdma_wait_locked(c, deadline);
        if (r < 0 && (r == -ETIMEDOUT || c->ready_count == 0)) {
            return r;
        }
    }
}

static int rdma_op_rx_next(struct rdmax_conn *base, size_t len, uint8_t **out, int timeout_ms)
{
    struct rdma_conn *c = rdma_conn_of(base);
    int r;

    if (len > RDMAX_RX_LEND_MAX) {
        return -EMSGSIZE;
    }
    if (!c->bounced) {
        pthread_mutex_lock(&c->lock);
        r = rdma_rx_wait_locked(c, rdma_deadline(timeout_ms));
        if (r == 0) {
            unsigned slot = c->ready[c->ready_head];

            if (c->recv_len[slot] - c->ready_off >= len) {
                /* In place: the head slot stays the receiving thread's until rx_release. */
                *out = rdma_recv_slot(c, slot) + c->ready_off;
                pthread_mutex_unlock(&c->lock);
                return 0;
            }
        }
        pthread_mutex_unlock(&c->lock);
        if (r < 0) {
            return r;
        }
        /* Longer than the head slot's rest: gather it (recv consumes from ready_off on). */
        c->bounced = true;
        c->bounce_len = 0;
    }
    if (c->bounce_cap < len) {
        uint8_t *b = realloc(c->bounce, len);

        if (!b) {
            return -ENOMEM;
        }
        c->bounce = b;
        c->bounce_cap = len;
    }
    if (c->bounce_len < len) {
        r = rdma_op_recv(base, c->bounce + c->bounce_len, len - c->bounce_len, timeout_ms);
        if (r < 0) {
            return r;
        }
        c->bounce_len = len;
    }
    *out = c->bounce;
    return 0;
}

static void rdma_op_rx_release(struct rdmax_conn *base, size_t len)
{
    struct rdma_conn *c = rdma_conn_of(base);
    unsigned slot;

    if (c->bounced) {
        /* Its slots went back when the bytes were gathered. */
        if (len < c->bounce_len) {
            memmove(c->bounce, c->bounce + len, c->bounce_len - len);
            c->bounce_len -= len;
        } else {
            c->bounced = false;
            c->bounce_len = 0;
        }
        return;
    }
    pthread_mutex_lock(&c->lock);
    if (len > 0 && c->ready_count > 0) {
        slot = c->ready[c->ready_head];
        c->ready_off += len;
        if (c->ready_off >= c->recv_len[slot]) {
            c->ready_head = (c->ready_head + 1) % c->n_recv;
            c->ready_count--;
            c->ready_off = 0;
            rdma_repost_locked(c, slot);
        }
    }
    pthread_mutex_unlock(&c->lock);
}

static void rdma_op_shutdown(struct rdmax_conn *base)
{
    struct rdma_conn *c = rdma_conn_of(base);
    uint64_t one = 1;

    pthread_mutex_lock(&c->lock);
    __atomic_store_n(&c->shut, true, __ATOMIC_RELAXED); /* read unlocked by a spinner */
    pthread_cond_broadcast(&c->cond);
    pthread_mutex_unlock(&c->lock);
    if (write(c->wake_fd, &one, sizeof(one)) < 0) {
        /* The counter is already non-zero: the poller wakes anyway. */
    }
}

static void rdma_op_close(struct rdmax_conn *base)
{
    struct rdma_conn *c;
    int64_t deadline;

    if (!base) {
        return;
    }
    c = rdma_conn_of(base);
    pthread_mutex_lock(&c->lock);
    /* Let posted sends reach the peer before the QP goes away. */
    deadline = rdma_now_ms() + RDMA_DRAIN_MS;
    while (c->send_inflight > 0 && c->state == RDMA_CONN_CONNECTED && !c->error) {
        if (rdma_left_ms(deadline) == 0) {
            /* The session knows from FIN_ACK whether it mattered. */
            g_debug("rdma: %s: %u sends still unacknowledged at close", rdma_peer_name(c),
                    c->send_inflight);
            break;
        }
        if (c->busy_poll) {
            rdma_spin_locked(c, deadline);
        } else {
            rdma_sleep_locked(c, deadline);
        }
    }
    pthread_mutex_unlock(&c->lock);
    if (c->state != RDMA_CONN_INIT) {
        rdma_disconnect(c->id);
    }
    rdma_conn_free(c);
}

const struct rdmax_transport_ops rdmax_rdma_ops = {
    .name = "rdma",
    .listen = rdma_op_listen,
    .accept = rdma_op_accept,
    .listener_close = rdma_op_listener_close,
    .connect = rdma_op_connect,
    .send = rdma_op_send,
    .recv = rdma_op_recv,
    .rx_next = rdma_op_rx_next,
    .rx_release = rdma_op_rx_release,
    .shutdown = rdma_op_shutdown,
    .close = rdma_op_close,
};
