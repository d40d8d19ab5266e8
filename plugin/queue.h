/*
 * Bounded single-producer single-consumer ring of fixed-size slots. The
 * producer fills a slot in place (reserve, write, commit) and the consumer
 * reads it in place (peek, read, release), so pages are copied once.
 * Every queue in rdma-x is one of these: when one is full, its producer
 * blocks, and the back-pressure reaches QEMU's writes.
 */
#ifndef RDMAX_QUEUE_H
#define RDMAX_QUEUE_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct rdmax_ring {
    pthread_mutex_t mu;
    pthread_cond_t not_empty;
    pthread_cond_t not_full;
    uint8_t *mem;     /* cap * slot_size bytes, set at init */
    size_t slot_size; /* set at init, read-only */
    size_t cap;       /* set at init, read-only */
    size_t head;      /* protected by mu */
    size_t count;     /* protected by mu */
    bool closed;      /* protected by mu: producer finished (or abort) */
};

int rdmax_ring_init(struct rdmax_ring *r, size_t slot_size, size_t cap);
void rdmax_ring_destroy(struct rdmax_ring *r);

/* Producer: a free slot, blocking while full; NULL when try and full. */
void *rdmax_ring_reserve(struct rdmax_ring *r, bool try);
void rdmax_ring_commit(struct rdmax_ring *r);

/* Consumer: the oldest slot, blocking while empty; NULL when try and empty, or when closed and empty. */
void *rdmax_ring_peek(struct rdmax_ring *r, bool try);
void rdmax_ring_release(struct rdmax_ring *r);

/* No more items will come; wakes the consumer. */
void rdmax_ring_close(struct rdmax_ring *r);
bool rdmax_ring_closed_and_empty(struct rdmax_ring *r);
size_t rdmax_ring_count(struct rdmax_ring *r);

#endif
