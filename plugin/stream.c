/*
 * Streaming parser of the QEMU migration main channel.
 *
 * Grammar (reference/qemu-migration-stream.md, sections 1 and 3):
 *   stream  := "QEVM" be32(3) [0x07 config] item* 0x00 [0x06 be32 len json]
 *   item    := 0x01|0x04 be32 sid cstr idstr be32 inst be32 ver payload [footer]
 *            | 0x02|0x03 be32 sid payload [footer]
 *            | 0x08 be16 cmd be16 len byte[len] [PACKAGED: be32-length blob]
 *   footer  := 0x7e be32 sid
 *   ram payload := record* EOS, record := be64 (addr|flags) [cstr] body
 *
 * The parser is a state machine over "fields": each state asks for a fixed
 * number of bytes, which are gathered in acc[] when a read splits them
 * (QEMU's 32 KiB buffer splits records anywhere). Bulk bytes whose content
 * does not matter (blobs, QEMU's XBZRLE payloads, the opaque tail) are
 * skipped without copying.
 *
 * Only RAM sections are parsed in depth; device state (FULL sections) is not
 * self-delimiting, so the first FULL section (outside a PACKAGED blob)
 * switches to the opaque tail, as does anything not understood.
 *
 * The opaque tail still has to end the way a QEMU stream ends, or a stream
 * cut inside the device state (migrate_cancel, a crash) would count as
 * complete: the last section's footer and QEMU's EOF marker,
 * "7e be32 sid 00", either as the last six bytes (postcopy,
 * suppress-vmdesc) or right before a VMDESC "06 be32 len {json}" that ends
 * exactly at the end of the stream. The tail is not parsed for that: the
 * last bytes are kept, and each '{' preceded by "7e sid 00 06 len" records
 * where such a VMDESC would end (tail_check).
 */
#include "stream.h"
#include "be.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define QEVM_MAGIC 0x5145564du
#define QEVM_VERSION 3u

/* Opaque tail: bytes kept before each '{' ("7e sid 00 06 len") and VMDESC candidates. */
#define TAIL_KEEP 11u
#define TAIL_CANDIDATES 8u

enum {
    SEC_EOF = 0x00,
    SEC_START = 0x01,
    SEC_PART = 0x02,
    SEC_END = 0x03,
    SEC_FULL = 0x04,
    SEC_SUBSECTION = 0x05,
    SEC_VMDESC = 0x06,
    SEC_CONFIG = 0x07,
    SEC_COMMAND = 0x08,
    SEC_FOOTER = 0x7e,
};

enum {
    RAM_ZERO = 0x002,
    RAM_MEM_SIZE = 0x004,
    RAM_PAGE = 0x008,
    RAM_EOS = 0x010,
    RAM_CONTINUE = 0x020,
    RAM_XBZRLE = 0x040,
    RAM_HOOK = 0x080,
    RAM_COMPRESS = 0x100,
    RAM_MULTIFD_FLUSH = 0x200,
};

enum {
    CMD_OPEN_RETURN_PATH = 1,
    CMD_POSTCOPY_ADVISE = 3,
    CMD_PACKAGED = 7,
    CMD_MAX = 11, /* SWITCHOVER_START, QEMU 10.0 */
};

enum state {
    ST_HEADER,         /* 8: magic, version */
    ST_ITEM,           /* 1: section type / marker (config allowed once) */
    ST_CFG_NAME_LEN,   /* 4 */
    ST_CFG_NAME,       /* n */
    ST_CFG_PEEK,       /* 1 (peeked): 0x05 = subsection */
    ST_CFG_SUB_HDR,    /* 2: 0x05, name length */
    ST_CFG_SUB_NAME,   /* n + 4 (name, version) */
    ST_CFG_CAP_COUNT,  /* 4 */
    ST_CFG_CAP_LEN,    /* 1 */
    ST_CFG_CAP_NAME,   /* n */
    ST_SEC_LONG,       /* 5: sid, idstr length */
    ST_SEC_LONG_REST,  /* n + 8: idstr, instance, version */
    ST_SEC_SHORT,      /* 4: sid */
    ST_FOOTER_PEEK,    /* 1 (peeked) */
    ST_FOOTER,         /* 5 */
    ST_CMD,            /* 4: cmd, len */
    ST_CMD_DATA,       /* len */
    ST_RAM_REC,        /* 8: be64 addr|flags */
    ST_RAM_BLK_LEN,    /* 1: cstr length of the block name */
    ST_RAM_BLK_NAME,   /* n */
    ST_RAM_MS_LEN,     /* 1: MEM_SIZE list: block name length */
    ST_RAM_MS_ENTRY,   /* n + 8 (+8 page size) (+8 addr) */
    ST_RAM_ZERO_FILL,  /* 1 */
    ST_RAM_PAGE,       /* page slot */
    ST_RAM_XBZRLE_HDR, /* 3: encoding, be16 len */
    ST_RAM_COMPRESS,   /* 4: be32 len */
    ST_VMDESC_LEN,     /* 4 */
    ST_SKIP,           /* bulk bytes, then ->after_skip */
    ST_OPAQUE,         /* everything to the end */
    ST_DONE,           /* after VMDESC: nothing more may come */
};

