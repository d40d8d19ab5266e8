#include "intake.h"

#include <errno.h>
#include <stdlib.h>

int rdmax_intake_create(size_t block_size, unsigned nblocks, struct rdmax_intake **out)
{
    struct rdmax_intake *in = calloc(1, sizeof(*in));

    if (!in) {
        return -ENOMEM;
    }
    in->block_size = block_size;
    in->nblocks = nblocks;
    in->block = calloc(nblocks, sizeof(*in->block));
    /* Page-aligned: the lane encoder copies whole pages out of it. */
    if (!in->block || posix_memalign((void **)&in->mem, 4096, block_size * nblocks) != 0) {
        free(in->block);
        free(in);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < nblocks; i++) {
        in->block[i].data = in->mem + (size_t)i * block_size;
        atomic_init(&in->block[i].refs, 0);
        in->block[i].pool = in;
    }
    atomic_init(&in->waiting, false);
    atomic_init(&in->aborted, false);
    pthread_mutex_init(&in->mu, NULL);
    pthread_cond_init(&in->cv, NULL);
    *out = in;
    return 0;
}

void rdmax_intake_destroy(struct rdmax_intake *in)
{
    if (!in) {
        return;
    }
    pthread_mutex_destroy(&in->mu);
    pthread_cond_destroy(&in->cv);
    free(in->mem);
    free(in->block);
    free(in);
}

static struct rdmax_in_block *take_free(struct rdmax_intake *in)
{
    for (unsigned i = 0; i < in->nblocks; i++) {
        struct rdmax_in_block *b = &in->block[i];
        if (atomic_load_explicit(&b->refs, memory_order_acquire) == 0) {
            /* Only the reader turns a free block into a held one. */
            atomic_store_explicit(&b->refs, 1, memory_order_relaxed);
            return b;
        }
    }
    return NULL;
}

struct rdmax_in_block *rdmax_intake_get(struct rdmax_intake *in, bool try)
{
    struct rdmax_in_block *b;

    if (atomic_load(&in->aborted)) {
        return NULL;
    }
    b = take_free(in);
    if (b || try) {
        return b;
    }
    pthread_mutex_lock(&in->mu);
    /* seq_cst pairs with the dropper's decrement and load of `waiting`. */
    atomic_store(&in->waiting, true);
    while (!atomic_load(&in->aborted) && !(b = take_free(in))) {
        pthread_cond_wait(&in->cv, &in->mu);
    }
    atomic_store(&in->waiting, false);
    pthread_mutex_unlock(&in->mu);
    return b;
}

void rdmax_in_block_drop_n(struct rdmax_in_block *b, unsigned n)
{
    struct rdmax_intake *in = b->pool;

    if (atomic_fetch_sub(&b->refs, n) == n && atomic_load(&in->waiting)) {
        pthread_mutex_lock(&in->mu);
        pthread_cond_broadcast(&in->cv);
        pthread_mutex_unlock(&in->mu);
    }
}

void rdmax_intake_abort(struct rdmax_intake *in)
{
    pthread_mutex_lock(&in->mu);
    atomic_store(&in->aborted, true);
    pthread_cond_broadcast(&in->cv);
    pthread_mutex_unlock(&in->mu);
}
