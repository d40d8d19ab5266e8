/*
 * --stats-json (written at exit, also on failure) and --progress (one live
 * line on stderr).
 */
#include "session.h"

#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

void rdmax_json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            fprintf(f, "\\%c", ch);
        } else if (ch < 0x20) {
            fprintf(f, "\\u%04x", ch);
        } else {
            fputc(ch, f);
        }
    }
    fputc('"', f);
}

static uint64_t wire_bytes(const struct rdmax_session *s)
{
    uint64_t n = s->ctrl.bytes_sent + s->ctrl.bytes_received;

    for (unsigned i = 0; i < s->nlanes; i++) {
        n += s->lane[i].bytes_sent + s->lane[i].bytes_received;
    }
    for (unsigned k = 0; k < RDMAX_CHAN_MAX; k++) {
        n += s->chan[k].bytes_sent + s->chan[k].bytes_received;
    }
    return n;
}

static const char *const tier_names[RDMAX_TIER_COUNT] = {"unchanged", "zero", "delta", "full"};

/* Sum of n encoders' counters (sender only; zero on the receiver). */
static struct rdmax_lane_stats stats_total(_Atomic(const struct rdmax_lane_stats *) *v, unsigned n)
{
    struct rdmax_lane_stats t = {0};

    for (unsigned i = 0; i < n; i++) {
        const struct rdmax_lane_stats *ls = atomic_load(&v[i]);
        if (!ls) {
            continue;
        }
        t.pages += ls->pages;
        t.batches += ls->batches;
        t.bytes_raw += ls->bytes_raw;
        t.bytes_wire += ls->bytes_wire;
        for (int k = 0; k < RDMAX_TIER_COUNT; k++) {
            t.tier_pages[k] += ls->tier_pages[k];
            t.tier_bytes[k] += ls->tier_bytes[k];
        }
        t.cache_hits += ls->cache_hits;
        t.cache_misses += ls->cache_misses;
        t.full_zstd_batches += ls->full_zstd_batches;
        t.full_raw_batches += ls->full_raw_batches;
        t.encode_ns += ls->encode_ns;
        t.level_changes += ls->level_changes;
        t.uncached_pages += ls->uncached_pages;
    }
    return t;
}

static struct rdmax_lane_stats lanes_total(struct rdmax_session *s)
{
    return stats_total(s->lane_stats, s->nlanes);
}

static void json_tiers(FILE *f, const struct rdmax_lane_stats *t)
{
    fprintf(f, "\"tiers\": {");
    for (int k = 0; k < RDMAX_TIER_COUNT; k++) {
        fprintf(f, "%s\"%s\": {\"pages\": %llu, \"bytes\": %llu}", k ? ", " : "", tier_names[k],
                (unsigned long long)t->tier_pages[k], (unsigned long long)t->tier_bytes[k]);
    }
    fprintf(f,
            "}, \"cache_hits\": %llu, \"cache_misses\": %llu, \"cache_hit_rate\": %.4f, "
            "\"zstd_batches\": %llu, \"raw_batches\": %llu, \"encode_seconds\": %.3f",
            (unsigned long long)t->cache_hits, (unsigned long long)t->cache_misses,
            t->cache_hits + t->cache_misses
                ? (double)t->cache_hits / (double)(t->cache_hits + t->cache_misses)
                : 0.0,
            (unsigned long long)t->full_zstd_batches, (unsigned long long)t->full_raw_batches,
            (double)t->encode_ns / 1e9);
}