struct rdmax_stream {
    enum rdmax_stream_mode mode;
    enum state st;
    uint8_t acc[512]; /* gathered field bytes */
    size_t acc_len;
    size_t need; /* bytes the current field needs */

    uint64_t skip_left;     /* ST_SKIP */
    enum state after_skip;  /* state to enter after the skip */
    uint32_t cfg_caps_left; /* capability names left in the configuration */
    bool saw_config;
    bool saw_eof;       /* EOF marker (0x00) seen at item level */
    bool ram_started;   /* a RAM START section was seen */
    bool iterating;     /* a PART/END section was seen */
    bool ignore_shared; /* x-ignore-shared: MEM_SIZE entries carry an address */
    bool hugepages;     /* POSTCOPY_ADVISE: some block has another page size */
    uint8_t sec_type;   /* type byte of the section being parsed */

    uint32_t ram_sid;
    bool ram_sid_known;
    uint32_t sec_sid; /* sid of the section being parsed (for the footer) */
    uint64_t ram_rec; /* current RAM record header */
    uint64_t ms_total, ms_sum;
    uint32_t cur_block; /* CONTINUE context: last block on this channel */
    bool have_block;
    uint16_t cmd, cmd_len;

    bool page_pending;
    struct rdmax_page_key page_key;

    /* Opaque tail: how it ends (see the top of this file). */
    bool footers;                         /* the parsed part had section footers */
    bool ended;                           /* the end was parsed before the tail began */
    uint8_t tail[TAIL_KEEP];              /* the last opaque bytes, oldest first */
    size_t tail_len;                      /* valid bytes at the end of tail[] */
    uint64_t vmdesc_end[TAIL_CANDIDATES]; /* stream offsets where a VMDESC would end */
    unsigned vmdesc_next;

    uint32_t nblocks;
    char *blocks[RDMAX_STREAM_MAX_BLOCKS];

    struct rdmax_stream_stats stats;
    char err[160];
};

struct rdmax_stream *rdmax_stream_create(enum rdmax_stream_mode mode)
{
    struct rdmax_stream *s = calloc(1, sizeof(*s));

    if (!s) {
        return NULL;
    }
    s->mode = mode;
    s->st = ST_HEADER;
    s->need = 8;
    return s;
}

void rdmax_stream_destroy(struct rdmax_stream *s)
{
    if (!s) {
        return;
    }
    for (uint32_t i = 0; i < s->nblocks; i++) {
        free(s->blocks[i]);
    }
    free(s);
}

static int stream_fail(struct rdmax_stream *s, const char *fmt, ...)
{
    va_list ap;

    if (!s->err[0]) {
        int n = snprintf(s->err, sizeof(s->err),
                         "bad migration stream at byte %llu: ", (unsigned long long)s->stats.bytes);
        va_start(ap, fmt);
        vsnprintf(s->err + n, sizeof(s->err) - n, fmt, ap);
        va_end(ap);
    }
    return -EBADMSG;
}

static void go(struct rdmax_stream *s, enum state st, size_t need)
{
    s->st = st;
    s->need = need;
    s->acc_len = 0;
}

static void go_skip(struct rdmax_stream *s, uint64_t n, enum state after, size_t after_need)
{
    if (n == 0) {
        go(s, after, after_need);
        return;
    }
    s->skip_left = n;
    s->after_skip = after;
    go(s, ST_SKIP, after_need);
}

