/*
 * QEMU's XBZRLE page format, re-implemented from its description
 * (reference/qemu-migration-stream.md 3.5):
 *
 *   page     := (zrun nzrun)*         -- trailing unchanged run omitted
 *   zrun     := uleb(n)               -- n unchanged bytes; 0 only first
 *   nzrun    := uleb(m) byte[m]       -- m >= 1 changed bytes, NEW values
 *   uleb(v)  := v < 0x80 ? [v] : [(v & 0x7f) | 0x80, v >> 7]   (v <= 0x3fff)
 *
 * Runs are maximal: a run of changed bytes ends at the first equal byte,
 * however short the following gap (QEMU does not fold gaps). The encoder
 * compares a 64-bit word at a time, as QEMU's scalar encoder does, so the
 * benchmark compares like with like. The decoder keeps QEMU's checks: each
 * token needs 2 bytes left, a zero zrun only at offset 0, no zero nzrun, no
 * run past the page or the input; like QEMU it accepts a 2-byte uleb with a
 * zero high byte.
 */
#include "xbzrle-ref.h"

#include <errno.h>
#include <string.h>

static inline uint64_t xref_load64(const uint8_t *p)
{
    uint64_t v;

    memcpy(&v, p, sizeof(v));
    return v;
}

static size_t xref_uleb_put(uint8_t *p, size_t v)
{
    if (v < 0x80) {
        p[0] = (uint8_t)v;
        return 1;
    }
    p[0] = (uint8_t)(v | 0x80);
    p[1] = (uint8_t)(v >> 7);
    return 2;
}

/* Length of the run of equal bytes at i. */
static size_t xref_equal_run(const uint8_t *old, const uint8_t *cur, size_t i, size_t len)
{
    size_t s = i;

    while (i + 8 <= len) {
        uint64_t x = xref_load64(old + i) ^ xref_load64(cur + i);

        if (x) {
            return i - s + (size_t)__builtin_ctzll(x) / 8;
        }
        i += 8;
    }
    while (i < len && old[i] == cur[i]) {
        i++;
    }
    return i - s;
}

/* Length of the run of differing bytes at i (the first byte differs). */
static size_t xref_diff_run(const uint8_t *old, const uint8_t *cur, size_t i, size_t len)
{
    const uint64_t ones = UINT64_C(0x0101010101010101);
    const uint64_t highs = UINT64_C(0x8080808080808080);
    size_t s = i;

    while (i + 8 <= len) {
        uint64_t x = xref_load64(old + i) ^ xref_load64(cur + i);
        /* Exact for the lowest zero byte (the one we want). */
        uint64_t z = (x - ones) & ~x & highs;

        if (z) {
            return i - s + (size_t)__builtin_ctzll(z) / 8;
        }
        i += 8;
    }
    while (i < len && old[i] != cur[i]) {
        i++;
    }
    return i - s;
}

ssize_t rdmax_xbzrle_ref_encode(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur,
                                size_t len)
{
    size_t i = 0, d = 0;

    if (len == 0 || len > RDMAX_XBZRLE_REF_MAX_LEN) {
        return -EINVAL;
    }
    for (;;) {
        size_t z = xref_equal_run(old, cur, i, len), m, need;

        if (i + z == len) {
            break;
        }
        m = xref_diff_run(old, cur, i + z, len);
        need = (z < 0x80 ? 1 : 2) + (m < 0x80 ? 1 : 2) + m;
        if (need > cap - d) {
            return -EMSGSIZE;
        }
        d += xref_uleb_put(dst + d, z);
        d += xref_uleb_put(dst + d, m);
        memcpy(dst + d, cur + i + z, m);
        d += m;
        i += z + m;
    }
    return (ssize_t)d;
}

/* QEMU's uleb128_decode_small: 1 or 2 bytes; -1 if a third would follow. */
static int xref_uleb_get(const uint8_t *in, size_t avail, size_t *v)
{
    if (!(in[0] & 0x80)) {
        *v = in[0];
        return 1;
    }
    if (avail < 2 || (in[1] & 0x80)) {
        return -1;
    }
    *v = (in[0] & 0x7fu) | (size_t)in[1] << 7;
    return 2;
}

ssize_t rdmax_xbzrle_ref_decode(uint8_t *page, size_t len, const uint8_t *src, size_t src_len)
{
    size_t i = 0, d = 0;

    if (len == 0 || len > RDMAX_XBZRLE_REF_MAX_LEN) {
        return -EINVAL;
    }
    while (i < src_len) {
        size_t n;
        int r;

        if (src_len - i < 2) {
            return -EBADMSG;
        }
        r = xref_uleb_get(src + i, src_len - i, &n);
        if (r < 0 || (i != 0 && n == 0)) {
            return -EBADMSG;
        }
        i += (size_t)r;
        if (n > len - d) {
            return -EBADMSG;
        }
        d += n;

        if (src_len - i < 2) {
            return -EBADMSG;
        }
        r = xref_uleb_get(src + i, src_len - i, &n);
        if (r < 0 || n == 0) {
            return -EBADMSG;
        }
        i += (size_t)r;
        if (n > len - d || n > src_len - i) {
            return -EBADMSG;
        }
        memcpy(page + d, src + i, n);
        i += n;
        d += n;
    }
    return (ssize_t)len;
}
