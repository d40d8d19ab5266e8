/* rdma-x: splitting a multifd channel into page payloads and the rest; see multifd.h. */
#include "multifd.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "be.h"

#define MFD_MAGIC 0x11223344u
#define MFD_VERSION 1u
#define MFD_INIT_LEN 64u
#define MFD_HDR_FIXED 64u /* magic .. unused64[3] */
#define MFD_IDSTR 256u
/* 512 KiB packets of 4 KiB pages are 128; bigger packets or pages stay sane up to this. */
#define MFD_PAGES_MAX 4096u
#define MFD_HDR_MAX (MFD_HDR_FIXED + MFD_IDSTR + 8u * MFD_PAGES_MAX)
#define MFD_COMP_MASK 0x3eu    /* 7.2: bits 1..3; 10.x: bits 1..5 */
#define MFD_DEVICE_STATE 0x40u /* 10.0+: a VFIO device-state packet, another layout */
#define MFD_BLOCKS_MAX 64u
/*
 * A header holds as many offsets as a packet holds pages (512 KiB / 4 KiB),
 * also in 9.0+'s header-only SYNC packets, which say pages_alloc 0.
 */
#define MFD_PAGES_DEFAULT 128u

enum mfd_state {
    S_INIT,   /* collecting MultiFDInit_t */
    S_HDR,    /* collecting a packet header's fixed part */
    S_HDR2,   /* ... its block name and offsets */
    S_PAGES,  /* the packet's raw pages */
    S_SKIP,   /* a payload QEMU compressed: passed through */
    S_OPAQUE, /* not parsed any more */
};

struct rdmax_mfd_parser {
    enum mfd_state st;
    uint8_t hdr[MFD_HDR_MAX];
    size_t have, need; /* bytes in hdr / wanted there */
    uint32_t normal, page_i;
    uint32_t slots;  /* offsets per header: the last nonzero pages_alloc */
    bool compressed; /* the current packet's payload is QEMU's (zlib, zstd, ...) */
    uint32_t block;  /* of the current packet; UINT32_MAX: its pages go opaque */
    uint64_t skip;   /* S_SKIP: bytes left */
    uint8_t page[RDMAX_PAGE_SIZE];
    size_t page_have;
    char blocks[MFD_BLOCKS_MAX][MFD_IDSTR];
    unsigned nblocks;
    const char *opaque_why;
};

struct rdmax_mfd_parser *rdmax_mfd_create(void)
{
    struct rdmax_mfd_parser *p = calloc(1, sizeof(*p));

    if (p) {
        p->st = S_INIT;
        p->need = MFD_INIT_LEN;
        p->slots = MFD_PAGES_DEFAULT;
    }
    return p;
}

void rdmax_mfd_destroy(struct rdmax_mfd_parser *p)
{
    free(p);
}

const char *rdmax_mfd_opaque_reason(const struct rdmax_mfd_parser *p)
{
    return p->st == S_OPAQUE ? p->opaque_why : NULL;
}

/* Give up parsing: what was collected goes out as it came. */
static int go_opaque(struct rdmax_mfd_parser *p, const char *why, const struct rdmax_mfd_sink *k,
                     void *arg)
{
    int r = p->have ? k->bytes(arg, p->hdr, p->have) : 0;

    p->have = 0;
    p->st = S_OPAQUE;
    p->opaque_why = why;
    return r;
}

static uint32_t block_id(struct rdmax_mfd_parser *p, const uint8_t *idstr)
{
    char name[MFD_IDSTR];

    memcpy(name, idstr, MFD_IDSTR);
    if (!memchr(name, '\0', MFD_IDSTR)) {
        return UINT32_MAX;
    }
    for (unsigned i = 0; i < p->nblocks; i++) {
        if (strcmp(p->blocks[i], name) == 0) {
            return i;
        }
    }
    if (p->nblocks == MFD_BLOCKS_MAX) {
        return UINT32_MAX;
    }
    memcpy(p->blocks[p->nblocks], name, MFD_IDSTR);
    return p->nblocks++;
}