static void go_opaque(struct rdmax_stream *s)
{
    s->stats.opaque = true;
    go(s, ST_OPAQUE, 0);
}

/* Byte k places before p[i] in the opaque tail (p[i - k], or kept from before p). */
static int tail_byte(const struct rdmax_stream *s, const uint8_t *p, size_t i, size_t k)
{
    if (k <= i) {
        return p[i - k];
    }
    k -= i;
    return k <= s->tail_len ? s->tail[TAIL_KEEP - k] : -1;
}

/*
 * Opaque bytes p[0..n), the first at stream offset base: note where a
 * VMDESC that starts in them would end, and keep the last bytes.
 */
static void tail_check(struct rdmax_stream *s, const uint8_t *p, size_t n, uint64_t base)
{
    const uint8_t *q = p;

    while ((q = memchr(q, '{', n - (size_t)(q - p)))) {
        size_t i = (size_t)(q - p);
        int b[TAIL_KEEP + 1];
        uint32_t len = 0;
        bool hit;

        for (size_t k = 1; k <= TAIL_KEEP; k++) {
            b[k] = tail_byte(s, p, i, k);
        }
        for (size_t k = 4; k >= 1; k--) {
            len = len << 8 | (uint32_t)(b[k] & 0xff);
        }
        hit = b[5] == SEC_VMDESC && b[6] == SEC_EOF && len > 0 && b[1] >= 0 && b[2] >= 0 &&
              b[3] >= 0 && b[4] >= 0 && (!s->footers || b[11] == SEC_FOOTER);
        if (hit) {
            s->vmdesc_end[s->vmdesc_next++ % TAIL_CANDIDATES] = base + i + len;
        }
        q++;
        if (q == p + n) {
            break;
        }
    }
    if (n >= TAIL_KEEP) {
        memcpy(s->tail, p + n - TAIL_KEEP, TAIL_KEEP);
        s->tail_len = TAIL_KEEP;
    } else {
        memmove(s->tail, s->tail + n, TAIL_KEEP - n);
        memcpy(s->tail + TAIL_KEEP - n, p, n);
        s->tail_len = s->tail_len + n > TAIL_KEEP ? TAIL_KEEP : s->tail_len + n;
    }
}

/* The opaque tail ended where a QEMU stream ends: footer + EOF [+ VMDESC]. */
static bool tail_complete(const struct rdmax_stream *s)
{
    const uint8_t *t = s->tail + TAIL_KEEP;

    if (s->ended) {
        return true;
    }
    if (s->tail_len >= 6 && t[-1] == SEC_EOF && (!s->footers || t[-6] == SEC_FOOTER)) {
        return true;
    }
    if (!s->footers && s->tail_len >= 1 && t[-1] == SEC_EOF) {
        return true;
    }
    for (unsigned i = 0; i < TAIL_CANDIDATES && i < s->vmdesc_next; i++) {
        if (s->vmdesc_end[i] == s->stats.bytes) {
            return true;
        }
    }
    return false;
}

/* After an item, the next item. */
static void go_item(struct rdmax_stream *s)
{
    go(s, ST_ITEM, 1);
}

static int intern_block(struct rdmax_stream *s, const uint8_t *name, size_t len, uint32_t *out)
{
    for (uint32_t i = 0; i < s->nblocks; i++) {
        if (strlen(s->blocks[i]) == len && memcmp(s->blocks[i], name, len) == 0) {
            *out = i;
            return 0;
        }
    }
    if (s->nblocks == RDMAX_STREAM_MAX_BLOCKS) {
        return stream_fail(s, "more than %d RAM blocks", RDMAX_STREAM_MAX_BLOCKS);
    }
    s->blocks[s->nblocks] = strndup((const char *)name, len);
    if (!s->blocks[s->nblocks]) {
        return -ENOMEM;
    }
    *out = s->nblocks++;
    return 0;
}

const char *rdmax_stream_block_name(const struct rdmax_stream *s, uint32_t i)
{
    return i < s->nblocks ? s->blocks[i] : NULL;
}

