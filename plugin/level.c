/*
 * The pipe's codec level, a hill climb on measured throughput (level.h).
 *
 * Rules, per window:
 *  - a window spent more than 10% waiting on QEMU is not measured and
 *    changes nothing: QEMU, not the level, set its rate;
 *  - the first window after a change is not measured: it still drains
 *    what the previous level left in the buffers;
 *  - a neighbouring level wins when its figure (measured in the last
 *    REVISIT windows) is better by the margin of that direction: less
 *    compression must move DOWN_NEEDS more (DOWN_LINK_NEEDS where the link
 *    pushed back at the lower level: there the lower level is held by the
 *    link, and the higher one by a CPU that QEMU and the receiver share,
 *    whose figure sways with them), more compression may move up to
 *    1/UP_NEEDS less (it saves wire bytes, and a window's figure on a
 *    shared host is noisy by about that much); the band between keeps the
 *    level from flapping;
 *  - after DWELL windows at a level, a neighbour not measured lately is
 *    tried: upward only while the link pushes back (blocked > 20%),
 *    downward only while it does not (blocked < 5%: the compressor, not
 *    the link, is the limit), so the level follows content and load as
 *    they change; a trial is kept only if it beat the level it came from
 *    by that direction's margin, else that level is back after the
 *    trial's first measured window;
 *  - uncached only from raw, after UNCACHED_AFTER windows at raw (net of
 *    two for each window otherwise) with the link idle (blocked < 2%, or
 *    a receiver that says it is the limit) and carrying more than 1.5x what
 *    it carried whenever it did push back, and back to raw at once when
 *    the link pushes back (blocked > 20%): uncached pages go FULL again
 *    when resent, so it is only for links that outrun even raw, not for a
 *    slow link that a starved CPU fails to fill;
 *  - a receiver that reports it, not the link, is the limit: its
 *    back-pressure does not count as the link pushing back (so no upward
 *    trial, and an idle link for uncached); the figures alone decide
 *    whether a lower level moves more. (It forced a step down once; on a
 *    shared host a receiver starved of CPU reported it while the link was
 *    full, and zstd's 184 MB/s lost to raw's 128.)
 */
#include "level.h"

#define UP_NEEDS 0.90       /* more compression: kept unless it moves 10% less (it saves wire) */
#define DOWN_NEEDS 1.20     /* less compression: only where it moves 20% more */
#define DOWN_LINK_NEEDS 1.5 /* ... 50% more when the link pushed back at the lower level */
#define REVISIT 30u         /* windows (~3 s) before a neighbour's figure is stale */
#define DWELL 6u            /* windows at a level before trying a stale neighbour */
#define FIRST_DWELL 2u      /* ... from the start level: a slow link shows at once */
#define UNCACHED_AFTER 10u  /* windows in a row at raw, the link idle, before trying uncached */

void rdmax_level_ctl_init(struct rdmax_level_ctl *c, int level, int lo, int hi)
{
    *c = (struct rdmax_level_ctl){.level = level, .lo = lo, .hi = hi, .trial_from = level};
}

/* What `to` must move, relative to `from`, to be preferred. */
static double need(const struct rdmax_level_ctl *c, int from, int to)
{
    if (to > from) {
        return UP_NEEDS;
    }
    return c->rate_link[to - RDMAX_LEVEL_MIN] ? DOWN_LINK_NEEDS : DOWN_NEEDS;
}

static bool fresh(const struct rdmax_level_ctl *c, int level)
{
    int i = level - RDMAX_LEVEL_MIN;

    return c->rate[i] > 0 && c->rate_at[i] + REVISIT > c->windows;
}

int rdmax_level_ctl_window(struct rdmax_level_ctl *c, const struct rdmax_level_window *w)
{
    int before = c->level, cur = c->level - RDMAX_LEVEL_MIN;
    bool link_bound, link_idle, link_free, input_bound, trial = false;

    if (w->wall_ns == 0) {
        return c->level;
    }
    link_bound = w->link_ns * 100 > w->wall_ns * 20 && !w->peer_bound;
    /* Blocked by a receiver that says it is the limit is no sign of a busy link. */
    link_idle = w->peer_bound || w->link_ns * 100 < w->wall_ns * 2;
    link_free = w->peer_bound || w->link_ns * 100 < w->wall_ns * 5;
    input_bound = w->wait_ns * 100 > w->wall_ns * 10;
    c->windows++;
    c->level_windows++;
    if (link_bound) {
        double b = (double)w->wire / (double)w->wall_ns;
        c->link_rate = c->link_rate > 0 ? (c->link_rate + b) / 2 : b;
    }
    /* Counts up per window at raw with the link idle, down twice as fast otherwise. */
    if (c->level == 0 && link_idle && !input_bound &&
        (double)w->wire / (double)w->wall_ns > 1.5 * c->link_rate) {
        c->idle_windows++;
    } else {
        c->idle_windows = c->idle_windows > 2 ? c->idle_windows - 2 : 0;
    }

    if (c->level_windows > 1 && !input_bound && w->wall_ns > w->wait_ns) {
        double r = (double)w->bytes / (double)(w->wall_ns - w->wait_ns);
        c->rate[cur] = fresh(c, c->level) ? (c->rate[cur] + r) / 2 : r;
        c->rate_at[cur] = c->windows;
        c->rate_link[cur] = link_bound;
    }

    if (link_bound && c->level < 0) {
        c->level = 0;
    } else if (c->trial_from != c->level && c->level_windows > 1 && !input_bound) {
        /* A trial measured: keep it only if it did better by its direction's margin. */
        if (c->rate[cur] <
            c->rate[c->trial_from - RDMAX_LEVEL_MIN] * need(c, c->trial_from, c->level)) {
            c->level = c->trial_from;
        }
        c->trial_from = c->level;
    } else if (!input_bound && c->level_windows > 1 && fresh(c, c->level)) {
        int best = c->level, explore = c->level;
        double best_gain = 1.0;

        for (int l = c->level - 1; l <= c->level + 1; l += 2) {
            if (l < c->lo || l > c->hi || (l > c->level && w->peer_bound)) {
                continue;
            }
            if (l < 0 && c->idle_windows < UNCACHED_AFTER) {
                continue;
            }
            if (!fresh(c, l)) {
                if ((l > c->level && link_bound) || (l < c->level && link_free)) {
                    explore = l;
                }
            } else {
                double gain = c->rate[l - RDMAX_LEVEL_MIN] / (c->rate[cur] * need(c, c->level, l));
                if (gain >= 1.0 && gain > best_gain) {
                    best = l;
                    best_gain = gain;
                }
            }
        }
        if (best != c->level) {
            c->level = best;
        } else if (explore != c->level &&
                   c->level_windows >= (c->changes == 0 ? FIRST_DWELL : DWELL)) {
            c->level = explore;
            trial = true;
        }
    }
    if (c->level != before) {
        c->trial_from = trial ? before : c->level;
        c->changes++;
        c->level_windows = 0;
        c->idle_windows = 0;
    }
    return c->level;
}
