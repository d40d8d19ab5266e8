#include "queue.h"

#include <errno.h>
#include <stdlib.h>

int rdmax_ring_init(struct rdmax_ring *r, size_t slot_size, size_t cap)
{
    r->mem = malloc(slot_size * cap);
    if (!r->mem) {
        return -ENOMEM;
    }
    r->slot_size = slot_size;
    r->cap = cap;
    r->head = 0;
    r->count = 0;
    r->closed = false;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->not_empty, NULL);
    pthread_cond_init(&r->not_full, NULL);
    return 0;
}

void rdmax_ring_destroy(struct rdmax_ring *r)
{
    free(r->mem);
    r->mem = NULL;
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->not_empty);
    pthread_cond_destroy(&r->not_full);
}

void *rdmax_ring_reserve(struct rdmax_ring *r, bool try)
{
    void *slot = NULL;

    pthread_mutex_lock(&r->mu);
    while (r->count == r->cap && !try) {
        pthread_cond_wait(&r->not_full, &r->mu);
    }
    if (r->count < r->cap) {
        slot = r->mem + ((r->head + r->count) % r->cap) * r->slot_size;
    }
    pthread_mutex_unlock(&r->mu);
    return slot;
}

void rdmax_ring_commit(struct rdmax_ring *r)
{
    pthread_mutex_lock(&r->mu);
    r->count++;
    pthread_cond_signal(&r->not_empty);
    pthread_mutex_unlock(&r->mu);
}

void *rdmax_ring_peek(struct rdmax_ring *r, bool try)
{
    void *slot = NULL;

    pthread_mutex_lock(&r->mu);
    while (r->count == 0 && !r->closed && !try) {
        pthread_cond_wait(&r->not_empty, &r->mu);
    }
    if (r->count > 0) {
        slot = r->mem + r->head * r->slot_size;
    }
    pthread_mutex_unlock(&r->mu);
    return slot;
}

void rdmax_ring_release(struct rdmax_ring *r)
{
    pthread_mutex_lock(&r->mu);
    r->head = (r->head + 1) % r->cap;
    r->count--;
    pthread_cond_signal(&r->not_full);
    pthread_mutex_unlock(&r->mu);
}

void rdmax_ring_close(struct rdmax_ring *r)
{
    pthread_mutex_lock(&r->mu);
    r->closed = true;
    pthread_cond_broadcast(&r->not_empty);
    pthread_mutex_unlock(&r->mu);
}

bool rdmax_ring_closed_and_empty(struct rdmax_ring *r)
{
    bool v;

    pthread_mutex_lock(&r->mu);
    v = r->closed && r->count == 0;
    pthread_mutex_unlock(&r->mu);
    return v;
}

size_t rdmax_ring_count(struct rdmax_ring *r)
{
    size_t n;

    pthread_mutex_lock(&r->mu);
    n = r->count;
    pthread_mutex_unlock(&r->mu);
    return n;
}