/* hdr holds a whole piece (init, fixed header, rest of header): act on it. */
static int piece_done(struct rdmax_mfd_parser *p, const struct rdmax_mfd_sink *k, void *arg)
{
    const uint8_t *h = p->hdr;
    int r;

    switch (p->st) {
    case S_INIT:
        if (rdmax_get_be32(h) != MFD_MAGIC || rdmax_get_be32(h + 4) != MFD_VERSION) {
            return go_opaque(p, "not a multifd channel", k, arg);
        }
        r = k->bytes(arg, h, p->have);
        p->have = 0;
        p->st = S_HDR;
        p->need = MFD_HDR_FIXED;
        return r;
    case S_HDR: {
        uint32_t flags = rdmax_get_be32(h + 8);
        uint32_t pages_alloc = rdmax_get_be32(h + 12);
        p->normal = rdmax_get_be32(h + 16);
        uint32_t zero = rdmax_get_be32(h + 32); /* 9.0+; 7.2 leaves it 0 */
        if (rdmax_get_be32(h) != MFD_MAGIC || rdmax_get_be32(h + 4) != MFD_VERSION) {
            return go_opaque(p, "multifd packet with another magic or version", k, arg);
        }
        if (flags & MFD_DEVICE_STATE) {
            return go_opaque(p, "multifd device-state packet", k, arg);
        }
        if (pages_alloc) {
            p->slots = pages_alloc;
        }
        if (p->slots > MFD_PAGES_MAX || p->normal > p->slots || zero > p->slots - p->normal) {
            return go_opaque(p, "multifd packet with out-of-range page counts", k, arg);
        }
        p->compressed = (flags & MFD_COMP_MASK) != 0;
        p->skip = p->compressed && p->normal ? rdmax_get_be32(h + 20) : 0; /* next_packet_size */
        p->need = MFD_HDR_FIXED + MFD_IDSTR + 8u * p->slots;
        p->st = S_HDR2;
        return 0;
    }
    case S_HDR2:
        r = k->bytes(arg, h, p->have);
        p->have = 0;
        if (r < 0) {
            return r;
        }
        p->need = MFD_HDR_FIXED;
        if (p->compressed) {
            p->st = p->skip ? S_SKIP : S_HDR;
        } else if (p->normal == 0) {
            p->st = S_HDR;
        } else {
            p->block = block_id(p, h + MFD_HDR_FIXED);
            p->page_i = 0;
            p->page_have = 0;
            p->st = S_PAGES;
        }
        return 0;
    default:
        return 0;
    }
}

/* The key of page i of the current packet; false when it cannot be cached. */
static bool page_key(const struct rdmax_mfd_parser *p, uint32_t i, struct rdmax_page_key *key)
{
    uint64_t off = rdmax_get_be64(p->hdr + MFD_HDR_FIXED + MFD_IDSTR + 8u * i);

    /* hdr was handed out already but is still intact: only the next header overwrites it. */
    if (p->block == UINT32_MAX || off % RDMAX_PAGE_SIZE) {
        return false;
    }
    key->block = p->block;
    key->offset = off;
    return true;
}

static int one_page(struct rdmax_mfd_parser *p, const uint8_t *page, const struct rdmax_mfd_sink *k,
                    void *arg)
{
    struct rdmax_page_key key;
    int r = page_key(p, p->page_i, &key) ? k->page(arg, key, page)
                                         : k->bytes(arg, page, RDMAX_PAGE_SIZE);

    if (++p->page_i == p->normal) {
        p->st = S_HDR;
        p->need = MFD_HDR_FIXED;
    }
    return r;
}

int rdmax_mfd_feed(struct rdmax_mfd_parser *p, const uint8_t *b, size_t n,
                   const struct rdmax_mfd_sink *k, void *arg)
{
    int r = 0;

    while (n && r >= 0) {
        size_t take;

        switch (p->st) {
        case S_OPAQUE:
            return k->bytes(arg, b, n);
        case S_SKIP:
            take = n < p->skip ? n : (size_t)p->skip;
            r = k->bytes(arg, b, take);
            p->skip -= take;
            if (p->skip == 0) {
                p->st = S_HDR;
                p->need = MFD_HDR_FIXED;
            }
            break;
        case S_PAGES:
            if (p->page_have == 0 && n >= RDMAX_PAGE_SIZE) {
                take = RDMAX_PAGE_SIZE; /* the common case: straight from the read buffer */
                r = one_page(p, b, k, arg);
                break;
            }
            take = RDMAX_PAGE_SIZE - p->page_have;
            take = n < take ? n : take;
            memcpy(p->page + p->page_have, b, take);
            p->page_have += take;
            if (p->page_have == RDMAX_PAGE_SIZE) {
                p->page_have = 0;
                r = one_page(p, p->page, k, arg);
            }
            break;
        default: /* collecting a piece into hdr */
            take = p->need - p->have;
            take = n < take ? n : take;
            memcpy(p->hdr + p->have, b, take);
            p->have += take;
            if (p->have == p->need) {
                r = piece_done(p, k, arg);
            }
            break;
        }
        b += take;
        n -= take;
    }
    return r < 0 ? r : 0;
}