/* The body of a RAM record whose block context is now known. */
static int ram_record_body(struct rdmax_stream *s)
{
    unsigned flags = s->ram_rec & (RDMAX_PAGE_SIZE - 1) & ~RAM_CONTINUE;

    switch (flags) {
    case RAM_ZERO:
        s->stats.zero_pages++;
        go(s, ST_RAM_ZERO_FILL, 1);
        return 0;
    case RAM_PAGE:
        s->stats.pages++;
        s->page_key.block = s->cur_block;
        s->page_key.offset = s->ram_rec & ~(uint64_t)(RDMAX_PAGE_SIZE - 1);
        s->page_pending = true;
        go(s, ST_RAM_PAGE, 0);
        return 0;
    case RAM_XBZRLE:
        s->stats.xbzrle++;
        go(s, ST_RAM_XBZRLE_HDR, 3);
        return 0;
    case RAM_COMPRESS:
        go(s, ST_RAM_COMPRESS, 4);
        return 0;
    }
    return stream_fail(s, "RAM flags 0x%x", flags);
}

static int on_ram_record(struct rdmax_stream *s)
{
    unsigned all = s->ram_rec & (RDMAX_PAGE_SIZE - 1);
    unsigned flags = all & ~RAM_CONTINUE;

    switch (flags) {
    case RAM_EOS:
        go(s, ST_FOOTER_PEEK, 1);
        return 0;
    case RAM_MULTIFD_FLUSH:
        go(s, ST_RAM_REC, 8);
        return 0;
    case RAM_MEM_SIZE:
        s->ms_total = s->ram_rec & ~(uint64_t)(RDMAX_PAGE_SIZE - 1);
        s->ms_sum = 0;
        s->stats.ram_total = s->ms_total;
        if (s->hugepages) {
            /*
             * Only blocks with another page size carry a page-size field,
             * which the bytes alone do not tell: stay on the safe side.
             */
            go_opaque(s);
            return 0;
        }
        go(s, s->ms_total ? ST_RAM_MS_LEN : ST_RAM_REC, s->ms_total ? 1 : 8);
        return 0;
    case RAM_ZERO:
    case RAM_PAGE:
    case RAM_XBZRLE:
    case RAM_COMPRESS:
        if (all & RAM_CONTINUE) {
            if (!s->have_block) {
                return stream_fail(s, "RAM record continues a block never named");
            }
            return ram_record_body(s);
        }
        go(s, ST_RAM_BLK_LEN, 1);
        return 0;
    }
    /* HOOK (RDMA-only) or something newer: let the destination judge it. */
    go_opaque(s);
    return 0;
}

static int on_section_long(struct rdmax_stream *s, uint8_t type)
{
    const uint8_t *id = s->acc;
    size_t idlen = s->need - 8;

    s->stats.sections++;
    if (type == SEC_START && idlen == 3 && memcmp(id, "ram", 3) == 0) {
        s->ram_sid = s->sec_sid;
        s->ram_sid_known = true;
        s->ram_started = true;
        go(s, ST_RAM_REC, 8);
        return 0;
    }
    /*
     * Device state (not self-delimiting) or another iterable handler: from
     * here on precopy carries no more RAM pages, so nothing is lost.
     */
    go_opaque(s);
    return 0;
}

static int on_command(struct rdmax_stream *s)
{
    const uint8_t *d = s->acc;

    if (s->cmd == 0 || s->cmd > CMD_MAX) {
        /* The destination rejects it; let it, with the bytes it expects. */
        go_opaque(s);
        return 0;
    }
    if (s->cmd == CMD_POSTCOPY_ADVISE && s->cmd_len == 16) {
        s->hugepages = rdmax_get_be64(d) != rdmax_get_be64(d + 8);
    }
    if (s->cmd == CMD_PACKAGED) {
        if (s->cmd_len != 4) {
            return stream_fail(s, "PACKAGED command of length %u", s->cmd_len);
        }
        /* Postcopy device state, length-delimited: forward the blob whole. */
        go_skip(s, rdmax_get_be32(d), ST_ITEM, 1);
        return 0;
    }
    go_item(s);
    return 0;
}

