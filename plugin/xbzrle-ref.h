/*
 * Reference codec in QEMU's own XBZRLE page format
 * (reference/qemu-migration-stream.md section 3.5), written from that
 * description. Used by bench-codec to compare our delta codec with what QEMU
 * would send for the same pages, and by tests as a second opinion. Not on
 * the data path.
 */
#ifndef RDMAX_XBZRLE_REF_H
#define RDMAX_XBZRLE_REF_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* uleb fields are at most 2 bytes in QEMU's format. */
#define RDMAX_XBZRLE_REF_MAX_LEN 0x3fffu

/*
 * Encode cur against old (len bytes each) into dst[0..cap).
 * @return the encoded length; 0 when cur equals old; -EMSGSIZE when the
 *         encoding would exceed cap (QEMU then sends a plain page: with cap
 *         = len this is its "overflow"); -EINVAL for len 0 or too large.
 */
ssize_t rdmax_xbzrle_ref_encode(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur,
                                size_t len);

/*
 * Apply src[0..src_len) (untrusted) in place to page (len bytes, holding the
 * old version), with the checks of QEMU's decoder.
 * @return len, or -EBADMSG (page partly updated).
 */
ssize_t rdmax_xbzrle_ref_decode(uint8_t *page, size_t len, const uint8_t *src, size_t src_len);

#endif
