/* Switch-over pacing (pace.h). */
#include "pace.h"

void rdmax_pace_window(struct rdmax_pace *p, uint64_t bytes, uint64_t wall_ns,
                       uint64_t qemu_wait_ns)
{
    double r;

    if (wall_ns == 0 || qemu_wait_ns * 10 > wall_ns) {
        return;
    }
    /* Time held off by the pace counts: a paced window moved exactly the pace. */
    r = (double)bytes / (double)wall_ns;
    /* Up at once (by at most the burst factor: the pace held it), down by halves. */
    p->rate = p->rate > 0 && r < p->rate ? (p->rate + r) / 2 : r;
}

uint64_t rdmax_pace_delay(const struct rdmax_pace *p, uint64_t bytes, uint64_t elapsed_ns)
{
    double cap = p->rate * RDMAX_PACE_BURST, allowed;

    if (cap <= 0) {
        return 0;
    }
    allowed = cap * (double)elapsed_ns + RDMAX_PACE_SLACK;
    if ((double)bytes <= allowed) {
        return 0;
    }
    return (uint64_t)(((double)bytes - allowed) / cap) + 1;
}
