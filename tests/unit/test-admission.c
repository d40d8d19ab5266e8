/*
 * Pre-flight with migrations at once (plugin/admission.c): a second guest
 * is refused while the first still has to fill the memory both need, and
 * admitted once the first has delivered enough or ended.
 */
#include <criterion/criterion.h>
#include <errno.h>

#include "admission.h"
#include "session.h"

#define GiB (1ull << 30)

Test(admission, the_second_waits_for_what_the_first_still_fills)
{
    struct rdmax_admission *a;
    _Atomic uint64_t a_in = 0, a_chan = 0, b_in = 0;
    uint64_t held;
    int A, B;

    cr_assert_eq(rdmax_admission_create(&a), 0);
    cr_assert_eq(rdmax_admission_admit(a, &A, 6 * GiB, 10 * GiB, &a_in, &a_chan, &held), 0);
    cr_assert_eq(held, 0);
    /* 6 GiB of A still to come: 6 more do not fit in 10. */
    cr_assert_eq(rdmax_admission_admit(a, &B, 6 * GiB, 10 * GiB, &b_in, NULL, &held), -ENOMEM);
    cr_assert_eq(held, 6 * GiB);
    /* A delivered 3 GiB over its main stream and multifd channels: MemAvailable took them. */
    a_in = 1 * GiB;
    a_chan = 2 * GiB;
    cr_assert_eq(rdmax_admission_admit(a, &B, 6 * GiB, 10 * GiB, &b_in, NULL, &held), 0);
    cr_assert_eq(held, 3 * GiB);
    rdmax_admission_release(a, &A);
    rdmax_admission_release(a, &B);
    cr_assert_eq(rdmax_admission_admit(a, &A, 10 * GiB, 10 * GiB, &a_in, NULL, &held), 0);
    cr_assert_eq(held, 0);
    rdmax_admission_release(a, &A);
    rdmax_admission_destroy(a);
}

Test(admission, delivered_beyond_the_need_holds_nothing_and_readmission_replaces)
{
    struct rdmax_admission *a;
    _Atomic uint64_t in = 5 * GiB;
    uint64_t held;
    int A, B;

    cr_assert_eq(rdmax_admission_create(&a), 0);
    cr_assert_eq(rdmax_admission_admit(a, &A, 4 * GiB, 8 * GiB, &in, NULL, &held), 0);
    cr_assert_eq(rdmax_admission_admit(a, &A, 4 * GiB, 8 * GiB, &in, NULL, &held), 0);
    cr_assert_eq(rdmax_admission_admit(a, &B, 8 * GiB, 8 * GiB, NULL, NULL, &held), 0);
    cr_assert_eq(held, 0);
    rdmax_admission_release(a, &A);
    rdmax_admission_release(a, &B);
    rdmax_admission_release(a, &B); /* twice: nothing */
    rdmax_admission_destroy(a);
}

Test(admission, at_most_one_per_slot)
{
    struct rdmax_admission *a;
    char who[RDMAX_SLOTS_MAX + 1];
    uint64_t held;

    cr_assert_eq(rdmax_admission_create(&a), 0);
    for (unsigned i = 0; i < RDMAX_SLOTS_MAX; i++) {
        cr_assert_eq(rdmax_admission_admit(a, &who[i], 1, 100, NULL, NULL, &held), 0);
    }
    cr_assert_eq(rdmax_admission_admit(a, &who[RDMAX_SLOTS_MAX], 1, 100, NULL, NULL, &held),
                 -ENOSPC);
    for (unsigned i = 0; i < RDMAX_SLOTS_MAX; i++) {
        rdmax_admission_release(a, &who[i]);
    }
    rdmax_admission_destroy(a);
}
