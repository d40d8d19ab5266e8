/* The SPSC ring: order, back-pressure and close, across real threads. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <unistd.h>

#include "queue.h"

#define ITEMS 300000u

static struct rdmax_ring ring;

static void *producer(void *arg)
{
    for (uint64_t i = 0; i < ITEMS; i++) {
        uint64_t *slot = rdmax_ring_reserve(&ring, false);
        *slot = i * 2654435761u;
        rdmax_ring_commit(&ring);
    }
    rdmax_ring_close(&ring);
    return arg;
}

Test(queue, items_arrive_in_order_and_close_ends_the_stream, .timeout = 30)
{
    pthread_t t;
    uint64_t n = 0;

    cr_assert_eq(rdmax_ring_init(&ring, sizeof(uint64_t), 7), 0);
    pthread_create(&t, NULL, producer, NULL);
    for (;;) {
        uint64_t *slot = rdmax_ring_peek(&ring, false);
        if (!slot) {
            break;
        }
        cr_assert_eq(*slot, n * 2654435761u, "item %llu out of order", (unsigned long long)n);
        rdmax_ring_release(&ring);
        n++;
    }
    pthread_join(t, NULL);
    cr_assert_eq(n, ITEMS);
    cr_assert(rdmax_ring_closed_and_empty(&ring));
    rdmax_ring_destroy(&ring);
}

Test(queue, a_full_ring_refuses_try_and_an_empty_one_too)
{
    cr_assert_eq(rdmax_ring_init(&ring, 8, 2), 0);
    cr_assert_null(rdmax_ring_peek(&ring, true));
    cr_assert_not_null(rdmax_ring_reserve(&ring, true));
    rdmax_ring_commit(&ring);
    cr_assert_not_null(rdmax_ring_reserve(&ring, true));
    rdmax_ring_commit(&ring);
    cr_assert_null(rdmax_ring_reserve(&ring, true), "a full ring handed out a slot");
    cr_assert_eq(rdmax_ring_count(&ring), 2);
    cr_assert_not_null(rdmax_ring_peek(&ring, true));
    rdmax_ring_release(&ring);
    cr_assert_not_null(rdmax_ring_reserve(&ring, true));
    rdmax_ring_destroy(&ring);
}

/* A batching consumer (peek_wait) and a producer that kicks it now and then. */
#define KICK_EVERY 37u

static void *kicking_producer(void *arg)
{
    for (uint64_t i = 0; i < ITEMS; i++) {
        uint64_t *slot = rdmax_ring_reserve(&ring, false);
        *slot = i;
        rdmax_ring_commit(&ring);
        if (i % KICK_EVERY == KICK_EVERY - 1) {
            rdmax_ring_kick(&ring);
        }
    }
    rdmax_ring_close(&ring);
    return arg;
}

Test(queue, a_batching_consumer_gets_everything_in_order_through_kicks_and_close, .timeout = 60)
{
    pthread_t t;
    uint64_t n = 0, kicked = 0;

    cr_assert_eq(rdmax_ring_init(&ring, sizeof(uint64_t), 64), 0);
    pthread_create(&t, NULL, kicking_producer, NULL);
    for (;;) {
        /* Wait for a batch of 48, like a lane that has a partial batch pending. */
        uint64_t *slot = rdmax_ring_peek_wait(&ring, 48);
        if (!slot) {
            if (rdmax_ring_closed_and_empty(&ring)) {
                break;
            }
            cr_assert(rdmax_ring_kicked(&ring), "peek_wait returned empty without a kick");
            kicked++;
            continue;
        }
        while ((slot = rdmax_ring_peek_at(&ring, 0))) {
            cr_assert_eq(*slot, n, "item %llu out of order", (unsigned long long)n);
            rdmax_ring_release(&ring);
            n++;
        }
    }
    pthread_join(t, NULL);
    cr_assert_eq(n, ITEMS);
    rdmax_ring_destroy(&ring);
}

