/*
 * Intake: QEMU's stream is read into a small pool of fixed-size blocks and
 * parsed where it lies; pages go to the lanes by reference (a pointer into
 * a block and the block itself), not copied into ring slots. A block goes
 * back to the pool when the reader has moved past it and every lane has
 * taken the pages it holds.
 *
 * Ownership: the reader (one thread) gets blocks, fills and parses them;
 * every reference it hands out holds the block (rdmax_in_block_hold); the
 * holder of a reference drops it with rdmax_in_block_drop once it has
 * copied the page (the lane encoder copies it into its batch and cache).
 * Drops may come from any thread.
 *
 * Memory: nblocks * block_size bytes, allocated at create: this bounds the
 * raw bytes rdma-x holds between QEMU's pipe and the lane encoders.
 */
#ifndef RDMAX_INTAKE_H
#define RDMAX_INTAKE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct rdmax_intake;

struct rdmax_in_block {
    uint8_t *data;             /* block_size bytes; set at create */
    _Atomic unsigned refs;     /* 0: free in the pool */
    struct rdmax_intake *pool; /* set at create */
};

struct rdmax_intake {
    size_t block_size;            /* set at create, read-only */
    unsigned nblocks;             /* set at create, read-only */
    struct rdmax_in_block *block; /* nblocks */
    uint8_t *mem;
    _Atomic bool waiting; /* the reader is (about to be) waiting for a free block */
    _Atomic bool aborted; /* rdmax_intake_abort: get returns NULL */
    pthread_mutex_t mu;   /* only for waiting */
    pthread_cond_t cv;
};

/* 0 or -ENOMEM. */
int rdmax_intake_create(size_t block_size, unsigned nblocks, struct rdmax_intake **out);
/* Accepts NULL. No reference may be outstanding. */
void rdmax_intake_destroy(struct rdmax_intake *in);

/*
 * Reader: a free block, held once (the reader's own reference); NULL when
 * try and none is free, else waits until a lane drops one; NULL once the
 * intake is aborted.
 */
struct rdmax_in_block *rdmax_intake_get(struct rdmax_intake *in, bool try);

/* The pipeline failed: wake a reader waiting for a block. Any thread. */
void rdmax_intake_abort(struct rdmax_intake *in);

/* Another reference to a block the caller holds. */
static inline void rdmax_in_block_hold(struct rdmax_in_block *b)
{
    atomic_fetch_add_explicit(&b->refs, 1, memory_order_relaxed);
}

/* Drop n references (n >= 1); the last one returns the block to the pool. Any thread. */
void rdmax_in_block_drop_n(struct rdmax_in_block *b, unsigned n);

/* Drop a reference. */
static inline void rdmax_in_block_drop(struct rdmax_in_block *b)
{
    rdmax_in_block_drop_n(b, 1);
}

#endif