static int on_item(struct rdmax_stream *s, uint8_t type)
{
    if (s->saw_eof && type != SEC_VMDESC) {
        s->ended = true; /* QEMU's EOF was parsed: the rest is not ours to judge */
        go_opaque(s);
        return 0;
    }
    switch (type) {
    case SEC_CONFIG:
        if (s->saw_config || s->stats.sections > 0) {
            return stream_fail(s, "configuration record not after the header");
        }
        s->saw_config = true;
        go(s, ST_CFG_NAME_LEN, 4);
        return 0;
    case SEC_START:
    case SEC_FULL:
        s->sec_type = type;
        go(s, ST_SEC_LONG, 5);
        return 0;
    case SEC_PART:
    case SEC_END:
        s->sec_type = type;
        go(s, ST_SEC_SHORT, 4);
        return 0;
    case SEC_COMMAND:
        go(s, ST_CMD, 4);
        return 0;
    case SEC_EOF:
        s->saw_eof = true;
        go_item(s);
        return 0;
    case SEC_VMDESC:
        go(s, ST_VMDESC_LEN, 4);
        return 0;
    }
    go_opaque(s);
    return 0;
}

/* One complete field in s->acc (or peeked at p[0]). */
static int on_field(struct rdmax_stream *s)
{
    const uint8_t *a = s->acc;

    switch (s->st) {
    case ST_HEADER:
        if (rdmax_get_be32(a) != QEVM_MAGIC) {
            return stream_fail(s, "not a QEMU migration stream (magic 0x%08x)", rdmax_get_be32(a));
        }
        if (rdmax_get_be32(a + 4) != QEVM_VERSION) {
            return stream_fail(s, "unsupported stream version %u", rdmax_get_be32(a + 4));
        }
        go_item(s);
        return 0;
    case ST_ITEM:
        return on_item(s, a[0]);
    case ST_CFG_NAME_LEN: {
        uint32_t n = rdmax_get_be32(a);
        if (n > 255) {
            /* Machine names are short; longer means we misread. */
            return stream_fail(s, "machine name of %u bytes", n);
        }
        go(s, n ? ST_CFG_NAME : ST_CFG_PEEK, n ? n : 1);
        return 0;
    }
    case ST_CFG_NAME:
        go(s, ST_CFG_PEEK, 1);
        return 0;
    case ST_CFG_SUB_HDR:
        go(s, ST_CFG_SUB_NAME, (size_t)a[1] + 4);
        return 0;
    case ST_CFG_SUB_NAME: {
        size_t n = s->need - 4;
#define SUB_IS(lit) (n == sizeof(lit) - 1 && memcmp(a, lit, n) == 0)
        if (SUB_IS("configuration/capabilities")) {
            go(s, ST_CFG_CAP_COUNT, 4);
        } else if (SUB_IS("configuration/target-page-bits")) {
            go_skip(s, 4, ST_CFG_PEEK, 1);
        } else if (SUB_IS("configuration/uuid")) {
            go_skip(s, 16, ST_CFG_PEEK, 1);
        } else {
            go_opaque(s);
        }
#undef SUB_IS
        return 0;
    }
    case ST_CFG_CAP_COUNT:
        s->cfg_caps_left = rdmax_get_be32(a);
        if (s->cfg_caps_left > 64) {
            return stream_fail(s, "%u validated capabilities", s->cfg_caps_left);
        }
        go(s, s->cfg_caps_left ? ST_CFG_CAP_LEN : ST_CFG_PEEK, 1);
        return 0;
    case ST_CFG_CAP_LEN:
        go(s, ST_CFG_CAP_NAME, a[0]);
        if (a[0] == 0) {
            return stream_fail(s, "empty capability name");
        }
        return 0;
    case ST_CFG_CAP_NAME:
        if (s->need == 15 && memcmp(a, "x-ignore-shared", 15) == 0) {
            s->ignore_shared = true;
        }
        s->cfg_caps_left--;
        go(s, s->cfg_caps_left ? ST_CFG_CAP_LEN : ST_CFG_PEEK, 1);
        return 0;
    case ST_SEC_LONG:
        s->sec_sid = rdmax_get_be32(a);
        go(s, ST_SEC_LONG_REST, (size_t)a[4] + 8);
        return 0;
    case ST_SEC_LONG_REST:
        return on_section_long(s, s->sec_type);
    case ST_SEC_SHORT:
        s->sec_sid = rdmax_get_be32(a);
        s->stats.sections++;
        if (s->ram_sid_known && s->sec_sid == s->ram_sid) {
            s->iterating = true;
            go(s, ST_RAM_REC, 8);
        } else {
            go_opaque(s);
        }
        return 0;
    case ST_FOOTER:
        if (rdmax_get_be32(a + 1) != s->sec_sid) {
            return stream_fail(s, "footer of section %u closes section %u", rdmax_get_be32(a + 1),
                               s->sec_sid);
        }
        go_item(s);
        return 0;
    case ST_CMD:
        s->cmd = rdmax_get_be16(a);
        s->cmd_len = rdmax_get_be16(a + 2);
        if (s->cmd == CMD_PACKAGED || s->cmd == CMD_POSTCOPY_ADVISE) {
            if (s->cmd_len > sizeof(s->acc)) {
                return stream_fail(s, "command %u of length %u", s->cmd, s->cmd_len);
            }
            go(s, s->cmd_len ? ST_CMD_DATA : ST_ITEM, s->cmd_len ? s->cmd_len : 1);
            if (s->cmd_len == 0) {
                return on_command(s);
            }
            return 0;
        }
        if (s->cmd == 0 || s->cmd > CMD_MAX) {
            go_opaque(s);
            return 0;
        }
        go_skip(s, s->cmd_len, ST_ITEM, 1);
        return 0;
    case ST_CMD_DATA:
        return on_command(s);
    case ST_RAM_REC:
        s->ram_rec = rdmax_get_be64(a);
        return on_ram_record(s);
    case ST_RAM_BLK_LEN:
        if (a[0] == 0) {
            return stream_fail(s, "empty RAM block name");
        }
        go(s, ST_RAM_BLK_NAME, a[0]);
        return 0;
    case ST_RAM_BLK_NAME: {
        int r = intern_block(s, a, s->need, &s->cur_block);
        if (r < 0) {
            return r;
        }
        s->have_block = true;
        return ram_record_body(s);
    }
    case ST_RAM_MS_LEN: {
        size_t extra = 8;
        if (a[0] == 0) {
            return stream_fail(s, "empty RAM block name in the block list");
        }
        if (s->ignore_shared) {
            extra += 8;
        }
        go(s, ST_RAM_MS_ENTRY, (size_t)a[0] + extra);
        return 0;
    }
    case ST_RAM_MS_ENTRY: {
        size_t extra = 8 + (s->ignore_shared ? 8 : 0);
        size_t nlen = s->need - extra;
        uint64_t used = rdmax_get_be64(a + nlen);
        uint32_t id;
        int r = intern_block(s, a, nlen, &id);
        if (r < 0) {
            return r;
        }
        if (used > s->ms_total - s->ms_sum) {
            return stream_fail(s, "RAM block list exceeds the announced %llu bytes",
                               (unsigned long long)s->ms_total);
        }
        s->ms_sum += used;
        go(s, s->ms_sum == s->ms_total ? ST_RAM_REC : ST_RAM_MS_LEN,
           s->ms_sum == s->ms_total ? 8 : 1);
        return 0;
    }
    case ST_RAM_ZERO_FILL:
        go(s, ST_RAM_REC, 8);
        return 0;
    case ST_RAM_XBZRLE_HDR: {
        uint16_t len = rdmax_get_be16(a + 1);
        if (a[0] != 1 || len > RDMAX_PAGE_SIZE) {
            return stream_fail(s, "XBZRLE record (encoding %u, %u bytes)", a[0], len);
        }
        go_skip(s, len, ST_RAM_REC, 8);
        return 0;
    }
    case ST_RAM_COMPRESS: {
        uint32_t len = rdmax_get_be32(a);
        if (len > 2 * RDMAX_PAGE_SIZE) {
            return stream_fail(s, "compressed page of %u bytes", len);
        }
        go_skip(s, len, ST_RAM_REC, 8);
        return 0;
    }
    case ST_VMDESC_LEN:
        go_skip(s, rdmax_get_be32(a), ST_DONE, 1);
        return 0;
    default:
        break;
    }
    return stream_fail(s, "parser state %d", s->st);
}

