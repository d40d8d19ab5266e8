/*
 * Text that came from the peer (ERROR frame reasons), made safe to log.
 *
 * Peer input is untrusted: before an unauthenticated client gets refused,
 * or a receiver's reason is printed, the text ends up in stderr, which is
 * QEMU's log (and libvirt's, and a terminal's). Control characters there
 * forge log lines or drive a terminal; a megabyte reason floods the log.
 */
#ifndef RDMAX_SANITIZE_H
#define RDMAX_SANITIZE_H

#include <stddef.h>

/* Characters of peer text kept; the rest is cut and marked with "...". */
#define RDMAX_PEER_TEXT_MAX 200u
/* A buffer that always holds the result. */
#define RDMAX_PEER_TEXT_BUF (RDMAX_PEER_TEXT_MAX + 4u)

/*
 * Copy in[0..len) into out as printable ASCII (0x20..0x7e; every other
 * byte, NUL included, becomes '?'), at most RDMAX_PEER_TEXT_MAX characters
 * and "..." when cut, NUL-terminated, never more than out_len bytes
 * (out_len >= 1). Returns out, for use as a printf argument.
 */
const char *rdmax_peer_text(char *out, size_t out_len, const void *in, size_t len);

#endif