void rdmax_stats_json(struct rdmax_session *s, FILE *f, const char *result)
{
    const struct rdmax_counters *c = &s->c;
    double secs = rdmax_now() - s->t0;
    uint64_t in = atomic_load(&c->bytes_in);
    uint64_t wire = wire_bytes(s);

    fprintf(f, "{\n  \"role\": \"%s\",\n", s->o.sender ? "send" : "recv");
    fprintf(f, "  \"result\": ");
    rdmax_json_string(f, result);
    fprintf(f, ",\n  \"transport\": \"%s\",\n", s->tp ? s->tp->name : "none");
    fprintf(f, "  \"seconds\": %.3f,\n", secs);
    fprintf(f, "  \"lanes\": %u,\n", s->nlanes);
    fprintf(f, "  \"bytes_in\": %llu,\n", (unsigned long long)in);
    fprintf(f, "  \"bytes_wire\": %llu,\n", (unsigned long long)wire);
    fprintf(f, "  \"ratio\": %.4f,\n", wire ? (double)in / (double)wire : 0.0);
    fprintf(f, "  \"pages\": %llu,\n", (unsigned long long)atomic_load(&c->pages));
    fprintf(f, "  \"zero_pages\": %llu,\n", (unsigned long long)atomic_load(&c->zero_pages));
    /* Sender: part of the stream went through unparsed (its pages not in the lanes). */
    fprintf(f, "  \"opaque_tail\": %s,\n", atomic_load(&c->opaque_tail) ? "true" : "false");
    fprintf(f, "  \"control_bytes\": %llu,\n", (unsigned long long)atomic_load(&c->ctrl_bytes));
    fprintf(f, "  \"return_path_bytes\": %llu,\n", (unsigned long long)atomic_load(&c->rp_bytes));
    /* QEMU's further channels (multifd, postcopy preempt): carried beside the main stream. */
    fprintf(f, "  \"qemu_channels\": %u,\n", (unsigned)atomic_load(&c->channels));
    fprintf(f, "  \"channel_bytes\": %llu,\n", (unsigned long long)atomic_load(&c->chan_bytes));
    fprintf(f, "  \"cache_bytes_per_lane\": %llu,\n", (unsigned long long)s->codec.cache_bytes);
    if (s->o.sender) {
        struct rdmax_lane_stats t = lanes_total(s);
        fprintf(f, "  ");
        json_tiers(f, &t);
        fprintf(f, ",\n  \"page_bytes\": %llu,\n  \"batch_bytes\": %llu,\n",
                (unsigned long long)t.bytes_raw, (unsigned long long)t.bytes_wire);
        fprintf(f,
                "  \"batches\": %llu,\n  \"level_changes\": %llu,\n  \"uncached_pages\": %llu,\n",
                (unsigned long long)t.batches, (unsigned long long)t.level_changes,
                (unsigned long long)t.uncached_pages);
        /* Multifd pages, encoded on their channel's own connection (channels.c). */
        t = stats_total(s->chan_stats, RDMAX_CHAN_MAX);
        fprintf(f,
                "  \"channel_codec\": {\"pages\": %llu, \"page_bytes\": %llu, "
                "\"batch_bytes\": %llu, ",
                (unsigned long long)t.pages, (unsigned long long)t.bytes_raw,
                (unsigned long long)t.bytes_wire);
        json_tiers(f, &t);
        fprintf(f, "},\n");
    }
    fprintf(f, "  \"lane\": [");
    for (unsigned i = 0; i < s->nlanes; i++) {
        const struct rdmax_lane_stats *ls = atomic_load(&s->lane_stats[i]);
        fprintf(f, "%s\n    {\"wire_bytes\": %llu", i ? "," : "",
                (unsigned long long)(s->lane[i].bytes_sent + s->lane[i].bytes_received));
        if (ls) {
            fprintf(f,
                    ", \"pages\": %llu, \"batches\": %llu, \"page_bytes\": %llu, "
                    "\"batch_bytes\": %llu, \"zstd_level\": %d, \"level\": %d, "
                    "\"level_changes\": %llu, \"uncached_pages\": %llu, ",
                    (unsigned long long)ls->pages, (unsigned long long)ls->batches,
                    (unsigned long long)ls->bytes_raw, (unsigned long long)ls->bytes_wire,
                    ls->zstd_level, ls->level, (unsigned long long)ls->level_changes,
                    (unsigned long long)ls->uncached_pages);
            json_tiers(f, ls);
        }
        fprintf(f, "}");
    }
    fprintf(f, "%s]\n}\n", s->nlanes ? "\n  " : "");
}

void rdmax_stats_write(struct rdmax_session *s, const char *result)
{
    char tmp[4096];
    FILE *f;

    if (!s->o.stats_json) {
        return;
    }
    snprintf(tmp, sizeof(tmp), "%s.tmp", s->o.stats_json);
    f = fopen(tmp, "w");
    if (!f) {
        fprintf(stderr, "rdma-x: warning: cannot write %s\n", s->o.stats_json);
        return;
    }
    rdmax_stats_json(s, f, result);
    if (fclose(f) != 0 || rename(tmp, s->o.stats_json) != 0) {
        fprintf(stderr, "rdma-x: warning: cannot write %s\n", s->o.stats_json);
    }
}

