/*
 * The pipe's codec level (plugin/level.c) on simulated pipes: each level
 * has an encoding rate and a compression ratio, the link a rate, QEMU an
 * input rate, the receiver a decoding rate; a window's figures follow from
 * them (with some noise), so these tests decide the same way on a quiet
 * machine, a loaded one and under the sanitizers.
 */
#include <criterion/criterion.h>

#include "level.h"

/* Index level + 1: uncached, raw, zstd 1, zstd 2. */
struct sim {
    double enc[4];   /* stream bytes per ns the lanes encode */
    double ratio[4]; /* wire bytes per stream byte */
    double link;     /* wire bytes per ns; 0 = unlimited */
    double input;    /* stream bytes per ns QEMU writes; 0 = unlimited */
    double peer;     /* stream bytes per ns the receiver decodes; 0 = unlimited */
};

/* Raw is cheap; zstd 1 costs ~4x and halves real content; uncached a bit cheaper than raw. */
#define ENC                                                                                        \
    {                                                                                              \
        3.0, 2.0, 0.5, 0.3                                                                         \
    }
#define RATIO                                                                                      \
    {                                                                                              \
        0.95, 0.95, 0.45, 0.42                                                                     \
    }

static const struct sim FAST_LINK = {ENC, RATIO, 0, 0, 0};
static const struct sim SLOW_LINK = {ENC, RATIO, 0.1, 0, 0};
/* Raw moves 0.8/0.95 = 0.84; zstd 1 encodes 0.9 and fits the link (0.9 * 0.45 < 0.8). */
static const struct sim MIDDLE_LINK = {{3.0, 2.0, 0.9, 0.3}, RATIO, 0.8, 0, 0};
/* The link pushes back, but because the receiver is the slow one. */
static const struct sim SLOW_PEER = {ENC, RATIO, 0, 0, 0.4};
static const struct sim SLOW_INPUT = {ENC, RATIO, 0, 0.05, 0};

static unsigned seed = 1;

static double noise(void)
{
    seed = seed * 1103515245u + 12345u;
    return 0.9 + 0.2 * (double)((seed >> 16) & 0x7fff) / 32768.0; /* +-10% */
}

/* One 25 ms window of the pipe at the controller's level. */
static struct rdmax_level_window sim_window(const struct sim *s, int level)
{
    int i = level + 1;
    double wall = 25e6, rate = s->enc[i] * noise(), link_share = 0, wait = 0;
    struct rdmax_level_window w = {.wall_ns = (uint64_t)wall};

    if (s->link > 0 && rate * s->ratio[i] > s->link) {
        link_share = 1 - s->link / (rate * s->ratio[i]);
        rate = s->link / s->ratio[i];
    }
    if (s->peer > 0 && rate > s->peer) {
        link_share = 1 - s->peer / rate; /* its back-pressure blocks the lanes' sends */
        rate = s->peer;
        w.peer_bound = true;
    }
    if (s->input > 0 && rate > s->input) {
        wait = 1 - s->input / rate;
        rate = s->input;
    }
    w.wait_ns = (uint64_t)(wall * wait);
    w.link_ns = (uint64_t)(wall * link_share);
    w.bytes = (uint64_t)(rate * wall);
    w.wire = (uint64_t)(rate * s->ratio[i] * wall);
    return w;
}

/* Run n windows; the level held most in the second half. */
static int run(struct rdmax_level_ctl *c, const struct sim *s, unsigned n)
{
    unsigned at[RDMAX_LEVEL_COUNT] = {0};
    int most = 0;

    for (unsigned k = 0; k < n; k++) {
        struct rdmax_level_window w = sim_window(s, c->level);
        rdmax_level_ctl_window(c, &w);
        if (k >= n / 2) {
            at[c->level - RDMAX_LEVEL_MIN]++;
        }
    }
    for (int i = 1; i < RDMAX_LEVEL_COUNT; i++) {
        if (at[i] > at[most]) {
            most = i;
        }
    }
    return most + RDMAX_LEVEL_MIN;
}

static struct rdmax_level_ctl fresh_ctl(void)
{
    struct rdmax_level_ctl c;

    rdmax_level_ctl_init(&c, 1, RDMAX_LEVEL_MIN, RDMAX_LEVEL_MAX);
    return c;
}

Test(level, an_unlimited_link_goes_uncached)
{
    struct rdmax_level_ctl c = fresh_ctl();

    cr_assert_eq(run(&c, &FAST_LINK, 400), -1, "compression only costs; so does the cache copy");
}

Test(level, a_slow_link_compresses)
{
    struct rdmax_level_ctl c = fresh_ctl();

    /* Level 2 moves 7% more than 1 here: more compression needs no margin to win. */
    cr_assert_eq(run(&c, &SLOW_LINK, 400), 2);
}

Test(level, a_small_gain_is_no_reason_to_stop_compressing)
{
    /* Raw would move 5% more than zstd 1 (0.53 against 0.50): under the 20% a step down needs. */
    static const struct sim s = {ENC, RATIO, 0.5, 0, 0};
    struct rdmax_level_ctl c = fresh_ctl();

    cr_assert_eq(run(&c, &s, 400), 1);
}

