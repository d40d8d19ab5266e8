/* The intake's block pool: references, the reader waiting for a block, drops from other threads. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <unistd.h>

#include "intake.h"

Test(intake, a_block_is_free_again_only_after_its_last_reference)
{
    struct rdmax_intake *in;
    struct rdmax_in_block *a, *b;

    cr_assert_eq(rdmax_intake_create(4096, 2, &in), 0);
    a = rdmax_intake_get(in, true);
    b = rdmax_intake_get(in, true);
    cr_assert(a && b && a != b);
    cr_assert_null(rdmax_intake_get(in, true), "two blocks, both held");
    rdmax_in_block_hold(a); /* a page handed to a lane */
    rdmax_in_block_drop(a); /* the reader moves on */
    cr_assert_null(rdmax_intake_get(in, true), "the lane still holds a");
    rdmax_in_block_drop(a); /* the lane copied its page */
    cr_assert_eq(rdmax_intake_get(in, true), a);
    rdmax_in_block_drop(a);
    rdmax_in_block_drop(b);
    rdmax_intake_destroy(in);
}

static void *late_drop(void *arg)
{
    usleep(50 * 1000);
    rdmax_in_block_drop(arg);
    return NULL;
}

Test(intake, a_reader_waiting_for_a_block_wakes_when_a_lane_drops_one, .timeout = 10)
{
    struct rdmax_intake *in;
    struct rdmax_in_block *a;
    pthread_t t;

    cr_assert_eq(rdmax_intake_create(4096, 1, &in), 0);
    a = rdmax_intake_get(in, false);
    pthread_create(&t, NULL, late_drop, a);
    cr_assert_eq(rdmax_intake_get(in, false), a, "waits, then gets the dropped block");
    pthread_join(t, NULL);
    rdmax_in_block_drop(a);
    rdmax_intake_destroy(in);
}
