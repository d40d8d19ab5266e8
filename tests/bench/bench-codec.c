/*
 * bench-codec: per-core speed and ratio of the page codecs, side by side on
 * the same pages in one run (DESIGN.md "Measured, not assumed").
 *
 * Pages: three contents (zero; realistic: 4 KiB pieces of the machine's own
 * binaries, libraries and text files; random from a seed), each re-sent
 * with 0, 1, 10, 50 and 100% of its bytes changed. Changes are runs of 1..8
 * bytes at random places (stores of various widths), new byte = old ^ r,
 * r != 0, until the share of changed bytes is reached.
 *
 * Contenders, each timed alone on one pinned core:
 *   delta/<impl>    our delta codec (plugin/delta.c), each SIMD variant;
 *                   cap 4095: a page whose delta would not be smaller than
 *                   the page counts as 4096 bytes (sent whole)
 *   xbzrle-qemu     QEMU's XBZRLE format (plugin/xbzrle-ref.c), cap 4096
 *                   like QEMU; overflow counts 4096
 *   zstd-1          plain zstd level 1 over batches of 64 pages
 *   lane/z1         the lane codec (tiers + cache + zstd 1) re-sending the
 *   lane/adaptive   pages against a cache holding the previous versions,
 *   lane/raw        at fixed level 1, adaptive level, and never compressing
 *   lane-nocache/z1 the lane codec without a cache: zero and full tiers only,
 *                   the figure to hold against plain zstd-1
 * enc MB/s and dec MB/s count page bytes (4096 per page) per second; ratio
 * is page bytes / encoded bytes ("inf" when nothing at all is sent).
 *
 * Usage: bench-codec [--json] [--pages N] [--seconds S] [--cpu N] [--wall]
 *                    [--content zero|real|random] [--smoke]
 * Time is this thread's CPU time unless --wall (the machine may be shared).
 * --smoke: a few pages, one iteration per cell (meson test, so the bench
 * cannot rot unnoticed).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <sched.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zstd.h>

#include "delta.h"
#include "lane-codec.h"
#include "xbzrle-ref.h"

#define PS RDMAX_PAGE_SIZE
#define BATCH RDMAX_BATCH_MAX_PAGES

static const unsigned dirty_pcts[] = {0, 1, 10, 50, 100};
static const char *const content_names[] = {"zero", "real", "random"};

struct opts {
    size_t pages;
    double seconds;
    int cpu;
    bool json, smoke, wall;
    int content; /* -1: all */
};

static struct opts o = {.pages = 8192, .seconds = 0.2, .cpu = -1, .content = -1};

/* ---- small utilities ---------------------------------------------------- */

/*
 * Passes are timed in this thread's CPU time by default: the machine is
 * shared, and the figure wanted is what one core does, not how much of a
 * core the scheduler gave us (--wall for wall-clock time).
 */