Test(level, raw_held_by_the_link_must_move_half_as_much_again)
{
    /* Raw, link-bound, moves 26% more than zstd 1 (0.63 against 0.50): not enough. */
    static const struct sim some = {ENC, RATIO, 0.6, 0, 0};
    /* ... 68% more (0.84 against 0.50): enough. */
    static const struct sim much = {ENC, RATIO, 0.8, 0, 0};
    struct rdmax_level_ctl c = fresh_ctl();

    cr_assert_eq(run(&c, &some, 400), 1);
    c = fresh_ctl();
    cr_assert_eq(run(&c, &much, 400), 0);
}

Test(level, a_slow_link_goes_to_2_where_that_pays_10_percent)
{
    static const struct sim s = {ENC, {0.95, 0.95, 0.45, 0.38}, 0.1, 0, 0};
    struct rdmax_level_ctl c = fresh_ctl();

    cr_assert_eq(run(&c, &s, 400), 2);
}

Test(level, zstd_wins_where_it_moves_more_although_the_lanes_are_then_the_bottleneck)
{
    struct rdmax_level_ctl c = fresh_ctl();

    cr_assert_eq(run(&c, &MIDDLE_LINK, 400), 1);
}

Test(level, a_slow_receiver_is_no_reason_to_compress)
{
    struct rdmax_level_ctl c = fresh_ctl();

    cr_assert_eq(run(&c, &SLOW_LINK, 200), 2);
    cr_assert_leq(run(&c, &SLOW_PEER, 400), 1,
                  "back-pressure from the receiver is not the link: level 2 moves less there");
}

Test(level, waiting_on_qemu_changes_nothing)
{
    struct rdmax_level_ctl c = fresh_ctl();

    run(&c, &SLOW_INPUT, 400);
    cr_assert_eq(c.level, 1);
    cr_assert_eq(c.changes, 0);
}

Test(level, it_follows_the_link_when_it_changes)
{
    struct rdmax_level_ctl c = fresh_ctl();

    cr_assert_eq(run(&c, &FAST_LINK, 400), -1);
    cr_assert_geq(run(&c, &SLOW_LINK, 400), 1, "a link that became slow: compress again");
    cr_assert_eq(run(&c, &FAST_LINK, 600), -1, "and back");
}

Test(level, never_uncached_while_the_link_pushes_back)
{
    struct rdmax_level_ctl c = fresh_ctl();

    for (unsigned k = 0; k < 400; k++) {
        struct rdmax_level_window w = sim_window(&MIDDLE_LINK, c.level);
        rdmax_level_ctl_window(&c, &w);
        cr_assert_geq(c.level, 0, "window %u", k);
    }
}

Test(level, a_starved_pipe_on_a_slow_link_never_goes_uncached)
{
    /* Raw fills the link at first; then the CPU is taken away and even raw cannot. */
    static const struct sim starved = {{0.12, 0.09, 0.05, 0.03}, RATIO, 0.1, 0, 0};
    struct rdmax_level_ctl c = fresh_ctl();

    run(&c, &SLOW_LINK, 200);
    for (unsigned k = 0; k < 400; k++) {
        struct rdmax_level_window w = sim_window(&starved, c.level);
        rdmax_level_ctl_window(&c, &w);
        cr_assert_geq(c.level, 0, "window %u", k);
    }
}

Test(level, range_is_respected)
{
    struct rdmax_level_ctl c;

    rdmax_level_ctl_init(&c, 1, 0, RDMAX_LEVEL_MAX); /* no page cache: no uncached */
    cr_assert_eq(run(&c, &FAST_LINK, 400), 0);
}

/* send starts at raw: a fast link never pays for zstd, a slow one leaves raw within windows. */
Test(level, from_raw_a_slow_link_compresses_within_a_few_windows)
{
    struct rdmax_level_ctl c;
    unsigned k;

    rdmax_level_ctl_init(&c, 0, RDMAX_LEVEL_MIN, RDMAX_LEVEL_MAX);
    for (k = 0; k < 4 && c.level <= 0; k++) {
        struct rdmax_level_window w = sim_window(&SLOW_LINK, c.level);
        rdmax_level_ctl_window(&c, &w);
    }
    cr_assert_gt(c.level, 0, "still raw after %u windows on a link zstd beats", k);
    cr_assert_eq(run(&c, &SLOW_LINK, 400), 2);
}

Test(level, from_raw_an_unlimited_link_never_compresses)
{
    struct rdmax_level_ctl c;

    rdmax_level_ctl_init(&c, 0, RDMAX_LEVEL_MIN, RDMAX_LEVEL_MAX);
    for (unsigned k = 0; k < 400; k++) {
        struct rdmax_level_window w = sim_window(&FAST_LINK, c.level);
        rdmax_level_ctl_window(&c, &w);
        cr_assert_leq(c.level, 0, "window %u tried zstd on a link that never pushed back", k);
    }
    cr_assert_eq(c.level, -1);
}