/* States that look at the next byte without consuming it. */
static int on_peek(struct rdmax_stream *s, uint8_t b)
{
    switch (s->st) {
    case ST_CFG_PEEK:
        if (b == SEC_SUBSECTION) {
            go(s, ST_CFG_SUB_HDR, 2);
        } else {
            go_item(s);
        }
        return 0;
    case ST_FOOTER_PEEK:
        if (b == SEC_FOOTER) {
            s->footers = true;
            go(s, ST_FOOTER, 5);
        } else {
            go_item(s);
        }
        return 0;
    default:
        return stream_fail(s, "peek in state %d", s->st);
    }
}

ssize_t rdmax_stream_scan(struct rdmax_stream *s, const uint8_t *in, size_t len, bool *page,
                          struct rdmax_page_key *key)
{
    size_t pos = 0;
    int r;

    *page = false;
    if (s->err[0]) {
        return -EBADMSG;
    }
    if (s->page_pending) {
        *page = true;
        *key = s->page_key;
        return 0;
    }
    while (pos < len) {
        switch (s->st) {
        case ST_OPAQUE:
            tail_check(s, in + pos, len - pos, s->stats.bytes);
            s->stats.bytes += len - pos;
            return (ssize_t)len;
        case ST_DONE:
            s->ended = true; /* QEMU's end, parsed: what follows is not ours to judge */
            go_opaque(s);
            continue;
        case ST_SKIP: {
            size_t n = len - pos;
            if (n > s->skip_left) {
                n = (size_t)s->skip_left;
            }
            pos += n;
            s->stats.bytes += n;
            s->skip_left -= n;
            if (s->skip_left == 0) {
                go(s, s->after_skip, s->need);
            }
            continue;
        }
        case ST_CFG_PEEK:
        case ST_FOOTER_PEEK:
            r = on_peek(s, in[pos]);
            if (r < 0) {
                return r;
            }
            continue;
        default:
            break;
        }

        /* Gather the current field. */
        size_t want = s->need - s->acc_len;
        size_t n = len - pos < want ? len - pos : want;
        memcpy(s->acc + s->acc_len, in + pos, n);
        s->acc_len += n;
        pos += n;
        s->stats.bytes += n;
        if (s->acc_len < s->need) {
            break;
        }
        r = on_field(s);
        if (r < 0) {
            return r;
        }
        if (s->page_pending) {
            *page = true;
            *key = s->page_key;
            return (ssize_t)pos;
        }
    }
    return (ssize_t)pos;
}