Test(queue, a_kick_wakes_a_consumer_waiting_for_more_than_there_is, .timeout = 10)
{
    cr_assert_eq(rdmax_ring_init(&ring, 8, 16), 0);
    *(uint64_t *)rdmax_ring_reserve(&ring, false) = 7;
    rdmax_ring_commit(&ring);
    rdmax_ring_kick(&ring);
    /* Wants 10, one is there, but the producer kicked: it gets the one. */
    uint64_t *slot = rdmax_ring_peek_wait(&ring, 10);
    cr_assert_not_null(slot);
    cr_assert_eq(*slot, 7);
    rdmax_ring_release(&ring);
    cr_assert(rdmax_ring_kicked(&ring));
    cr_assert(!rdmax_ring_kicked(&ring), "a kick is consumed once");
    rdmax_ring_destroy(&ring);
}

Test(queue, peek_at_holds_several_slots_and_release_n_frees_them_together)
{
    cr_assert_eq(rdmax_ring_init(&ring, sizeof(uint64_t), 4), 0);
    for (uint64_t i = 0; i < 4; i++) {
        *(uint64_t *)rdmax_ring_reserve(&ring, false) = i;
        rdmax_ring_commit(&ring);
    }
    for (uint64_t i = 0; i < 4; i++) {
        uint64_t *slot = rdmax_ring_peek_at(&ring, i);
        cr_assert_not_null(slot);
        cr_assert_eq(*slot, i);
    }
    cr_assert_null(rdmax_ring_peek_at(&ring, 4));
    cr_assert_null(rdmax_ring_reserve(&ring, true), "held slots are not free");
    rdmax_ring_release_n(&ring, 3);
    cr_assert_eq(*(uint64_t *)rdmax_ring_peek_at(&ring, 0), 3);
    cr_assert_not_null(rdmax_ring_reserve(&ring, true));
    rdmax_ring_destroy(&ring);
}

struct blocked {
    bool producer; /* else the consumer */
    void *got;
    _Atomic bool done;
};

static void *blocked_main(void *arg)
{
    struct blocked *b = arg;

    b->got = b->producer ? rdmax_ring_reserve(&ring, false) : rdmax_ring_peek(&ring, false);
    atomic_store(&b->done, true);
    return NULL;
}

static void abort_wakes(bool producer)
{
    struct blocked b = {.producer = producer, .got = (void *)1};
    pthread_t t;

    cr_assert_eq(rdmax_ring_init(&ring, 8, 2), 0);
    if (producer) { /* full: the producer blocks */
        for (int i = 0; i < 2; i++) {
            cr_assert_not_null(rdmax_ring_reserve(&ring, true));
            rdmax_ring_commit(&ring);
        }
    }
    pthread_create(&t, NULL, blocked_main, &b);
    usleep(50 * 1000);
    cr_assert(!atomic_load(&b.done), "did not block");
    rdmax_ring_abort(&ring);
    pthread_join(t, NULL);
    cr_assert_null(b.got, "an aborted ring handed out a slot");
    cr_assert(rdmax_ring_aborted(&ring));
    /* Afterwards nothing moves, even what the ring still holds. */
    cr_assert_null(rdmax_ring_reserve(&ring, false));
    cr_assert_null(rdmax_ring_peek(&ring, false));
    cr_assert_null(rdmax_ring_peek_wait(&ring, 1));
    rdmax_ring_destroy(&ring);
}

Test(queue, abort_wakes_a_blocked_producer_with_null, .timeout = 10)
{
    abort_wakes(true);
}

Test(queue, abort_wakes_a_blocked_consumer_with_null, .timeout = 10)
{
    abort_wakes(false);
}

static void *batch_main(void *arg)
{
    struct blocked *b = arg;

    b->got = rdmax_ring_peek_wait(&ring, 4);
    atomic_store(&b->done, true);
    return NULL;
}

Test(queue, abort_wakes_a_batching_consumer_with_null, .timeout = 10)
{
    struct blocked b = {.got = (void *)1};
    pthread_t t;

    cr_assert_eq(rdmax_ring_init(&ring, 8, 8), 0);
    cr_assert_not_null(rdmax_ring_reserve(&ring, true));
    rdmax_ring_commit(&ring); /* one of the 4 it waits for */
    pthread_create(&t, NULL, batch_main, &b);
    usleep(50 * 1000);
    cr_assert(!atomic_load(&b.done), "did not wait for its batch");
    rdmax_ring_abort(&ring);
    pthread_join(t, NULL);
    cr_assert_null(b.got);
    rdmax_ring_destroy(&ring);
}
