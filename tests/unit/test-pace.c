/*
 * Switch-over pacing (plugin/pace.c): the rate QEMU sees in any window
 * stays within RDMAX_PACE_BURST of the recent busy windows, a window
 * spent waiting for QEMU changes nothing, and content that truly moves
 * faster raises the pace window by window.
 */
#include <criterion/criterion.h>

#include "pace.h"

#define MS 1000000ull

/* A pipe that could take `could` bytes per ns, paced: the bytes one 100 ms window takes. */
static uint64_t paced_window(struct rdmax_pace *p, double could)
{
    uint64_t bytes = 0, t = 0;

    /* Read in 256 KiB pieces, nap when told, as send.c does. */
    while (t < 100 * MS) {
        uint64_t d = rdmax_pace_delay(p, bytes, t);
        if (d) {
            t += d < 10 * MS ? d : 10 * MS;
            continue;
        }
        bytes += 256u << 10;
        t += (uint64_t)((256u << 10) / could);
    }
    rdmax_pace_window(p, bytes, t, 0);
    return bytes;
}

Test(pace, unknown_rate_holds_nothing_back)
{
    struct rdmax_pace p = {0};

    cr_assert_eq(rdmax_pace_delay(&p, 1u << 30, 1), 0);
}

Test(pace, a_burst_after_a_sync_is_held_to_the_burst_factor)
{
    struct rdmax_pace p = {0};

    /* Steady: 0.125 B/ns (125 MB/s, a 1 Gbit/s link). */
    for (int i = 0; i < 10; i++) {
        rdmax_pace_window(&p, 12500000, 100 * MS, 0);
    }
    /* QEMU synced its bitmap: a window spent waiting is not measured. */
    rdmax_pace_window(&p, 1000000, 100 * MS, 90 * MS);
    cr_assert_float_eq(p.rate, 0.125, 1e-9);
    /* Cheap pages come at 5x: QEMU must see at most 1.25x (plus the slack). */
    uint64_t b = paced_window(&p, 0.625);
    cr_assert_leq((double)b, 0.125 * RDMAX_PACE_BURST * 100 * MS + RDMAX_PACE_SLACK + (256u << 10),
                  "a burst window took %llu bytes", (unsigned long long)b);
}

Test(pace, content_that_stays_fast_raises_the_pace)
{
    struct rdmax_pace p = {0};

    rdmax_pace_window(&p, 12500000, 100 * MS, 0);
    /* 5x faster: 1.25x per window reaches it in 8 windows (0.8 s). */
    uint64_t last = 0;
    for (int i = 0; i < 9; i++) {
        last = paced_window(&p, 0.625);
    }
    cr_assert_geq((double)last, 0.9 * 0.625 * 100 * MS, "still held to %llu bytes per window",
                  (unsigned long long)last);
}
