/*
 * Delta codec: one page against its previously sent version.
 *
 * The encoded form is the XOR of the new page with the old one,
 * zero-run-length encoded (XBZRLE-style, our own format; the grammar is at
 * the top of delta.c and in docs/wire-protocol.md, "Lane batches").
 *
 * Callers allocate; nothing here allocates. Encode and decode are pure
 * functions of their arguments and are safe to call from any thread.
 *
 * Implementations: a scalar one (the test oracle: written for clarity, a byte
 * at a time) and SIMD ones. The default is chosen once, the first time it is
 * needed, from the CPU's features (__builtin_cpu_supports); the environment
 * variable RDMAX_DELTA_IMPL=scalar|sse2|avx2|avx512 overrides that choice.
 * Every implementation produces byte-identical output for the same input
 * (tests check it), so sender and receiver may use different ones.
 */
#ifndef RDMAX_DELTA_H
#define RDMAX_DELTA_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Page lengths the codec accepts: a multiple of 64, at most this. */
#define RDMAX_DELTA_MAX_LEN 8192u

/*
 * Largest encoding of a page of len bytes (the first token's zero-run and
 * length fields are the only overhead that is not paid for by skipped
 * bytes; see delta.c). A dst of this size never gets -EMSGSIZE.
 */
#define RDMAX_DELTA_BOUND(len) ((size_t)(len) + 3)

enum rdmax_delta_impl {
    RDMAX_DELTA_AUTO = 0, /* what the CPU supports best */
    RDMAX_DELTA_SCALAR,
    RDMAX_DELTA_SSE2,
    RDMAX_DELTA_AVX2,
    RDMAX_DELTA_AVX512, /* AVX-512BW */
    RDMAX_DELTA_IMPL_COUNT,
};

/*
 * One implementation. encode and decode have the contracts of
 * rdmax_delta_encode and rdmax_delta_decode below.
 */
struct rdmax_delta_ops {
    const char *name;
    enum rdmax_delta_impl impl;
    ssize_t (*encode)(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur, size_t len);
    ssize_t (*decode)(uint8_t *page, size_t len, const uint8_t *old, const uint8_t *src,
                      size_t src_len);
};

/*
 * Encode cur against old (both len bytes) into dst[0..cap).
 * @return the encoded length (> 0); 0 when cur equals old (send nothing);
 *         -EMSGSIZE when the encoding would be longer than cap (the caller
 *         asked for "delta only if at most cap bytes"; dst[0..cap) is then
 *         clobbered); -EINVAL when len is 0, not a multiple of 64 or above
 *         RDMAX_DELTA_MAX_LEN.
 */
ssize_t rdmax_delta_encode(uint8_t *dst, size_t cap, const uint8_t *old, const uint8_t *cur,
                           size_t len);

/*
 * Decode src[0..src_len) (untrusted) against old into page (both len bytes).
 * page may equal old (decode in place); otherwise they must not overlap.
 * src_len 0 means "unchanged": page becomes a copy of old.
 * @return len; -EBADMSG when src is malformed in any way (truncated, a run
 *         past the end of the page, a non-minimal or overlong varint, a zero
 *         length run where the grammar forbids it), in which case page's
 *         contents are unspecified (but nothing outside page[0..len) nor
 *         src[0..src_len) is ever touched); -EINVAL for a bad len.
 */
ssize_t rdmax_delta_decode(uint8_t *page, size_t len, const uint8_t *old, const uint8_t *src,
                           size_t src_len);

/*
 * The implementation `impl`, or NULL when this CPU (or this build) lacks it.
 * RDMAX_DELTA_AUTO gives the default one. For tests and benchmarks.
 */
const struct rdmax_delta_ops *rdmax_delta_ops_get(enum rdmax_delta_impl impl);

/*
 * Make `impl` the default used by rdmax_delta_encode/decode from now on.
 * Not thread-safe with concurrent encodes: call it at startup (benchmarks,
 * tests). @return 0, or -ENOTSUP when the CPU lacks it.
 */
int rdmax_delta_select(enum rdmax_delta_impl impl);

/* "scalar", "sse2", "avx2", "avx512"; NULL when out of range. */
const char *rdmax_delta_impl_name(enum rdmax_delta_impl impl);

/* Parse a name as accepted by RDMAX_DELTA_IMPL; -EINVAL when unknown. */
int rdmax_delta_impl_parse(const char *name, enum rdmax_delta_impl *out);

#endif
