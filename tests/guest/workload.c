/*
 * workload: the memory workload that runs inside the test and benchmark
 * guests (static binary in the guest initramfs, see scripts/guest/build-initrd).
 *
 * It fills a region of guest RAM, then dirties it at a given rate in one of
 * several patterns, and (with --verify 1) checks that every write it made
 * is still there when it comes back to the page.  A page write lost by a
 * migration therefore shows up on the destination guest's console as
 * "VERIFY-FAIL ..." and as verify_bad=N > 0 in the periodic reports.
 *
 * Verification: every page carries a stamp, an 8-byte value at a word offset,
 * both derived from (seed, page index, generation).  The generation of every
 * page lives in a shadow array that is itself in guest memory, so it migrates
 * with the guest: a lost write either to a page or to the shadow makes the
 * page and the shadow disagree.  Before a page is rewritten, the stamp of its
 * current generation is checked; then the page gets generation+1.  The walk
 * over the region is sequential, so each page is checked once per pass.
 *
 * Modes (--mode), each a fill pattern plus a write pattern:
 *   idle          fill real content, no writes (a verify sweep per report)
 *   sparse-random fill random data,  write 8 bytes per page
 *   sparse-real   fill real content, write 8 bytes per page
 *   page-real     fill real content, rewrite whole pages with real content
 *   page-random   fill random data,  rewrite whole pages with random data
 *   zero-sparse   fill zeroes,       write 8 bytes per page
 * --fill zero|random|real overrides the mode's fill.  "Real content" is the
 * concatenation of the files under --content (binaries, libraries, text)
 * tiled over the region with a shift per tile, and 4 KiB windows of it at
 * random offsets for whole-page rewrites.
 *
 * Output lines (stdout, line-buffered; the guest's console is ttyS0):
 *   WORKLOAD-START mode=... fill=... mib=... rate=... verify=...
 *   WORKLOAD-READY pages=N content_bytes=N populate_ms=N
 *   WORKLOAD-REPORT t=S pass=P pages=N mbps=R verify_checked=N verify_bad=N
 *   VERIFY-FAIL page=N gen=G off=O expected=X found=Y
 *   WORKLOAD-DONE ... verify_bad=N
 * --corrupt-after S undoes one write at S seconds, as a negative control
 * that shows the harness notices a lost write.
 * Exit status: 0, or 2 when verification found a bad page, 1 on usage error.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define PAGE_WORDS (PAGE / 8)
#define MAX_FAIL_LINES 16
#define CONTENT_MAX (64u << 20)

enum fill { FILL_ZERO, FILL_RANDOM, FILL_REAL };
enum write { WR_NONE, WR_SPARSE, WR_PAGE_REAL, WR_PAGE_RANDOM };

static const char *const fill_names[] = {"zero", "random", "real"};
static const char *const write_names[] = {"none", "sparse", "page-real", "page-random"};

static const struct {
    const char *name;
    enum fill fill;
    enum write write;
} modes[] = {
    {"idle", FILL_REAL, WR_NONE},
    {"sparse-random", FILL_RANDOM, WR_SPARSE},
    {"sparse-real", FILL_REAL, WR_SPARSE},
    {"page-real", FILL_REAL, WR_PAGE_REAL},
    {"page-random", FILL_RANDOM, WR_PAGE_RANDOM},
    {"zero-sparse", FILL_ZERO, WR_SPARSE},
};

struct wl {
    /* configuration */
    const char *mode;
    enum fill fill;
    enum write write;
    size_t mib;
    double rate_mb; /* MB/s (1e6 bytes) of pages dirtied; 0 = unpaced */
    double report_s;
    double duration_s; /* 0 = forever */
    bool verify;
    uint64_t seed;
    const char *content_dir;
    double corrupt_after_s; /* test the checker: undo one write at this time */

    /* state, all in guest memory */
    uint8_t *region;
    size_t npages;
    uint32_t *shadow; /* generation of each page's current stamp */
    uint8_t *content;
    size_t content_len;
    uint64_t rng;

    uint64_t pass;
    uint64_t pages_written;
    uint64_t verify_checked;
    uint64_t verify_bad;
    unsigned fail_lines;
};

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_s(double s)
{
    struct timespec ts;

    if (s <= 0) {
        return;
    }
    ts.tv_sec = (time_t)s;
    ts.tv_nsec = (long)((s - ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

static inline uint64_t mix64(uint64_t x)
{
    /* splitmix64 finalizer */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/* The stamp of (page, gen): its value (never 0) and its word offset. */
static inline uint64_t stamp_value(const struct wl *w, size_t page, uint32_t gen)
{
    uint64_t v = mix64(w->seed ^ ((uint64_t)page << 24) ^ gen);

    return v ? v : 1;
}

static inline unsigned stamp_word(const struct wl *w, size_t page, uint32_t gen)
{
    return (unsigned)(mix64(~w->seed ^ ((uint64_t)gen << 32) ^ page) % PAGE_WORDS);
}

static inline uint64_t *page_words(const struct wl *w, size_t page)
{
    return (uint64_t *)(w->region + page * PAGE);
}

static void stamp(struct wl *w, size_t page, uint32_t gen)
{
    page_words(w, page)[stamp_word(w, page, gen)] = stamp_value(w, page, gen);
    w->shadow[page] = gen;
}

static void check(struct wl *w, size_t page)
{
    uint32_t gen = w->shadow[page];
    unsigned off = stamp_word(w, page, gen);
    uint64_t want = stamp_value(w, page, gen);
    uint64_t got = page_words(w, page)[off];

    w->verify_checked++;
    if (got == want) {
        return;
    }
    w->verify_bad++;
    if (w->fail_lines < MAX_FAIL_LINES) {
        printf("VERIFY-FAIL page=%zu gen=%" PRIu32 " off=%u expected=%016" PRIx64
               " found=%016" PRIx64 "\n",
               page, gen, off * 8, want, got);
    } else if (w->fail_lines == MAX_FAIL_LINES) {
        printf("VERIFY-FAIL further failures not printed, see verify_bad\n");
    }
    w->fail_lines++;
}

static int load_file(struct wl *w, const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    ssize_t n;

    if (fd < 0) {
        return -errno;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return 0;
    }
    while (w->content_len < CONTENT_MAX) {
        n = read(fd, w->content + w->content_len, CONTENT_MAX - w->content_len);
        if (n <= 0) {
            break;
        }
        w->content_len += (size_t)n;
    }
    close(fd);
    return 0;
}

static int name_cmp(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}

/* All regular files below dir, in name order, so the content is stable. */
static void load_dir(struct wl *w, const char *dir, int depth)
{
    struct dirent **ents;
    char path[4096];
    struct stat st;
    int n, i;

    n = scandir(dir, &ents, NULL, name_cmp);
    if (n < 0) {
        return;
    }
    for (i = 0; i < n; i++) {
        if (strcmp(ents[i]->d_name, ".") != 0 && strcmp(ents[i]->d_name, "..") != 0 &&
            snprintf(path, sizeof(path), "%s/%s", dir, ents[i]->d_name) < (int)sizeof(path) &&
            lstat(path, &st) == 0) {
            if (S_ISDIR(st.st_mode) && depth < 8) {
                load_dir(w, path, depth + 1);
            } else if (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)) {
                /* links let the image reuse /bin/busybox as content */
                load_file(w, path);
            }
        }
        free(ents[i]);
    }
    free(ents);
}

static int load_content(struct wl *w)
{
    uint8_t *buf = malloc(CONTENT_MAX);

    if (!buf) {
        return -ENOMEM;
    }
    w->content = buf;
    w->content_len = 0;
    load_dir(w, w->content_dir, 0);
    if (w->content_len < 2 * PAGE) {
        /* Fall back to our own binary so "real" still means code. */
        load_file(w, "/proc/self/exe");
    }
    if (w->content_len < 2 * PAGE) {
        return -ENOENT;
    }
    w->content = realloc(buf, w->content_len);
    if (!w->content) {
        w->content = buf;
    }
    return 0;
}

static void fill_page_random(struct wl *w, size_t page)
{
    uint64_t *p = page_words(w, page);
    unsigned i;

    for (i = 0; i < PAGE_WORDS; i++) {
        p[i] = xorshift64(&w->rng);
    }
}

static void fill_page_real_window(struct wl *w, size_t page)
{
    size_t off = (size_t)(xorshift64(&w->rng) % (w->content_len - PAGE + 1));

    memcpy(w->region + page * PAGE, w->content + off, PAGE);
}

static void populate(struct wl *w)
{
    size_t page, len = w->npages * PAGE, pos = 0, tile = 0, src = 0, n;

    switch (w->fill) {
    case FILL_ZERO:
        /* MAP_POPULATE already gave us zeroed pages the guest owns. */
        break;
    case FILL_RANDOM:
        for (page = 0; page < w->npages; page++) {
            fill_page_random(w, page);
        }
        break;
    case FILL_REAL:
        /*
         * Tile the content over the region.  Each tile starts at a shift
         * that is not a multiple of the page size, so tiles do not repeat
         * page for page (real memory has some duplicates, not 1:1 copies).
         */
        while (pos < len) {
            n = w->content_len - src;
            if (n > len - pos) {
                n = len - pos;
            }
            memcpy(w->region + pos, w->content + src, n);
            pos += n;
            src += n;
            if (src >= w->content_len) {
                tile++;
                src = (tile * 1237u * 8u) % (w->content_len - PAGE);
            }
        }
        break;
    }
    for (page = 0; page < w->npages; page++) {
        stamp(w, page, 0);
    }
}

static void write_page(struct wl *w, size_t page)
{
    uint32_t gen = w->shadow[page] + 1;

    if (w->verify) {
        check(w, page);
    }
    switch (w->write) {
    case WR_NONE:
        return;
    case WR_SPARSE:
        /* the stamp itself is the 8-byte write */
        break;
    case WR_PAGE_REAL:
        fill_page_real_window(w, page);
        break;
    case WR_PAGE_RANDOM:
        fill_page_random(w, page);
        break;
    }
    stamp(w, page, gen);
    w->pages_written++;
}

static void report(struct wl *w, double t, double rate_mbps, const char *tag)
{
    printf("%s t=%.1f pass=%" PRIu64 " pages=%" PRIu64 " mbps=%.1f"
           " verify_checked=%" PRIu64 " verify_bad=%" PRIu64 "\n",
           tag, t, w->pass, w->pages_written, rate_mbps, w->verify_checked, w->verify_bad);
}

static void run(struct wl *w)
{
    const double pps = w->rate_mb * 1e6 / PAGE; /* pages per second */
    const size_t chunk = pps > 0 && pps < 64 * 20 ? 1 : 64;
    double t0 = now_s(), t_pace = t0, t_rep = t0, t, target;
    uint64_t paced = 0, rep_pages = 0;
    size_t page = 0, i, victim;
    bool corrupted = false;

    for (;;) {
        if (w->write == WR_NONE) {
            /* idle: sweep-check once per report interval */
            if (w->verify) {
                for (i = 0; i < w->npages; i++) {
                    check(w, i);
                }
            }
            w->pass++;
            sleep_s(w->report_s);
        } else {
            for (i = 0; i < chunk && w->npages; i++) {
                write_page(w, page);
                if (++page == w->npages) {
                    page = 0;
                    w->pass++;
                }
            }
            paced += chunk;
            if (pps > 0) {
                target = t_pace + paced / pps;
                t = now_s();
                if (t < target) {
                    sleep_s(target - t);
                } else if (t - target > 1.0) {
                    /* fell behind (VM stopped, host busy): no burst after */
                    t_pace = t;
                    paced = 0;
                }
            } else if ((paced & 4095) != 0) {
                continue;
            }
        }
        t = now_s();
        if (w->corrupt_after_s > 0 && !corrupted && t - t0 >= w->corrupt_after_s && w->npages) {
            /* what a lost page write looks like: the stamp is stale */
            victim = w->npages / 2;
            page_words(w, victim)[stamp_word(w, victim, w->shadow[victim])] ^= 1;
            corrupted = true;
            printf("WORKLOAD-CORRUPTED page=%zu\n", victim);
        }
        if (t - t_rep >= w->report_s) {
            report(w, t - t0, (w->pages_written - rep_pages) * (double)PAGE / 1e6 / (t - t_rep),
                   "WORKLOAD-REPORT");
            rep_pages = w->pages_written;
            t_rep = t;
        }
        if (w->duration_s > 0 && t - t0 >= w->duration_s) {
            break;
        }
    }
    report(w, now_s() - t0, 0, "WORKLOAD-DONE");
}

static void usage(FILE *f)
{
    fprintf(f, "usage: workload [--mode M] [--mib N] [--rate MBps] [--report S]\n"
               "                [--duration S] [--verify 0|1] [--fill F]\n"
               "                [--seed N] [--content DIR]\n"
               "  --mode     idle|sparse-random|sparse-real|page-real|"
               "page-random|zero-sparse\n"
               "             (default sparse-random)\n"
               "  --mib      region size in MiB (default 64)\n"
               "  --rate     MB/s of pages dirtied, 0 = unpaced (default 20)\n"
               "  --report   seconds between WORKLOAD-REPORT lines (default 1)\n"
               "  --duration seconds to run, 0 = forever (default 0)\n"
               "  --verify   check every write on the next visit (default 1)\n"
               "  --fill     zero|random|real: override the mode's fill\n"
               "  --seed     stamp/random seed (default 1)\n"
               "  --content  directory of real files (default /content)\n"
               "  --corrupt-after S  flip one stamp at S seconds (tests the"
               " checker)\n");
}

static int parse_enum(const char *s, const char *const *names, int n)
{
    int i;

    for (i = 0; i < n; i++) {
        if (strcmp(s, names[i]) == 0) {
            return i;
        }
    }
    return -1;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"mode", required_argument, NULL, 'm'},     {"mib", required_argument, NULL, 's'},
        {"rate", required_argument, NULL, 'r'},     {"report", required_argument, NULL, 'i'},
        {"duration", required_argument, NULL, 'd'}, {"verify", required_argument, NULL, 'v'},
        {"fill", required_argument, NULL, 'f'},     {"seed", required_argument, NULL, 'S'},
        {"content", required_argument, NULL, 'c'},  {"corrupt-after", required_argument, NULL, 'C'},
        {"help", no_argument, NULL, 'h'},           {NULL, 0, NULL, 0},
    };
    struct wl *w;
    const char *fill_arg = NULL;
    double t0;
    size_t i;
    int c, k;

    /* The whole state lives in guest memory; a static struct would too. */
    w = calloc(1, sizeof(*w));
    if (!w) {
        return 1;
    }
    w->mode = "sparse-random";
    w->mib = 64;
    w->rate_mb = 20;
    w->report_s = 1;
    w->verify = true;
    w->seed = 1;
    w->content_dir = "/content";
    setvbuf(stdout, NULL, _IOLBF, 0);

    while ((c = getopt_long(argc, argv, "m:s:r:i:d:v:f:S:c:C:h", opts, NULL)) != -1) {
        switch (c) {
        case 'm':
            w->mode = optarg;
            break;
        case 's':
            w->mib = strtoull(optarg, NULL, 0);
            break;
        case 'r':
            w->rate_mb = strtod(optarg, NULL);
            break;
        case 'i':
            w->report_s = strtod(optarg, NULL);
            break;
        case 'd':
            w->duration_s = strtod(optarg, NULL);
            break;
        case 'v':
            w->verify = atoi(optarg) != 0;
            break;
        case 'f':
            fill_arg = optarg;
            break;
        case 'S':
            w->seed = strtoull(optarg, NULL, 0);
            break;
        case 'c':
            w->content_dir = optarg;
            break;
        case 'C':
            w->corrupt_after_s = strtod(optarg, NULL);
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 1;
        }
    }
    for (i = 0; i < sizeof(modes) / sizeof(modes[0]); i++) {
        if (strcmp(w->mode, modes[i].name) == 0) {
            break;
        }
    }
    if (i == sizeof(modes) / sizeof(modes[0])) {
        fprintf(stderr, "workload: unknown mode '%s'\n", w->mode);
        usage(stderr);
        return 1;
    }
    w->fill = modes[i].fill;
    w->write = modes[i].write;
    if (fill_arg) {
        k = parse_enum(fill_arg, fill_names, 3);
        if (k < 0) {
            fprintf(stderr, "workload: unknown fill '%s'\n", fill_arg);
            return 1;
        }
        w->fill = (enum fill)k;
    }
    if (w->report_s <= 0) {
        w->report_s = 1;
    }
    w->rng = mix64(w->seed) | 1;
    w->npages = (w->mib << 20) / PAGE;
    if (!w->npages) {
        w->write = WR_NONE;
    }

    printf("WORKLOAD-START mode=%s fill=%s write=%s mib=%zu rate=%.1f "
           "report=%.1f duration=%.1f verify=%d seed=%" PRIu64 "\n",
           w->mode, fill_names[w->fill], write_names[w->write], w->mib, w->rate_mb, w->report_s,
           w->duration_s, w->verify, w->seed);

    t0 = now_s();
    if ((w->fill == FILL_REAL || w->write == WR_PAGE_REAL) && load_content(w) != 0) {
        fprintf(stderr, "workload: no content under %s\n", w->content_dir);
        return 1;
    }
    /* No swap in the guest, but keep it that way even if there were. */
    mlockall(MCL_CURRENT | MCL_FUTURE);
    if (w->npages) {
        w->region = mmap(NULL, w->npages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        w->shadow = mmap(NULL, w->npages * sizeof(*w->shadow), PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (w->region == MAP_FAILED || w->shadow == MAP_FAILED) {
            fprintf(stderr, "workload: cannot map %zu MiB: %s\n", w->mib, strerror(errno));
            return 1;
        }
        populate(w);
    }
    printf("WORKLOAD-READY pages=%zu content_bytes=%zu populate_ms=%.0f\n", w->npages,
           w->content_len, (now_s() - t0) * 1e3);

    run(w);
    return w->verify_bad ? 2 : 0;
}