uint64_t rdmax_stats_qemu_bytes(struct rdmax_session *s)
{
    return atomic_load(&s->c.bytes_in) + atomic_load(&s->c.chan_bytes);
}

void rdmax_stats_summary(struct rdmax_session *s, FILE *f)
{
    uint64_t in = atomic_load(&s->c.bytes_in), wire = wire_bytes(s);
    uint64_t pages = atomic_load(&s->c.pages);

    fprintf(f, "%.1f MiB of stream, %.1f MiB on the wire (ratio %.2f), %llu pages in %u lanes",
            (double)in / 1048576.0, (double)wire / 1048576.0,
            wire ? (double)in / (double)wire : 0.0, (unsigned long long)pages, s->nlanes);
    if (s->o.sender) {
        struct rdmax_lane_stats t = lanes_total(s);
        uint64_t n = 0, looked = t.cache_hits + t.cache_misses;
        for (int k = 0; k < RDMAX_TIER_COUNT; k++) {
            n += t.tier_pages[k];
        }
        fprintf(f, " (");
        for (int k = 0; k < RDMAX_TIER_COUNT; k++) {
            fprintf(f, "%s%s %.0f%%", k ? ", " : "", tier_names[k],
                    n ? 100.0 * (double)t.tier_pages[k] / (double)n : 0.0);
        }
        fprintf(f, "; cache hits %.0f%%)",
                looked ? 100.0 * (double)t.cache_hits / (double)looked : 0.0);
    }
    if (atomic_load(&s->c.channels)) {
        fprintf(f, ", %u QEMU channels (%.1f MiB)", (unsigned)atomic_load(&s->c.channels),
                (double)atomic_load(&s->c.chan_bytes) / 1048576.0);
    }
}

static void progress_line(struct rdmax_session *s, bool final)
{
    double last_t = s->prog_last_t;
    uint64_t last_in = s->prog_last_in;
    double t = rdmax_now();
    uint64_t in = atomic_load(&s->c.bytes_in);
    double rate = t > last_t && last_t > 0 ? (double)(in - last_in) / (t - last_t) : 0;

    uint64_t wire = wire_bytes(s);
    char tiers[160] = "";

    if (s->o.sender) {
        struct rdmax_lane_stats lt = lanes_total(s);
        uint64_t looked = lt.cache_hits + lt.cache_misses;
        snprintf(tiers, sizeof(tiers),
                 " (delta %llu, unchanged %llu, full %llu), cache hits %.0f%%",
                 (unsigned long long)lt.tier_pages[RDMAX_TIER_DELTA],
                 (unsigned long long)lt.tier_pages[RDMAX_TIER_UNCHANGED],
                 (unsigned long long)lt.tier_pages[RDMAX_TIER_FULL],
                 looked ? 100.0 * (double)lt.cache_hits / (double)looked : 0.0);
    }
    fprintf(stderr,
            "\rrdma-x %s: %.1f MiB stream, %.1f MiB wire (ratio %.1f), %.1f MiB/s, "
            "%llu pages%s, %u lanes%s",
            s->o.sender ? "send" : "recv", (double)in / 1048576.0, (double)wire / 1048576.0,
            wire ? (double)in / (double)wire : 0.0, rate / 1048576.0,
            (unsigned long long)atomic_load(&s->c.pages), tiers, s->nlanes, final ? "\n" : "   ");
    s->prog_last_t = t;
    s->prog_last_in = in;
}

static void *progress_main(void *arg)
{
    struct rdmax_session *s = arg;
    struct pollfd stop = {.fd = s->stop_fd, .events = POLLIN};

    while (poll(&stop, 1, 1000) == 0) {
        progress_line(s, false);
    }
    return NULL;
}

void rdmax_progress_start(struct rdmax_session *s)
{
    if (!s->o.progress) {
        return;
    }
    s->progress_started = pthread_create(&s->progress, NULL, progress_main, s) == 0;
}

void rdmax_progress_final(struct rdmax_session *s)
{
    if (s->o.progress) {
        progress_line(s, true);
    }
}
