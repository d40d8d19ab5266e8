/*
 * Switch-over pacing: how fast the sender takes QEMU's stream.
 *
 * QEMU decides when to stop the guest from the rate at which it wrote its
 * stream in its last ~100 ms (bytes written / time): once the dirty RAM
 * left is below that rate x downtime-limit, it stops the guest and sends
 * the rest. rdma-x moves some pages far faster than others (an unchanged
 * page costs ~2 wire bytes, a random one 4 KiB), and its buffers drain
 * while QEMU syncs its dirty bitmap; right after a sync QEMU then saw
 * 3-5x the rate it could count on for the pages left, and a 300 ms limit
 * became 1.3 s of downtime. So the sender never takes the stream faster
 * than RDMAX_PACE_BURST x what it took in its recent busy windows: the
 * rate QEMU measures in any window stays within that factor of the
 * sustained one, and a content change that truly moves faster raises the
 * pace by that factor per window.
 *
 * Pure logic: no clock, no sleeping; the caller measures and sleeps.
 */
#ifndef RDMAX_PACE_H
#define RDMAX_PACE_H

#include <stdint.h>

#define RDMAX_PACE_BURST 1.25         /* a window may move this much more than the recent ones */
#define RDMAX_PACE_SLACK (512u << 10) /* bytes a window may take ahead of the pace */

struct rdmax_pace {
    double rate; /* stream bytes per ns of the recent busy windows; 0 = not yet known */
};

/*
 * Account a finished window: `bytes` taken in `wall_ns`, of which
 * `qemu_wait_ns` waiting for QEMU (a window mostly waiting shows QEMU's
 * rate, not the pipe's, and is skipped).
 */
void rdmax_pace_window(struct rdmax_pace *p, uint64_t bytes, uint64_t wall_ns,
                       uint64_t qemu_wait_ns);

/*
 * How long to hold off before reading more, in ns (0: read now), with
 * `bytes` taken so far in a window `elapsed_ns` old.
 */
uint64_t rdmax_pace_delay(const struct rdmax_pace *p, uint64_t bytes, uint64_t elapsed_ns);

#endif