void rdmax_stream_page_done(struct rdmax_stream *s)
{
    if (!s->page_pending) {
        return;
    }
    s->page_pending = false;
    s->stats.bytes += RDMAX_PAGE_SIZE;
    go(s, ST_RAM_REC, 8);
}

bool rdmax_stream_complete(const struct rdmax_stream *s)
{
    return !s->page_pending && (s->st == ST_DONE || (s->st == ST_OPAQUE && tail_complete(s)) ||
                                (s->saw_eof && s->st == ST_ITEM && s->acc_len == 0));
}

int rdmax_stream_finish(struct rdmax_stream *s)
{
    if (s->err[0]) {
        return -EBADMSG;
    }
    if (rdmax_stream_complete(s)) {
        return 0;
    }
    if (s->st == ST_HEADER && s->acc_len == 0) {
        return stream_fail(s, "empty stream");
    }
    if (s->st == ST_OPAQUE) {
        return stream_fail(s, "stream truncated (%s, before QEMU's end-of-stream marker)",
                           s->iterating ? "inside the device state"
                                        : "inside a part carried unparsed");
    }
    return stream_fail(s, "stream truncated (%s)",
                       s->page_pending  ? "inside a page"
                       : s->ram_started ? "inside the RAM section"
                                        : "before the RAM section");
}

const char *rdmax_stream_error(const struct rdmax_stream *s)
{
    return s->err[0] ? s->err : NULL;
}

const struct rdmax_stream_stats *rdmax_stream_stats(const struct rdmax_stream *s)
{
    return &s->stats;
}

unsigned rdmax_stream_lane_of(struct rdmax_page_key key, unsigned n)
{
    /* splitmix64 finaliser: neighbouring pages spread over all lanes. */
    uint64_t x = ((uint64_t)key.block << 52) ^ (key.offset / RDMAX_PAGE_SIZE);

    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    x ^= x >> 31;
    return n ? (unsigned)(x % n) : 0;
}
