/* Command line of rdma-x send / rdma-x recv. */
#include <stdio.h>

#include "cli.h"

#include <errno.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "transport.h"

#include <openssl/crypto.h>

void rdmax_cli_usage(FILE *f)
{
    fprintf(f, "Usage: rdma-x send --to HOST:PORT [OPTIONS]\n"
               "       rdma-x recv --listen ADDR:PORT [OPTIONS]\n"
               "       rdma-x keygen > KEYFILE     (a key for --psk-file: 64 hex digits)\n"
               "       rdma-x status PATH [--json] (what a --status-socket PATH rdma-x does)\n"
               "       rdma-x --help | --version\n"
               "\n"
               "A QEMU live-migration accelerator. QEMU starts both halves itself:\n"
               "  destination:  qemu-system-x86_64 ... -incoming 'exec:rdma-x recv --listen "
               "0.0.0.0:7070'\n"
               "  source (QMP): migrate-set-capabilities return-path=on,\n"
               "                migrate-set-parameters max-bandwidth=<above the link rate>,\n"
               "                migrate uri=\"exec:rdma-x send --to DEST:7070\"\n"
               "\n"
               "Run 'rdma-x send --help' or 'rdma-x recv --help' for the options.\n");
}

int rdmax_cli_keygen(int argc, char **argv)
{
    uint8_t key[RDMAX_PSK_LEN];
    char hex[2 * sizeof(key) + 2];
    static const char digits[] = "0123456789abcdef";

    if (argc > 1) {
        if (strcmp(argv[1], "--help") != 0 && strcmp(argv[1], "-h") != 0) {
            fprintf(stderr, "rdma-x: error: keygen takes no arguments (rdma-x keygen > FILE)\n");
            return 2;
        }
        printf("Usage: rdma-x keygen > KEYFILE\n"
               "\n"
               "Print a new pre-shared key for --psk-file: 32 random bytes from the\n"
               "kernel (getrandom), as 64 hex digits and a newline. Keep the file\n"
               "private (chmod 600 KEYFILE) and copy it to the other host securely.\n");
        return 0;
    }
    if (getrandom(key, sizeof(key), 0) != (ssize_t)sizeof(key)) {
        fprintf(stderr, "rdma-x: error: no randomness for the key: %s\n", strerror(errno));
        return 1;
    }
    for (size_t i = 0; i < sizeof(key); i++) {
        hex[2 * i] = digits[key[i] >> 4];
        hex[2 * i + 1] = digits[key[i] & 15];
    }
    hex[2 * sizeof(key)] = '\n';
    hex[2 * sizeof(key) + 1] = '\0';
    OPENSSL_cleanse(key, sizeof(key));
    if (fputs(hex, stdout) == EOF || fflush(stdout) != 0) {
        OPENSSL_cleanse(hex, sizeof(hex));
        fprintf(stderr, "rdma-x: error: writing the key: %s\n", strerror(errno));
        return 1;
    }
    OPENSSL_cleanse(hex, sizeof(hex));
    return 0;
}