static clockid_t bench_clock = CLOCK_THREAD_CPUTIME_ID;

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(bench_clock, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rng_s = 0x5eed;

static uint64_t rng(void)
{
    uint64_t z = (rng_s += UINT64_C(0x9e3779b97f4a7c15));

    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

static void *xmalloc(size_t n)
{
    void *p = aligned_alloc(64, (n + 63) & ~(size_t)63);

    if (!p) {
        fprintf(stderr, "bench-codec: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* ---- realistic pages: this machine's own files -------------------------- */

struct src {
    const char *const *dirs;
    bool (*want)(const char *name);
    size_t taken, goal;
};

static bool want_any(const char *name)
{
    return name[0] != '.';
}

static bool want_lib(const char *name)
{
    return strstr(name, ".so") != NULL;
}

static bool want_text(const char *name)
{
    size_t n = strlen(name);

    return (n > 2 && strcmp(name + n - 2, ".h") == 0) || strcmp(name, "copyright") == 0 ||
           (n > 3 && strcmp(name + n - 3, ".pm") == 0) ||
           (n > 3 && strcmp(name + n - 3, ".py") == 0);
}

/* At most this many pages per file, so no one big file dominates. */
#define PAGES_PER_FILE 32

static void take_file(const char *path, struct src *s, uint8_t *pages, size_t *n)
{
    int fd = open(path, O_RDONLY | O_NOFOLLOW);
    unsigned k;

    if (fd < 0) {
        return;
    }
    for (k = 0; k < PAGES_PER_FILE && s->taken < s->goal; k++) {
        uint8_t *p = pages + *n * PS;
        ssize_t r = read(fd, p, PS);

        if (r <= 0) {
            break;
        }
        if (r < (ssize_t)PS) {
            memset(p + r, 0, PS - (size_t)r); /* as the tail of a mapped file */
        }
        (*n)++;
        s->taken++;
    }
    close(fd);
}

/* Sorted, recursive, deterministic on one machine. */
static void walk(const char *dir, struct src *s, uint8_t *pages, size_t *n, int depth)
{
    struct dirent **ents;
    int cnt, i;

    if (depth > 6 || s->taken >= s->goal) {
        return;
    }
    cnt = scandir(dir, &ents, NULL, alphasort);
    if (cnt < 0) {
        return;
    }
    for (i = 0; i < cnt; i++) {
        char path[4096];
        struct stat st;

        if (s->taken < s->goal && ents[i]->d_name[0] != '.') {
            snprintf(path, sizeof(path), "%s/%s", dir, ents[i]->d_name);
            if (lstat(path, &st) == 0) {
                if (S_ISDIR(st.st_mode)) {
                    walk(path, s, pages, n, depth + 1);
                } else if (S_ISREG(st.st_mode) && s->want(ents[i]->d_name)) {
                    take_file(path, s, pages, n);
                }
            }
        }
        free(ents[i]);
    }
    free(ents);
}

static size_t load_real(uint8_t *pages, size_t want, unsigned *nsrc_files)
{
    static const char *const bins[] = {"/usr/bin", "/usr/sbin", NULL};
    static const char *const libs[] = {"/usr/lib/x86_64-linux-gnu", "/usr/lib", NULL};
    static const char *const text[] = {"/usr/include", "/usr/share/doc", "/usr/share/perl",
                                       "/usr/lib/python3", NULL};
    struct src srcs[3] = {
        {bins, want_any, 0, want / 3},
        {libs, want_lib, 0, want / 3},
        {text, want_text, 0, want - 2 * (want / 3)},
    };
    size_t n = 0, i, j;

    for (i = 0; i < 3; i++) {
        for (j = 0; srcs[i].dirs[j]; j++) {
            walk(srcs[i].dirs[j], &srcs[i], pages, &n, 0);
        }
    }
    *nsrc_files = (unsigned)n;
    /* Short of files: fill up with copies, still real bytes. */
    for (i = 0; n && i < want - n; i++) {
        memcpy(pages + (n + i) * PS, pages + (i % n) * PS, PS);
    }
    if (n == 0) {
        memset(pages, 0, want * PS);
    }
    return n;
}

/* ---- the page sets ------------------------------------------------------- */

static size_t real_from_files; /* pages of `real` read from files (rest: copies) */

static void make_content(int content, uint8_t *pages, size_t n)
{
    size_t i;
    unsigned files;

    switch (content) {
    case 0:
        memset(pages, 0, n * PS);
        break;
    case 1:
        real_from_files = load_real(pages, n, &files);
        break;
    default:
        for (i = 0; i < n * PS / 8; i++) {
            uint64_t v = rng();

            memcpy(pages + i * 8, &v, 8);
        }
        break;
    }
}

static void make_dirty(const uint8_t *old, uint8_t *cur, size_t n, unsigned pct)
{
    size_t i;

    memcpy(cur, old, n * PS);
    if (pct == 0) {
        return;
    }
    for (i = 0; i < n; i++) {
        uint8_t *p = cur + i * PS;
        size_t goal = (size_t)PS * pct / 100, changed = 0;

        if (pct == 100) {
            size_t j;

            for (j = 0; j < PS; j++) {
                p[j] ^= (uint8_t)(1 + rng() % 255);
            }
            continue;
        }
        while (changed < goal) {
            size_t at = rng() % PS, run = 1 + rng() % 8, j;

            for (j = 0; j < run && at + j < PS && changed < goal; j++) {
                if (p[at + j] == old[i * PS + at + j]) {
                    p[at + j] ^= (uint8_t)(1 + rng() % 255);
                    changed++;
                }
            }
        }
    }
}

/* ---- measurement ---------------------------------------------------------- */

struct result {
    const char *content, *codec, *impl;
    unsigned dirty;
    double enc_avg, enc_peak, dec_avg, dec_peak; /* MB/s of page bytes */
    double ratio;                                /* INFINITY: nothing sent */
    double bytes_per_page;
};

static struct result results[512];
static size_t nresults;

typedef double (*pass_fn)(void *ctx); /* one pass over all pages; returns seconds */

/* Warm up, then repeat for o.seconds (at least twice); MB/s avg and peak. */
static void measure(pass_fn fn, void *ctx, size_t pages, double *avg, double *peak)
{
    double total = 0, best = INFINITY;
    unsigned iters = 0;

    fn(ctx);
    do {
        double t = fn(ctx);

        total += t;
        if (t < best) {
            best = t;
        }
        iters++;
    } while (!o.smoke && (total < o.seconds || iters < 2));
    *avg = (double)pages * PS / (total / iters) / 1e6;
    *peak = (double)pages * PS / best / 1e6;
}

struct set {
    size_t n;
    uint8_t *old, *cur, *out; /* n pages each */
    uint8_t *enc;             /* n * (PS + 8) */
    ssize_t *len;             /* per page */
};

/* delta */
struct delta_ctx {
    struct set *s;
    const struct rdmax_delta_ops *ops;
};

static double delta_enc_pass(void *arg)
{
    struct delta_ctx *c = arg;
    struct set *s = c->s;
    double t0 = now_s();
    size_t i;

    for (i = 0; i < s->n; i++) {
        s->len[i] =
            c->ops->encode(s->enc + i * (PS + 8), PS - 1, s->old + i * PS, s->cur + i * PS, PS);
    }
    return now_s() - t0;
}

static double delta_dec_pass(void *arg)
{
    struct delta_ctx *c = arg;
    struct set *s = c->s;
    double t0 = now_s();
    size_t i;

    for (i = 0; i < s->n; i++) {
        uint8_t *out = s->out + (i % 64) * PS;

        if (s->len[i] >= 0) {
            if (c->ops->decode(out, PS, s->old + i * PS, s->enc + i * (PS + 8), (size_t)s->len[i]) <
                0) {
                fprintf(stderr, "bench-codec: delta decode failed\n");
                exit(1);
            }
        } else {
            memcpy(out, s->cur + i * PS, PS); /* sent whole */
        }
    }
    return now_s() - t0;
}

/* QEMU XBZRLE */
static double xbz_enc_pass(void *arg)
{
    struct set *s = arg;
    double t0 = now_s();
    size_t i;

    for (i = 0; i < s->n; i++) {
        s->len[i] = rdmax_xbzrle_ref_encode(s->enc + i * (PS + 8), PS, s->old + i * PS,
                                            s->cur + i * PS, PS);
    }
    return now_s() - t0;
}

static double xbz_dec_pass(void *arg)
{
    struct set *s = arg;
    double t0 = now_s();
    size_t i;

    for (i = 0; i < s->n; i++) {
        uint8_t *out = s->out + (i % 64) * PS;

        if (s->len[i] >= 0) {
            memcpy(out, s->old + i * PS, PS);
            if (rdmax_xbzrle_ref_decode(out, PS, s->enc + i * (PS + 8), (size_t)s->len[i]) < 0) {
                fprintf(stderr, "bench-codec: xbzrle decode failed\n");
                exit(1);
            }
        } else {
            memcpy(out, s->cur + i * PS, PS);
        }
    }
    return now_s() - t0;
}

static double sum_len(struct set *s, size_t full_cost)
{
    double b = 0;
    size_t i;

    for (i = 0; i < s->n; i++) {
        b += s->len[i] >= 0 ? (double)s->len[i] : (double)full_cost;
    }
    return b;
}

/* plain zstd -1 over batches of 64 pages */
struct zstd_ctx {
    struct set *s;
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    uint8_t *z;
    size_t zcap, zbytes;
    size_t *zlen; /* per batch */
};

static double zstd_enc_pass(void *arg)
{
    struct zstd_ctx *c = arg;
    double t0 = now_s();
    size_t b, nb = (c->s->n + BATCH - 1) / BATCH;

    c->zbytes = 0;
    for (b = 0; b < nb; b++) {
        size_t np = c->s->n - b * BATCH < BATCH ? c->s->n - b * BATCH : BATCH;
        size_t r = ZSTD_compressCCtx(c->cctx, c->z + b * c->zcap, c->zcap,
                                     c->s->cur + b * BATCH * PS, np * PS, 1);

        if (ZSTD_isError(r)) {
            fprintf(stderr, "bench-codec: zstd: %s\n", ZSTD_getErrorName(r));
            exit(1);
        }
        c->zlen[b] = r;
        c->zbytes += r;
    }
    return now_s() - t0;
}

static double zstd_dec_pass(void *arg)
{
    struct zstd_ctx *c = arg;
    double t0 = now_s();
    size_t b, nb = (c->s->n + BATCH - 1) / BATCH;

    for (b = 0; b < nb; b++) {
        size_t r =
            ZSTD_decompressDCtx(c->dctx, c->s->out, BATCH * PS, c->z + b * c->zcap, c->zlen[b]);

        if (ZSTD_isError(r)) {
            fprintf(stderr, "bench-codec: zstd: %s\n", ZSTD_getErrorName(r));
            exit(1);
        }
    }
    return now_s() - t0;
}

/*
 * Lane codec. The caches start out holding the old versions. A pass re-sends
 * every page's new version (timed), then the old ones again (not timed), so
 * each timed pass finds the caches as the first one did. The decoder
 * replays the recorded batches of both halves the same way.
 */
struct lane_ctx {
    struct set *s;
    struct rdmax_codec_config cfg;
    struct rdmax_lane_encoder *enc;
    struct rdmax_lane_decoder *dec;
    uint8_t *batches; /* two passes' worth of batches, for the decoder */
    size_t bcap, blen[2], *bl[2], nb;
    uint64_t wire; /* bytes of the last timed half */
    volatile uint8_t sink;
};

/* Send all pages of `slot` (0: new versions, 1: old ones); returns seconds. */
static double lane_enc_half(struct lane_ctx *c, unsigned slot)
{
    const uint8_t *pages = slot ? c->s->old : c->s->cur;
    uint8_t *out = c->batches + (size_t)slot * c->nb * c->bcap;
    double t0 = now_s();
    size_t i, b = 0;
    uint64_t wire = 0;

    for (i = 0; i < c->s->n; i++) {
        rdmax_lane_encoder_add(c->enc, (struct rdmax_page_key){0, i * PS}, pages + i * PS);
        if (rdmax_lane_encoder_pending(c->enc) == BATCH || i + 1 == c->s->n) {
            ssize_t r = rdmax_lane_encoder_flush(c->enc, out + b * c->bcap, c->bcap);

            if (r <= 0) {
                fprintf(stderr, "bench-codec: lane flush: %zd\n", r);
                exit(1);
            }
            wire += (uint64_t)r;
            c->bl[slot][b] = (size_t)r;
            b++;
        }
    }
    if (slot == 0) {
        c->wire = wire;
    }
    return now_s() - t0;
}

static double lane_enc_pass(void *arg)
{
    struct lane_ctx *c = arg;
    double t = lane_enc_half(c, 0);

    lane_enc_half(c, 1);
    return t;
}

static int lane_cb(void *arg, struct rdmax_page_key key, const uint8_t *page)
{
    struct lane_ctx *c = arg;

    c->sink ^= page[key.offset / PS % PS];
    return 0;
}

static double lane_dec_half(struct lane_ctx *c, unsigned slot)
{
    const uint8_t *in = c->batches + (size_t)slot * c->nb * c->bcap;
    double t0 = now_s();
    size_t b;

    for (b = 0; b < c->nb; b++) {
        int r = rdmax_lane_decoder_decode(c->dec, in + b * c->bcap, c->bl[slot][b], lane_cb, c);

        if (r < 0) {
            fprintf(stderr, "bench-codec: lane decode: %d\n", r);
            exit(1);
        }
    }
    return now_s() - t0;
}

static double lane_dec_pass(void *arg)
{
    struct lane_ctx *c = arg;
    double t = lane_dec_half(c, 0);

    lane_dec_half(c, 1);
    return t;
}

/*
 * Send old, new, old versions through a fresh encoder and decoder: both
 * caches then hold every page that was ever non-zero, at its old version
 * (a zero page is not inserted when first sent: without the middle round a
 * zero page with changes would go FULL, not DELTA, in the first pass only).
 */
static void lane_prime(struct lane_ctx *c)
{
    uint8_t *tmp = xmalloc(c->bcap);
    unsigned round;
    size_t i;

    for (round = 0; round < 3; round++) {
        const uint8_t *pages = round == 1 ? c->s->cur : c->s->old;

        for (i = 0; i < c->s->n; i++) {
            rdmax_lane_encoder_add(c->enc, (struct rdmax_page_key){0, i * PS}, pages + i * PS);
            if (rdmax_lane_encoder_pending(c->enc) == BATCH || i + 1 == c->s->n) {
                ssize_t r = rdmax_lane_encoder_flush(c->enc, tmp, c->bcap);

                if (r <= 0 || rdmax_lane_decoder_decode(c->dec, tmp, (size_t)r, lane_cb, c) < 0) {
                    fprintf(stderr, "bench-codec: lane prime failed\n");
                    exit(1);
                }
            }
        }
    }
    free(tmp);
}

static void bench_lane(struct set *s, const char *content, unsigned dirty, const char *name,
                       uint64_t cache, int level)
{
    struct lane_ctx c = {.s = s, .cfg = {.cache_bytes = cache, .zstd_level = level}};
    struct result *r = &results[nresults++];

    c.bcap = rdmax_lane_encoder_bound();
    c.nb = (s->n + BATCH - 1) / BATCH;
    c.batches = xmalloc(2 * c.nb * c.bcap);
    c.bl[0] = calloc(c.nb, sizeof(size_t));
    c.bl[1] = calloc(c.nb, sizeof(size_t));
    if (rdmax_lane_encoder_create(&c.cfg, &c.enc) < 0 ||
        rdmax_lane_decoder_create(&c.cfg, &c.dec) < 0) {
        fprintf(stderr, "bench-codec: lane create failed\n");
        exit(1);
    }
    lane_prime(&c);
    *r = (struct result){.content = content, .codec = name, .impl = "auto", .dirty = dirty};
    measure(lane_enc_pass, &c, s->n, &r->enc_avg, &r->enc_peak);
    /* The decoder's cache holds `old`, as the encoder's did: replay. */
    measure(lane_dec_pass, &c, s->n, &r->dec_avg, &r->dec_peak);
    r->bytes_per_page = (double)c.wire / (double)s->n;
    r->ratio = (double)PS / r->bytes_per_page;
    rdmax_lane_encoder_destroy(c.enc);
    rdmax_lane_decoder_destroy(c.dec);
    free(c.batches);
    free(c.bl[0]);
    free(c.bl[1]);
}

/* ---- main ------------------------------------------------------------------- */

static void bench_set(struct set *s, const char *content, unsigned dirty)
{
    size_t i;
    uint64_t cache = (uint64_t)s->n * (PS + 64) + (1u << 20);

    for (i = RDMAX_DELTA_SCALAR; i < RDMAX_DELTA_IMPL_COUNT; i++) {
        struct delta_ctx c = {s, rdmax_delta_ops_get((enum rdmax_delta_impl)i)};
        struct result *r;

        if (!c.ops) {
            continue;
        }
        r = &results[nresults++];
        *r = (struct result){
            .content = content, .codec = "delta", .impl = c.ops->name, .dirty = dirty};
        measure(delta_enc_pass, &c, s->n, &r->enc_avg, &r->enc_peak);
        measure(delta_dec_pass, &c, s->n, &r->dec_avg, &r->dec_peak);
        r->bytes_per_page = sum_len(s, PS) / (double)s->n;
        r->ratio = r->bytes_per_page > 0 ? PS / r->bytes_per_page : INFINITY;
    }
    {
        struct result *r = &results[nresults++];

        *r = (struct result){
            .content = content, .codec = "xbzrle-qemu", .impl = "scalar", .dirty = dirty};
        measure(xbz_enc_pass, s, s->n, &r->enc_avg, &r->enc_peak);
        measure(xbz_dec_pass, s, s->n, &r->dec_avg, &r->dec_peak);
        r->bytes_per_page = sum_len(s, PS) / (double)s->n;
        r->ratio = r->bytes_per_page > 0 ? PS / r->bytes_per_page : INFINITY;
    }
    {
        struct zstd_ctx c = {.s = s, .cctx = ZSTD_createCCtx(), .dctx = ZSTD_createDCtx()};
        size_t nb = (s->n + BATCH - 1) / BATCH;
        struct result *r = &results[nresults++];

        c.zcap = ZSTD_compressBound(BATCH * PS);
        c.z = xmalloc(nb * c.zcap);
        c.zlen = calloc(nb, sizeof(size_t));
        *r = (struct result){
            .content = content, .codec = "zstd-1", .impl = ZSTD_versionString(), .dirty = dirty};
        measure(zstd_enc_pass, &c, s->n, &r->enc_avg, &r->enc_peak);
        measure(zstd_dec_pass, &c, s->n, &r->dec_avg, &r->dec_peak);
        r->bytes_per_page = (double)c.zbytes / (double)s->n;
        r->ratio = PS / r->bytes_per_page;
        ZSTD_freeCCtx(c.cctx);
        ZSTD_freeDCtx(c.dctx);
        free(c.z);
        free(c.zlen);
    }
    bench_lane(s, content, dirty, "lane/z1", cache, 1);
    bench_lane(s, content, dirty, "lane/adaptive", cache, 0);
    bench_lane(s, content, dirty, "lane/raw", cache, -1);
    bench_lane(s, content, dirty, "lane-nocache/z1", 0, 1);
}

static void print_ratio(FILE *f, double ratio, bool json)
{
    if (isinf(ratio)) {
        fprintf(f, json ? "null" : "%8s", "inf");
    } else {
        fprintf(f, json ? "%.3f" : "%8.2f", ratio);
    }
}

static void cpu_model(char *buf, size_t n)
{
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];

    snprintf(buf, n, "unknown");
    if (!f) {
        return;
    }
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, "model name", 10) == 0) {
            char *p = strchr(line, ':');

            if (p) {
                snprintf(buf, n, "%s", p + 2);
                buf[strcspn(buf, "\n")] = 0;
            }
            break;
        }
    }
    fclose(f);
}

static const struct result *find(const char *content, unsigned dirty, const char *codec,
                                 const char *impl)
{
    size_t i;

    for (i = 0; i < nresults; i++) {
        const struct result *r = &results[i];

        if (strcmp(r->content, content) == 0 && r->dirty == dirty && strcmp(r->codec, codec) == 0 &&
            (!impl || strcmp(r->impl, impl) == 0)) {
            return r;
        }
    }
    return NULL;
}

/* The targets from the issue, judged on the default delta implementation. */
static void print_targets(FILE *f)
{
    const char *impl = rdmax_delta_ops_get(RDMAX_DELTA_AUTO)->name;
    size_t c, k;

    fprintf(f, "\n# targets (delta impl %s):\n", impl);
    for (c = 0; c < 3; c++) {
        const char *cn = content_names[c];
        const struct result *d1 = find(cn, 1, "delta", impl),
                            *x1 = find(cn, 1, "xbzrle-qemu", NULL);
        double worst = INFINITY;
        unsigned worst_at = 0;
        bool ratio_ok = true;

        if (!d1) {
            continue;
        }
        for (k = 0; k < sizeof(dirty_pcts) / sizeof(dirty_pcts[0]); k++) {
            const struct result *d = find(cn, dirty_pcts[k], "delta", impl);
            const struct result *x = find(cn, dirty_pcts[k], "xbzrle-qemu", NULL);
            const struct result *lz = find(cn, dirty_pcts[k], "lane-nocache/z1", NULL);
            const struct result *zz = find(cn, dirty_pcts[k], "zstd-1", NULL);

            ratio_ok &= d && x && d->bytes_per_page <= x->bytes_per_page;
            if (lz && zz && lz->enc_avg / zz->enc_avg < worst) {
                worst = lz->enc_avg / zz->enc_avg;
                worst_at = dirty_pcts[k];
            }
        }
        fprintf(f, "#  %-6s delta enc at 1%%: %6.0f MB/s (>= 4000) %s\n", cn, d1->enc_avg,
                d1->enc_avg >= 4000 ? "ok" : "MISSED");
        fprintf(f, "#  %-6s delta dec at 1%%: %6.0f MB/s (>= 6000) %s\n", cn, d1->dec_avg,
                d1->dec_avg >= 6000 ? "ok" : "MISSED");
        fprintf(f,
                "#  %-6s delta bytes <= QEMU XBZRLE at every dirty%%: %s (1%%: %.1f vs %.1f "
                "B/page)\n",
                cn, ratio_ok ? "ok" : "MISSED", d1->bytes_per_page, x1 ? x1->bytes_per_page : 0);
        fprintf(f,
                "#  %-6s zstd tier (lane-nocache/z1) vs plain zstd -1, worst over dirty%%: "
                "%.2fx at %u%% (>= 0.9) %s\n",
                cn, worst, worst_at, worst >= 0.9 ? "ok" : "MISSED");
    }
}

static void usage(FILE *f)
{
    fprintf(f, "usage: bench-codec [--json] [--pages N] [--seconds S] [--cpu N] [--wall]\n"
               "                   [--content zero|real|random] [--smoke]\n");
}

int main(int argc, char **argv)
{
    static const struct option lo[] = {
        {"json", no_argument, NULL, 'j'},
        {"pages", required_argument, NULL, 'p'},
        {"seconds", required_argument, NULL, 's'},
        {"cpu", required_argument, NULL, 'c'},
        {"content", required_argument, NULL, 'C'},
        {"smoke", no_argument, NULL, 'S'},
        {"wall", no_argument, NULL, 'w'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    char model[256];
    struct set s;
    unsigned c, k;
    int opt;
    cpu_set_t cs;
    uint8_t *base;
    size_t i;

    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 'j':
            o.json = true;
            break;
        case 'p':
            o.pages = strtoul(optarg, NULL, 0);
            break;
        case 's':
            o.seconds = strtod(optarg, NULL);
            break;
        case 'c':
            o.cpu = atoi(optarg);
            break;
        case 'C':
            for (o.content = 0; o.content < 3; o.content++) {
                if (strcmp(optarg, content_names[o.content]) == 0) {
                    break;
                }
            }
            if (o.content == 3) {
                usage(stderr);
                return 2;
            }
            break;
        case 'S':
            o.smoke = true;
            break;
        case 'w':
            o.wall = true;
            bench_clock = CLOCK_MONOTONIC;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (o.smoke) {
        o.pages = 2 * BATCH + 3;
    }
    if (o.pages < 1 || o.pages > (1u << 22)) {
        fprintf(stderr, "bench-codec: --pages 1..4194304\n");
        return 2;
    }

    /* Pin: per-core figures, and no migration between the two cores. */
    if (o.cpu < 0) {
        o.cpu = sched_getcpu();
    }
    CPU_ZERO(&cs);
    CPU_SET(o.cpu, &cs);
    if (sched_setaffinity(0, sizeof(cs), &cs) < 0) {
        fprintf(stderr, "bench-codec: cannot pin to cpu %d: %s\n", o.cpu, strerror(errno));
    }

    s.n = o.pages;
    base = xmalloc(s.n * PS);
    s.old = xmalloc(s.n * PS);
    s.cur = xmalloc(s.n * PS);
    s.out = xmalloc(BATCH * PS);
    s.enc = xmalloc(s.n * (PS + 8));
    s.len = calloc(s.n, sizeof(ssize_t));

    cpu_model(model, sizeof(model));
    for (c = 0; c < 3; c++) {
        if (o.content >= 0 && (int)c != o.content) {
            continue;
        }
        make_content((int)c, base, s.n);
        for (k = 0; k < sizeof(dirty_pcts) / sizeof(dirty_pcts[0]); k++) {
            memcpy(s.old, base, s.n * PS);
            make_dirty(s.old, s.cur, s.n, dirty_pcts[k]);
            bench_set(&s, content_names[c], dirty_pcts[k]);
        }
    }

    if (o.json) {
        printf("{\n  \"config\": {\"cpu_model\": \"%s\", \"cpu\": %d, \"compiler\": \"%s\", "
               "\"zstd\": \"%s\", \"delta_default\": \"%s\", \"pages\": %zu, "
               "\"seconds_per_cell\": %.3f, \"clock\": \"%s\", \"real_pages_from_files\": %zu, "
               "\"smoke\": %s},\n  \"results\": [",
               model, o.cpu, __VERSION__, ZSTD_versionString(),
               rdmax_delta_ops_get(RDMAX_DELTA_AUTO)->name, s.n, o.seconds,
               o.wall ? "wall" : "thread-cpu", real_from_files, o.smoke ? "true" : "false");
        for (i = 0; i < nresults; i++) {
            const struct result *r = &results[i];

            printf("%s\n    {\"content\": \"%s\", \"dirty_pct\": %u, \"codec\": \"%s\", "
                   "\"impl\": \"%s\", \"page_bytes\": %u, \"pages\": %zu, "
                   "\"enc_mbps_avg\": %.1f, \"enc_mbps_peak\": %.1f, "
                   "\"dec_mbps_avg\": %.1f, \"dec_mbps_peak\": %.1f, "
                   "\"enc_pages_per_s\": %.0f, \"bytes_per_page\": %.2f, \"ratio\": ",
                   i ? "," : "", r->content, r->dirty, r->codec, r->impl, PS, s.n, r->enc_avg,
                   r->enc_peak, r->dec_avg, r->dec_peak, r->enc_avg * 1e6 / PS, r->bytes_per_page);
            print_ratio(stdout, r->ratio, true);
            printf("}");
        }
        printf("\n  ]\n}\n");
        return 0;
    }

    printf("# bench-codec: cpu \"%s\" (pinned to cpu %d), %s, zstd %s\n", model, o.cpu,
           "gcc " __VERSION__, ZSTD_versionString());
    printf("# %zu pages of %u bytes per set, %.2f s (%s time) per cell%s; delta default: %s\n", s.n,
           PS, o.seconds, o.wall ? "wall" : "thread CPU", o.smoke ? " (smoke: one pass)" : "",
           rdmax_delta_ops_get(RDMAX_DELTA_AUTO)->name);
    printf("# real: %zu pages read from /usr/bin, /usr/lib, /usr/include, /usr/share/doc ...\n",
           real_from_files);
    printf("# MB/s = page bytes (4096 per page) per second on one core; ratio = page bytes / "
           "bytes sent\n");
    printf("%-7s %5s %-16s %-8s %10s %10s %10s %10s %10s %8s %9s\n", "#content", "dirty%", "codec",
           "impl", "enc-MB/s", "enc-peak", "dec-MB/s", "dec-peak", "enc-pg/s", "ratio", "B/page");
    for (i = 0; i < nresults; i++) {
        const struct result *r = &results[i];

        printf("%-7s %5u %-16s %-8.8s %10.0f %10.0f %10.0f %10.0f %10.0f ", r->content, r->dirty,
               r->codec, r->impl, r->enc_avg, r->enc_peak, r->dec_avg, r->dec_peak,
               r->enc_avg * 1e6 / PS);
        print_ratio(stdout, r->ratio, false);
        printf(" %9.1f\n", r->bytes_per_page);
    }
    print_targets(stdout);
    return 0;
}
