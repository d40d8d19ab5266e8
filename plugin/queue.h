/*
 * Bounded single-producer single-consumer ring of fixed-size slots. The
 * producer fills a slot in place (reserve, write, commit) and the consumer
 * reads it in place (peek, read, release), so pages are copied once.
 * Every queue in rdma-x is one of these: when one is full, its producer
 * blocks, and the back-pressure reaches QEMU's writes.
 *
 * The indices are atomics, so the hot path takes no lock; a side sleeps on
 * the mutex/condvar only when the ring is empty (consumer) or full
 * (producer), and the other side signals only when it sees a sleeper.
 * A per-page lock and wake-up cost more than the page's encoding.
 */
#ifndef RDMAX_QUEUE_H
#define RDMAX_QUEUE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct rdmax_ring {
    uint8_t *mem;            /* cap * slot_size bytes, set at init */
    size_t slot_size;        /* set at init, read-only */
    size_t cap;              /* set at init, read-only */
    _Atomic size_t head;     /* next slot to read; written by the consumer */
    _Atomic size_t tail;     /* next slot to fill; written by the producer */
    _Atomic bool closed;     /* producer finished */
    _Atomic bool aborted;    /* rdmax_ring_abort: nothing more moves either way */
    _Atomic bool cons_sleep; /* consumer is (about to be) waiting on cv */
    _Atomic bool prod_sleep; /* producer is (about to be) waiting on cv */
    _Atomic size_t want;     /* the sleeping consumer waits for this many slots */
    _Atomic bool kick;       /* producer: "act on what you have" (rdmax_ring_kick) */
    pthread_mutex_t mu;      /* only for sleeping */
    pthread_cond_t cv;
};

int rdmax_ring_init(struct rdmax_ring *r, size_t slot_size, size_t cap);
void rdmax_ring_destroy(struct rdmax_ring *r);

/* Producer: a free slot, blocking while full; NULL when try and full, or aborted. */
void *rdmax_ring_reserve(struct rdmax_ring *r, bool try);
void rdmax_ring_commit(struct rdmax_ring *r);

/*
 * Consumer: the oldest slot, blocking while empty; NULL when try and empty,
 * when closed and empty, or when aborted.
 */
void *rdmax_ring_peek(struct rdmax_ring *r, bool try);
void rdmax_ring_release(struct rdmax_ring *r);

/*
 * Consumer: the oldest slot once at least `want` are filled, the producer
 * kicked, or the ring closed; NULL when closed and empty, when kicked
 * and empty, or when aborted. A consumer that batches sleeps through the producer's first
 * want - 1 commits instead of waking for each.
 */
void *rdmax_ring_peek_wait(struct rdmax_ring *r, size_t want);

/*
 * Producer: wake the consumer to act on what it has (say, send a partial
 * batch) because the producer is about to wait itself.
 */
void rdmax_ring_kick(struct rdmax_ring *r);
/* Consumer: whether the producer kicked since the last call (clears it). */
bool rdmax_ring_kicked(struct rdmax_ring *r);

/*
 * Consumer, without waiting: the i-th filled slot after the oldest (0 is
 * the one peek returns), or NULL when fewer are filled. Lets a consumer
 * hold several slots (say, to write them out with one writev) and release
 * them together with rdmax_ring_release_n.
 */
void *rdmax_ring_peek_at(struct rdmax_ring *r, size_t i);
void rdmax_ring_release_n(struct rdmax_ring *r, size_t n);

/* No more items will come; wakes the consumer. */
void rdmax_ring_close(struct rdmax_ring *r);
bool rdmax_ring_closed_and_empty(struct rdmax_ring *r);

/*
 * The pipeline failed: wake both sides and make every further (and every
 * blocked) reserve, peek and peek_wait return NULL, whatever the ring
 * holds. Any thread, any number of times. The callers then see the
 * session's sticky error (session.h) and unwind.
 */
void rdmax_ring_abort(struct rdmax_ring *r);
bool rdmax_ring_aborted(struct rdmax_ring *r);
size_t rdmax_ring_count(struct rdmax_ring *r);

#endif
