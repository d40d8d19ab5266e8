/* The SPSC ring: order, back-pressure and close, across real threads. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdint.h>

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