static void usage_sub(FILE *f, bool sender)
{
    if (sender) {
        fprintf(f,
                "Usage: rdma-x send --to HOST:PORT [OPTIONS]\n"
                "\n"
                "Source side. Reads the QEMU migration stream on stdin, carries it to\n"
                "'rdma-x recv' on HOST:PORT, and writes the return path (the destination\n"
                "QEMU's replies) to stdout. Exits 0 only when the receiver confirmed that\n"
                "every byte reached the destination QEMU; otherwise prints one line\n"
                "'rdma-x: error: REASON' and exits 1.\n"
                "\n"
                "  --to HOST:PORT        receiver address ([IPv6]:PORT allowed)\n"
                "  --listen-unix PATH    take the stream from QEMU's 'migrate unix:PATH'\n"
                "                        instead of stdin/stdout (multifd, preempt too)\n"
                "  --serve               with --listen-unix: carry migration after migration\n"
                "                        (one at a time) instead of exiting after one;\n"
                "                        --listen-unix N times: N slots, one migration\n"
                "                        each at once, slot k to PORT+k (docs/unix.md)\n"
                "  --listen-disks-unix PATH  with --listen-unix: carry the source QEMU's NBD\n"
                "                        connections to PATH (storage migration, libvirt\n"
                "                        --disks-uri unix://PATH) to the receiver too\n"
                "  --config FILE         options from FILE, one 'name = value' (or 'name')\n"
                "                        per line, '#' comments; the command line wins\n"
                "  --lanes N             parallel lanes, 1..%u (default: number of cores)\n"
                "  --transport T         tcp, rdma or auto (default: auto)\n"
                "  --cache-size BYTES    page cache per lane, K/M/G suffixes (default: from\n"
                "                        the guest RAM size in the stream; 0 disables)\n"
                "  --zstd-level N        zstd level for pages, 0 = adaptive (default), -1 = off\n"
                "  --connect-timeout S   keep retrying the receiver for S seconds (default 10)\n"
                "  --timeout S           give up when the peer is silent S seconds (default 5)\n"
                "  --psk-file FILE       authenticate both ends with the key in FILE (the\n"
                "                        receiver needs the same one): 32 random bytes or\n"
                "                        64 hex digits, made by 'rdma-x keygen > FILE'\n"
                "  --encrypt             encrypt the link (AES-256-GCM; needs --psk-file)\n"
                "  --rdma-pinned-max B   rdma: bound on registered (pinned) memory, K/M/G\n"
                "                        (default: fits RLIMIT_MEMLOCK; see docs/rdma.md)\n"
                "  --busy-poll           rdma: poll completions instead of sleeping (dedicated\n"
                "                        cores only)\n"
                "  --no-pace             take QEMU's stream as fast as it comes; by default\n"
                "                        bursts are held to 1.25x the recent rate, so QEMU's\n"
                "                        downtime estimate holds (docs/architecture.md)\n"
                "  --stats-json FILE     write figures as JSON at exit, also on failure\n"
                "  --progress            a live status line on stderr\n"
                "  --status-socket PATH  answer 'rdma-x status PATH' (migration in flight,\n"
                "                        counts, disk connections)\n"
                "  -h, --help            this help\n",
                RDMAX_LANES_MAX);
    } else {
        fprintf(f, "Usage: rdma-x recv --listen ADDR:PORT [OPTIONS]\n"
                   "\n"
                   "Destination side. Accepts one migration from 'rdma-x send', writes the\n"
                   "QEMU migration stream to stdout, byte for byte as the source QEMU wrote\n"
                   "it, and carries the return path from stdin back to the source. Exits 0\n"
                   "once the stream was delivered and QEMU closed its side; otherwise prints\n"
                   "'rdma-x: error: REASON' and exits 1. Connections that are not a valid\n"
                   "rdma-x sender are refused with a reason and do not stop the listener.\n"
                   "\n"
                   "  --listen ADDR:PORT    address to listen on (0.0.0.0:PORT, [::]:PORT)\n"
                   "  --connect-unix PATH   write the stream to the destination QEMU's\n"
                   "                        '-incoming unix:PATH' instead of stdout/stdin\n"
                   "  --connect-timeout S   keep retrying PATH for S seconds (default 10)\n"
                   "  --serve               with --connect-unix: carry migration after\n"
                   "                        migration (one at a time); PATH is connected\n"
                   "                        once a sender is in; --connect-unix N times:\n"
                   "                        N slots at once, slot k listening on PORT+k\n"
                   "  --connect-disks-unix PATH  connect the sender's disk (NBD) connections\n"
                   "                        to the destination QEMU's NBD server at PATH\n"
                   "  --config FILE         options from FILE, one 'name = value' (or 'name')\n"
                   "                        per line, '#' comments; the command line wins\n"
                   "  --lanes N             refuse senders with another lane count\n"
                   "                        (default: accept the sender's)\n"
                   "  --transport T         tcp, rdma or auto (default: auto)\n"
                   "  --timeout S           give up when the peer is silent S seconds (default 5)\n"
                   "  --psk-file FILE       accept only senders holding the key in FILE\n"
                   "  --encrypt             require an encrypted link (needs --psk-file)\n"
                   "  --rdma-pinned-max B   rdma: bound on registered (pinned) memory, K/M/G\n"
                   "  --busy-poll           rdma: poll completions instead of sleeping\n"
                   "  --cache-max BYTES     refuse senders whose page caches (all lanes) need\n"
                   "                        more (default: min(4G, RAM/4))\n"
                   "  --host-reserve BYTES  pre-flight: refuse a guest whose RAM and page\n"
                   "                        caches do not fit in MemAvailable less BYTES\n"
                   "                        (default 0)\n"
                   "  --no-preflight        take any guest (overcommitted hosts)\n"
                   "  --stats-json FILE     write figures as JSON at exit, also on failure\n"
                   "  --progress            a live status line on stderr\n"
                   "  --status-socket PATH  answer 'rdma-x status PATH' (migration in flight,\n"
                   "                        counts, disk connections)\n"
                   "  -h, --help            this help\n");
    }
}

