/*
 * The codec level of a whole sending pipe: -1 uncached (raw, no new cache
 * inserts), 0 raw, 1..RDMAX_LEVEL_MAX zstd. One controller per pipe, fed by
 * the thread that reads QEMU's stream, applied by every lane: lanes share
 * the link, so one lane's level changes what the others measure, and
 * per-lane controllers chased each other.
 *
 * The level that moved the most stream wins, measured, not modelled: each
 * window gives the stream bytes the pipe took from QEMU per ns it was not
 * waiting for QEMU. A link slower than the compressor saves, a compressor
 * slower than the link, a receiver that decodes too slowly, a host whose
 * CPU is saturated: all show in that one figure. Rules in level.c.
 *
 * Pure logic: no clock, no threads; the caller measures.
 */
#ifndef RDMAX_LEVEL_H
#define RDMAX_LEVEL_H

#include <stdbool.h>
#include <stdint.h>

#define RDMAX_LEVEL_MIN (-1)
#define RDMAX_LEVEL_MAX 2 /* level 3 costs ~2x level 1 per batch for ~8% fewer bytes */
#define RDMAX_LEVEL_COUNT (RDMAX_LEVEL_MAX - RDMAX_LEVEL_MIN + 1)

/* One window of the pipe, as the reader of QEMU's stream saw it. */
struct rdmax_level_window {
    uint64_t wall_ns; /* length of the window */
    uint64_t wait_ns; /* spent waiting for QEMU to write */
    uint64_t link_ns; /* lanes blocked handing batches to the transport, averaged per lane */
    uint64_t bytes;   /* stream bytes taken from QEMU */
    uint64_t wire;    /* batch bytes the lanes handed to the transport */
    bool peer_bound;  /* a receiving lane said it, not the link, is the limit */
};

struct rdmax_level_ctl {
    int level;                           /* the level now */
    int lo, hi;                          /* allowed range */
    double rate[RDMAX_LEVEL_COUNT];      /* bytes per ns when it last ran (index level - MIN) */
    uint64_t rate_at[RDMAX_LEVEL_COUNT]; /* window it was measured in */
    bool rate_link[RDMAX_LEVEL_COUNT];   /* ... the link pushed back then */
    uint64_t windows;                    /* windows so far */
    unsigned level_windows;              /* windows at this level since the last change */
    unsigned idle_windows;               /* windows at raw with the link idle, net (level.c) */
    uint64_t changes;                    /* level changes so far */
    int trial_from;                      /* trying this level, from that one; level when none */
    double link_rate;                    /* wire bytes per ns when the link pushed back (EWMA) */
};

/* Start at `level`, within [lo, hi] (lo -1 only with a page cache). */
void rdmax_level_ctl_init(struct rdmax_level_ctl *c, int level, int lo, int hi);

/* Account one window; returns the level for the next. */
int rdmax_level_ctl_window(struct rdmax_level_ctl *c, const struct rdmax_level_window *w);

#endif
