/* Peer text made safe to log; see sanitize.h. */
#include "sanitize.h"

#include <stdint.h>
#include <string.h>

const char *rdmax_peer_text(char *out, size_t out_len, const void *in, size_t len)
{
    const uint8_t *p = in;
    size_t keep = len < RDMAX_PEER_TEXT_MAX ? len : RDMAX_PEER_TEXT_MAX;
    size_t n = 0;
    int cut = len > keep;

    if (out_len == 0) {
        return out;
    }
    /* Room for "..." and the NUL when cut, else just the NUL. */
    if (keep + (cut ? 4 : 1) > out_len) {
        cut = 1;
        keep = out_len > 4 ? out_len - 4 : 0;
    }
    for (; n < keep; n++) {
        out[n] = p[n] >= 0x20 && p[n] <= 0x7e ? (char)p[n] : '?';
    }
    if (cut && out_len >= 4) {
        memcpy(out + n, "...", 3);
        n += 3;
    }
    out[n] = '\0';
    return out;
}