static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno || end == s) {
        return -1;
    }
    switch (*end) {
    case 'k':
    case 'K':
        v <<= 10;
        end++;
        break;
    case 'm':
    case 'M':
        v <<= 20;
        end++;
        break;
    case 'g':
    case 'G':
        v <<= 30;
        end++;
        break;
    }
    if (*end == 'i' || *end == 'B') {
        end += *end == 'i' ? 1 : 0;
        end += *end == 'B' ? 1 : 0;
    }
    if (*end) {
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_int(const char *s, long lo, long hi, long *out)
{
    char *end;
    long v;

    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        return -1;
    }
    *out = v;
    return 0;
}

/*
 * --config FILE: each line 'name = value' or 'name' becomes '--name value'
 * or '--name', put before the command line's own options so that those win
 * (getopt keeps the last). The strings live as long as the process: the
 * options point into them.
 */
static int config_args(const char *path, char ***out, int *n)
{
    FILE *f = fopen(path, "r");
    char line[4096];
    int cap = 16, lineno = 0;
    char **v;

    if (!f) {
        fprintf(stderr, "rdma-x: error: --config %s: %s\n", path, strerror(errno));
        return -1;
    }
    v = malloc(sizeof(*v) * (size_t)cap);
    *n = 0;
    while (v && fgets(line, sizeof(line), f)) {
        char *s = line, *e, *val = NULL;
        lineno++;
        if (!strchr(line, '\n') && !feof(f)) {
            fprintf(stderr, "rdma-x: error: %s:%d: line too long\n", path, lineno);
            goto fail;
        }
        s += strspn(s, " \t");
        e = s + strcspn(s, "#\r\n");
        while (e > s && (e[-1] == ' ' || e[-1] == '\t')) {
            e--;
        }
        *e = '\0';
        if (!*s) {
            continue;
        }
        char *eq = strchr(s, '=');
        if (eq) {
            char *k = eq;
            while (k > s && (k[-1] == ' ' || k[-1] == '\t')) {
                k--;
            }
            *k = '\0';
            val = eq + 1 + strspn(eq + 1, " \t");
        }
        if (!*s || strspn(s, "abcdefghijklmnopqrstuvwxyz-") != strlen(s) ||
            strcmp(s, "config") == 0) {
            fprintf(stderr, "rdma-x: error: %s:%d: expected 'option = value' or 'option'\n", path,
                    lineno);
            goto fail;
        }
        if (*n + 2 > cap) {
            char **nv = realloc(v, sizeof(*v) * (size_t)(cap *= 2));
            if (!nv) {
                goto fail;
            }
            v = nv;
        }
        v[*n] = malloc(strlen(s) + 3);
        if (!v[*n]) {
            goto fail;
        }
        sprintf(v[(*n)++], "--%s", s);
        if (val) {
            v[(*n)++] = strdup(val);
            if (!v[*n - 1]) {
                goto fail;
            }
        }
    }
    fclose(f);
    if (!v) {
        fprintf(stderr, "rdma-x: error: out of memory\n");
        return -1;
    }
    *out = v;
    return 0;
fail:
    fclose(f);
    if (!v) {
        fprintf(stderr, "rdma-x: error: out of memory\n");
    }
    free(v);
    return -1;
}

