/*
 * --stats-json (written at exit, also on failure) and --progress (one live
 * line on stderr).
 */
#include "session.h"

#include <glib.h>
#include <pthread.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static _Atomic bool log_quiet;

static void log_handler(const gchar *domain, GLogLevelFlags level, const gchar *msg, gpointer arg)
{
    bool debug = level & (G_LOG_LEVEL_INFO | G_LOG_LEVEL_DEBUG);
    const char *want = getenv("G_MESSAGES_DEBUG");

    if (atomic_load(&log_quiet) && !(level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL))) {
        return;
    }
    if (debug && !(want && (strcmp(want, "all") == 0 || (domain && strstr(want, domain))))) {
        return;
    }
    fprintf(stderr, "rdma-x: %s: %s\n",
            level & (G_LOG_LEVEL_ERROR | G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_WARNING) ? "warning"
            : debug                                                                  ? "debug"
                                                                                     : "note",
            msg);
}

void rdmax_log_init(void)
{
    g_log_set_default_handler(log_handler, NULL);
}

void rdmax_log_quiet(bool quiet)
{
    atomic_store(&log_quiet, quiet);
}

static void json_string(FILE *f, const char *s)
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

static uint64_t wire_bytes(void)
{
    uint64_t n = rdmax_s.ctrl.bytes_sent + rdmax_s.ctrl.bytes_received;

    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        n += rdmax_s.lane[i].bytes_sent + rdmax_s.lane[i].bytes_received;
    }
    return n;
}

static const char *const tier_names[RDMAX_TIER_COUNT] = {"unchanged", "zero", "delta", "full"};

/* Sum of the lanes' encoder counters (sender only; zero on the receiver). */
static struct rdmax_lane_stats lanes_total(void)
{
    struct rdmax_lane_stats t = {0};

    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        const struct rdmax_lane_stats *ls = atomic_load(&rdmax_s.lane_stats[i]);
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

void rdmax_stats_write(const char *result)
{
    const struct rdmax_counters *c = &rdmax_s.c;
    char tmp[4096];
    FILE *f;
    double secs = rdmax_now() - rdmax_s.t0;
    uint64_t in = atomic_load(&c->bytes_in);
    uint64_t wire = wire_bytes();

    if (!rdmax_s.o.stats_json) {
        return;
    }
    snprintf(tmp, sizeof(tmp), "%s.tmp", rdmax_s.o.stats_json);
    f = fopen(tmp, "w");
    if (!f) {
        fprintf(stderr, "rdma-x: warning: cannot write %s\n", rdmax_s.o.stats_json);
        return;
    }
    fprintf(f, "{\n  \"role\": \"%s\",\n", rdmax_s.o.sender ? "send" : "recv");
    fprintf(f, "  \"result\": ");
    json_string(f, result);
    fprintf(f, ",\n  \"transport\": \"%s\",\n", rdmax_s.tp ? rdmax_s.tp->name : "none");
    fprintf(f, "  \"seconds\": %.3f,\n", secs);
    fprintf(f, "  \"lanes\": %u,\n", rdmax_s.nlanes);
    fprintf(f, "  \"bytes_in\": %llu,\n", (unsigned long long)in);
    fprintf(f, "  \"bytes_wire\": %llu,\n", (unsigned long long)wire);
    fprintf(f, "  \"ratio\": %.4f,\n", wire ? (double)in / (double)wire : 0.0);
    fprintf(f, "  \"pages\": %llu,\n", (unsigned long long)atomic_load(&c->pages));
    fprintf(f, "  \"zero_pages\": %llu,\n", (unsigned long long)atomic_load(&c->zero_pages));
    fprintf(f, "  \"control_bytes\": %llu,\n", (unsigned long long)atomic_load(&c->ctrl_bytes));
    fprintf(f, "  \"return_path_bytes\": %llu,\n", (unsigned long long)atomic_load(&c->rp_bytes));
    fprintf(f, "  \"cache_bytes_per_lane\": %llu,\n",
            (unsigned long long)rdmax_s.codec.cache_bytes);
    if (rdmax_s.o.sender) {
        struct rdmax_lane_stats t = lanes_total();
        fprintf(f, "  ");
        json_tiers(f, &t);
        fprintf(f, ",\n  \"page_bytes\": %llu,\n  \"batch_bytes\": %llu,\n",
                (unsigned long long)t.bytes_raw, (unsigned long long)t.bytes_wire);
        fprintf(f, "  \"batches\": %llu,\n  \"level_changes\": %llu,\n  \"uncached_pages\": %llu,\n",
                (unsigned long long)t.batches, (unsigned long long)t.level_changes,
                (unsigned long long)t.uncached_pages);
    }
    fprintf(f, "  \"lane\": [");
    for (unsigned i = 0; i < rdmax_s.nlanes; i++) {
        const struct rdmax_lane_stats *ls = atomic_load(&rdmax_s.lane_stats[i]);
        fprintf(f, "%s\n    {\"wire_bytes\": %llu", i ? "," : "",
                (unsigned long long)(rdmax_s.lane[i].bytes_sent + rdmax_s.lane[i].bytes_received));
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
    fprintf(f, "%s]\n}\n", rdmax_s.nlanes ? "\n  " : "");
    if (fclose(f) != 0 || rename(tmp, rdmax_s.o.stats_json) != 0) {
        fprintf(stderr, "rdma-x: warning: cannot write %s\n", rdmax_s.o.stats_json);
    }
}

static void progress_line(bool final)
{
    static double last_t;
    static uint64_t last_in;
    double t = rdmax_now();
    uint64_t in = atomic_load(&rdmax_s.c.bytes_in);
    double rate = t > last_t && last_t > 0 ? (double)(in - last_in) / (t - last_t) : 0;

    uint64_t wire = wire_bytes();
    char tiers[160] = "";

    if (rdmax_s.o.sender) {
        struct rdmax_lane_stats lt = lanes_total();
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
            rdmax_s.o.sender ? "send" : "recv", (double)in / 1048576.0, (double)wire / 1048576.0,
            wire ? (double)in / (double)wire : 0.0, rate / 1048576.0,
            (unsigned long long)atomic_load(&rdmax_s.c.pages), tiers, rdmax_s.nlanes,
            final ? "\n" : "   ");
    last_t = t;
    last_in = in;
}

static void *progress_main(void *arg)
{
    for (;;) {
        sleep(1);
        progress_line(false);
    }
    return arg;
}

void rdmax_progress_start(void)
{
    pthread_t t;

    if (!rdmax_s.o.progress) {
        return;
    }
    pthread_create(&t, NULL, progress_main, NULL);
    pthread_detach(t);
}

void rdmax_progress_final(void)
{
    if (rdmax_s.o.progress) {
        progress_line(true);
    }
}
