#include "queue.h"

#include <errno.h>
#include <stdlib.h>

/* Spin briefly before sleeping: the other side is usually about to move. */
#define SPINS 200

int rdmax_ring_init(struct rdmax_ring *r, size_t slot_size, size_t cap)
{
    /* Cache-line aligned, so a slot type with aligned members keeps them aligned. */
    r->mem = aligned_alloc(64, (slot_size * cap + 63) & ~(size_t)63);
    if (!r->mem) {
        return -ENOMEM;
    }
    r->slot_size = slot_size;
    r->cap = cap;
    atomic_init(&r->head, 0);
    atomic_init(&r->tail, 0);
    atomic_init(&r->closed, false);
    atomic_init(&r->aborted, false);
    atomic_init(&r->cons_sleep, false);
    atomic_init(&r->prod_sleep, false);
    atomic_init(&r->want, 1);
    atomic_init(&r->kick, false);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    return 0;
}

void rdmax_ring_destroy(struct rdmax_ring *r)
{
    free(r->mem);
    r->mem = NULL;
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void wake(struct rdmax_ring *r, _Atomic bool *sleeper)
{
    /*
     * seq_cst pairs with the sleeper's store of its flag and reload of the
     * index: either it sees our index move, or we see its flag.
     */
    if (atomic_load(sleeper)) {
        pthread_mutex_lock(&r->mu);
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
    }
}

void *rdmax_ring_reserve(struct rdmax_ring *r, bool try)
{
    size_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);

    for (int i = 0; atomic_load_explicit(&r->head, memory_order_acquire) + r->cap == tail; i++) {
        if (try || atomic_load(&r->aborted)) {
            return NULL;
        }
        if (i < SPINS) {
            cpu_relax();
            continue;
        }
        pthread_mutex_lock(&r->mu);
        atomic_store(&r->prod_sleep, true);
        while (atomic_load(&r->head) + r->cap == tail && !atomic_load(&r->aborted)) {
            pthread_cond_wait(&r->cv, &r->mu);
        }
        atomic_store(&r->prod_sleep, false);
        pthread_mutex_unlock(&r->mu);
    }
    if (atomic_load_explicit(&r->aborted, memory_order_relaxed)) {
        return NULL;
    }
    return r->mem + (tail % r->cap) * r->slot_size;
}

void rdmax_ring_commit(struct rdmax_ring *r)
{
    size_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed) + 1;

    atomic_store(&r->tail, tail);
    /* A batching consumer sleeps until it can fill its batch. */
    if (atomic_load(&r->cons_sleep) &&
        tail - atomic_load_explicit(&r->head, memory_order_relaxed) >= atomic_load(&r->want)) {
        wake(r, &r->cons_sleep);
    }
}

void rdmax_ring_kick(struct rdmax_ring *r)
{
    atomic_store(&r->kick, true);
    wake(r, &r->cons_sleep);
}

bool rdmax_ring_kicked(struct rdmax_ring *r)
{
    return atomic_load_explicit(&r->kick, memory_order_relaxed) && atomic_exchange(&r->kick, false);
}

/*
 * Consumer: wait until `want` slots are filled, the ring is closed or
 * aborted, or (with kicks) the producer kicked. One loop for peek and
 * peek_wait: spin briefly, then sleep with `want` published so the
 * producer wakes us only when it is met.
 */
static void wait_filled(struct rdmax_ring *r, size_t head, size_t want, bool kicks)
{
    for (int i = 0; atomic_load_explicit(&r->tail, memory_order_acquire) - head < want; i++) {
        if (atomic_load(&r->closed) || atomic_load(&r->aborted) ||
            (kicks && atomic_load(&r->kick))) {
            return;
        }
        if (i < SPINS) {
            cpu_relax();
            continue;
        }
        pthread_mutex_lock(&r->mu);
        atomic_store(&r->want, want);
        atomic_store(&r->cons_sleep, true);
        while (atomic_load(&r->tail) - head < want && !atomic_load(&r->closed) &&
               !atomic_load(&r->aborted) && !(kicks && atomic_load(&r->kick))) {
            pthread_cond_wait(&r->cv, &r->mu);
        }
        atomic_store(&r->cons_sleep, false);
        atomic_store(&r->want, 1);
        pthread_mutex_unlock(&r->mu);
        return;
    }
}

void *rdmax_ring_peek_wait(struct rdmax_ring *r, size_t want)
{
    size_t head = atomic_load_explicit(&r->head, memory_order_relaxed);

    wait_filled(r, head, want < 1 ? 1 : want > r->cap ? r->cap : want, true);
    if (atomic_load_explicit(&r->tail, memory_order_acquire) == head || atomic_load(&r->aborted)) {
        return NULL;
    }
    return r->mem + (head % r->cap) * r->slot_size;
}

void *rdmax_ring_peek(struct rdmax_ring *r, bool try)
{
    size_t head = atomic_load_explicit(&r->head, memory_order_relaxed);

    if (!try) {
        wait_filled(r, head, 1, false);
    }
    if (atomic_load_explicit(&r->tail, memory_order_acquire) == head || atomic_load(&r->aborted)) {
        return NULL;
    }
    return r->mem + (head % r->cap) * r->slot_size;
}

void rdmax_ring_release(struct rdmax_ring *r)
{
    atomic_store(&r->head, atomic_load_explicit(&r->head, memory_order_relaxed) + 1);
    wake(r, &r->prod_sleep);
}

void *rdmax_ring_peek_at(struct rdmax_ring *r, size_t i)
{
    size_t head = atomic_load_explicit(&r->head, memory_order_relaxed);

    if (atomic_load_explicit(&r->tail, memory_order_acquire) - head <= i) {
        return NULL;
    }
    return r->mem + ((head + i) % r->cap) * r->slot_size;
}

void rdmax_ring_release_n(struct rdmax_ring *r, size_t n)
{
    if (n) {
        atomic_store(&r->head, atomic_load_explicit(&r->head, memory_order_relaxed) + n);
        wake(r, &r->prod_sleep);
    }
}

void rdmax_ring_close(struct rdmax_ring *r)
{
    pthread_mutex_lock(&r->mu);
    atomic_store(&r->closed, true);
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

bool rdmax_ring_closed_and_empty(struct rdmax_ring *r)
{
    return atomic_load(&r->closed) && atomic_load(&r->tail) == atomic_load(&r->head);
}

size_t rdmax_ring_count(struct rdmax_ring *r)
{
    return atomic_load(&r->tail) - atomic_load(&r->head);
}

void rdmax_ring_abort(struct rdmax_ring *r)
{
    pthread_mutex_lock(&r->mu);
    atomic_store(&r->aborted, true);
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

bool rdmax_ring_aborted(struct rdmax_ring *r)
{
    return atomic_load(&r->aborted);
}