/* Splice --config FILE's options in after argv[0]. */
static int with_config(int *argc, char ***argv, int *config_end)
{
    const char *path = NULL;
    char **cv, **nv;
    int n;

    for (int i = 1; i < *argc; i++) {
        if (strcmp((*argv)[i], "--") == 0) {
            break;
        }
        if (strcmp((*argv)[i], "--config") == 0 && i + 1 < *argc) {
            path = (*argv)[i + 1];
        } else if (strncmp((*argv)[i], "--config=", 9) == 0) {
            path = (*argv)[i] + 9;
        }
    }
    if (!path) {
        return 0;
    }
    if (config_args(path, &cv, &n) < 0) {
        return -1;
    }
    nv = malloc(sizeof(*nv) * (size_t)(*argc + n + 1));
    if (!nv) {
        fprintf(stderr, "rdma-x: error: out of memory\n");
        return -1;
    }
    nv[0] = (*argv)[0];
    memcpy(nv + 1, cv, sizeof(*nv) * (size_t)n);
    memcpy(nv + 1 + n, *argv + 1, sizeof(*nv) * (size_t)(*argc - 1));
    nv[*argc + n] = NULL;
    free(cv);
    *argc += n;
    *argv = nv;
    *config_end = n;
    return 0;
}

int rdmax_cli_parse(int argc, char **argv, struct rdmax_opts *o)
{
    enum {
        O_STATS = 256,
        O_PROGRESS,
        O_TRANSPORT,
        O_TIMEOUT,
        O_CTIMEOUT,
        O_CACHE,
        O_ZSTD,
        O_PSK,
        O_ENCRYPT,
        O_CACHE_MAX,
        O_PINNED,
        O_BUSY_POLL,
        O_UNIX,
        O_NO_PACE,
        O_SERVE,
        O_CONFIG,
        O_DISKS,
        O_STATUS,
        O_HOST_RESERVE,
        O_NO_PREFLIGHT,
    };
    static const struct option send_opts[] = {
        {"to", required_argument, NULL, 't'},
        {"listen-unix", required_argument, NULL, O_UNIX},
        {"listen-disks-unix", required_argument, NULL, O_DISKS},
        {"lanes", required_argument, NULL, 'l'},
        {"stats-json", required_argument, NULL, O_STATS},
        {"progress", no_argument, NULL, O_PROGRESS},
        {"status-socket", required_argument, NULL, O_STATUS},
        {"transport", required_argument, NULL, O_TRANSPORT},
        {"timeout", required_argument, NULL, O_TIMEOUT},
        {"connect-timeout", required_argument, NULL, O_CTIMEOUT},
        {"cache-size", required_argument, NULL, O_CACHE},
        {"zstd-level", required_argument, NULL, O_ZSTD},
        {"psk-file", required_argument, NULL, O_PSK},
        {"encrypt", no_argument, NULL, O_ENCRYPT},
        {"rdma-pinned-max", required_argument, NULL, O_PINNED},
        {"busy-poll", no_argument, NULL, O_BUSY_POLL},
        {"no-pace", no_argument, NULL, O_NO_PACE},
        {"serve", no_argument, NULL, O_SERVE},
        {"config", required_argument, NULL, O_CONFIG},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    static const struct option recv_opts[] = {
        {"listen", required_argument, NULL, 'L'},
        {"connect-unix", required_argument, NULL, O_UNIX},
        {"connect-disks-unix", required_argument, NULL, O_DISKS},
        {"connect-timeout", required_argument, NULL, O_CTIMEOUT},
        {"lanes", required_argument, NULL, 'l'},
        {"stats-json", required_argument, NULL, O_STATS},
        {"progress", no_argument, NULL, O_PROGRESS},
        {"status-socket", required_argument, NULL, O_STATUS},
        {"transport", required_argument, NULL, O_TRANSPORT},
        {"timeout", required_argument, NULL, O_TIMEOUT},
        {"psk-file", required_argument, NULL, O_PSK},
        {"encrypt", no_argument, NULL, O_ENCRYPT},
        {"cache-max", required_argument, NULL, O_CACHE_MAX},
        {"host-reserve", required_argument, NULL, O_HOST_RESERVE},
        {"no-preflight", no_argument, NULL, O_NO_PREFLIGHT},
        {"rdma-pinned-max", required_argument, NULL, O_PINNED},
        {"busy-poll", no_argument, NULL, O_BUSY_POLL},
        {"serve", no_argument, NULL, O_SERVE},
        {"config", required_argument, NULL, O_CONFIG},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *sub = argv[0];
    bool slots_from_cmdline = false;
    int config_end = 0; /* argv[1..config_end] came from --config */
    long v;
    int c;

    o->sender = strcmp(sub, "send") == 0;
    o->transport = "auto";
    /* A few seconds: keep-alives go out several times per timeout. */
    o->timeout_ms = 5000;
    o->connect_timeout_ms = 10000;
    o->cache_bytes = UINT64_MAX; /* "not given" */
    if (with_config(&argc, &argv, &config_end) < 0) {
        return -1;
    }
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "h", o->sender ? send_opts : recv_opts, NULL)) != -1) {
        switch (c) {
        case O_SERVE:
            o->serve = true;
            break;
        case O_CONFIG:
            break; /* read by with_config */
        case O_UNIX:
            /* Repeated: one slot each; the command line's replace the config file's. */
            if (optind > config_end + 1 && !slots_from_cmdline) {
                slots_from_cmdline = true;
                o->nslots = 0;
            }
            if (o->nslots == RDMAX_SLOTS_MAX) {
                fprintf(stderr, "rdma-x: error: at most %u %s paths (slots)\n", RDMAX_SLOTS_MAX,
                        o->sender ? "--listen-unix" : "--connect-unix");
                return -1;
            }
            for (unsigned k = 0; k < o->nslots; k++) {
                if (strcmp(o->slot_path[k], optarg) == 0) {
                    fprintf(stderr, "rdma-x: error: %s given twice\n", optarg);
                    return -1;
                }
            }
            o->slot_path[o->nslots++] = optarg;
            o->unix_path = o->slot_path[0];
            break;
        case O_DISKS:
            o->disks_path = optarg;
            break;
        case O_STATUS:
            o->status_path = optarg;
            break;
        case 't':
        case 'L':
            o->addr = optarg;
            break;
        case 'l':
            if (parse_int(optarg, 1, RDMAX_LANES_MAX, &v) < 0) {
                fprintf(stderr, "rdma-x: error: --lanes takes 1..%u, not '%s'\n", RDMAX_LANES_MAX,
                        optarg);
                return -1;
            }
            o->lanes = (unsigned)v;
            break;
        case O_STATS:
            o->stats_json = optarg;
            break;
        case O_PROGRESS:
            o->progress = true;
            break;
        case O_TRANSPORT:
            if (strcmp(optarg, "auto") != 0 && !rdmax_transport_find(optarg)) {
                fprintf(stderr,
                        "rdma-x: error: unknown transport '%s' (this build has: %s, auto)\n",
                        optarg, rdmax_transport_list());
                return -1;
            }
            o->transport = optarg;
            break;
        case O_TIMEOUT:
        case O_CTIMEOUT:
            if (parse_int(optarg, 1, 3600, &v) < 0) {
                fprintf(stderr, "rdma-x: error: timeouts take 1..3600 seconds, not '%s'\n", optarg);
                return -1;
            }
            if (c == O_TIMEOUT) {
                o->timeout_ms = (int)v * 1000;
            } else {
                o->connect_timeout_ms = (int)v * 1000;
            }
            break;
        case O_CACHE:
            if (parse_size(optarg, &o->cache_bytes) < 0 || o->cache_bytes > (64ull << 30)) {
                fprintf(stderr, "rdma-x: error: --cache-size takes 0..64G, not '%s'\n", optarg);
                return -1;
            }
            break;
        case O_ZSTD:
            if (parse_int(optarg, -1, 19, &v) < 0) {
                fprintf(stderr, "rdma-x: error: --zstd-level takes -1..19, not '%s'\n", optarg);
                return -1;
            }
            o->zstd_level = (int)v;
            break;
        case O_PSK:
            o->psk_file = optarg;
            break;
        case O_ENCRYPT:
            o->encrypt = true;
            break;
        case O_CACHE_MAX:
            if (parse_size(optarg, &o->cache_max) < 0 || o->cache_max == 0) {
                fprintf(stderr, "rdma-x: error: --cache-max takes a size above 0, not '%s'\n",
                        optarg);
                return -1;
            }
            break;
        case O_HOST_RESERVE:
            if (parse_size(optarg, &o->host_reserve) < 0) {
                fprintf(stderr, "rdma-x: error: --host-reserve takes a size, not '%s'\n", optarg);
                return -1;
            }
            break;
        case O_NO_PREFLIGHT:
            o->no_preflight = true;
            break;
        case O_PINNED:
            if (parse_size(optarg, &o->pinned_max) < 0 || o->pinned_max < (1u << 20)) {
                fprintf(stderr,
                        "rdma-x: error: --rdma-pinned-max takes a size of 1M or more, not '%s'\n",
                        optarg);
                return -1;
            }
            break;
        case O_BUSY_POLL:
            o->busy_poll = true;
            break;
        case O_NO_PACE:
            o->no_pace = true;
            break;
        case 'h':
            usage_sub(stdout, o->sender);
            return 1;
        default:
            fprintf(stderr, "rdma-x: error: unknown option '%s' for 'rdma-x %s' (see --help)\n",
                    argv[optind - 1], sub);
            return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "rdma-x: error: unexpected argument '%s' (see 'rdma-x %s --help')\n",
                argv[optind], sub);
        return -1;
    }
    if (!o->addr) {
        fprintf(stderr, "rdma-x: error: 'rdma-x %s' needs %s (see --help)\n", sub,
                o->sender ? "--to HOST:PORT" : "--listen ADDR:PORT");
        return -1;
    }
    if (o->serve && !o->unix_path) {
        fprintf(stderr,
                "rdma-x: error: --serve needs %s (QEMU's stdin/stdout last one migration)\n",
                o->sender ? "--listen-unix PATH" : "--connect-unix PATH");
        return -1;
    }
    if (o->sender && o->disks_path && !o->unix_path) {
        /* QEMU connects its disks before 'migrate' starts an exec: child. */
        fprintf(stderr, "rdma-x: error: --listen-disks-unix needs --listen-unix (the disks "
                        "connect before the migration starts, so send must already run)\n");
        return -1;
    }
    for (unsigned k = 0; k < o->nslots; k++) {
        if (o->disks_path && strcmp(o->disks_path, o->slot_path[k]) == 0) {
            fprintf(stderr,
                    "rdma-x: error: the disks socket and a migration socket are both %s\n",
                    o->slot_path[k]);
            return -1;
        }
    }
    if (o->nslots > 1 && !o->serve) {
        fprintf(stderr, "rdma-x: error: %u %s paths (slots) need --serve\n", o->nslots,
                o->sender ? "--listen-unix" : "--connect-unix");
        return -1;
    }
    if (o->encrypt && !o->psk_file) {
        fprintf(stderr, "rdma-x: error: --encrypt needs --psk-file (the keys come from it)\n");
        return -1;
    }
    if (o->sender && o->lanes == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o->lanes = n < 1 ? 1 : n > (long)RDMAX_LANES_MAX ? RDMAX_LANES_MAX : (unsigned)n;
    }
    return 0;
}
