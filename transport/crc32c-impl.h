/*
 * CRC-32C internals for the unit test and the benchmark: every
 * implementation by name, so each can be held against the table version in
 * one process whatever rdmax_crc32c picked. Not for the data path: use
 * rdmax_crc32c (crc32c.h).
 */
#ifndef RDMAX_CRC32C_IMPL_H
#define RDMAX_CRC32C_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum rdmax_crc32c_impl {
    RDMAX_CRC32C_TABLE,       /* slicing-by-8 tables: fallback and oracle */
    RDMAX_CRC32C_SERIAL,      /* one chain of SSE4.2 crc32 (the old path) */
    RDMAX_CRC32C_3WAY_SW,     /* three chains, combined by a C multiply */
    RDMAX_CRC32C_3WAY_PCLMUL, /* three chains, combined by PCLMULQDQ */
    RDMAX_CRC32C_NIMPL,
};

const char *rdmax_crc32c_impl_name(enum rdmax_crc32c_impl impl);
/* Whether this CPU can run impl (RDMAX_NO_SIMD does not matter here). */
bool rdmax_crc32c_impl_supported(enum rdmax_crc32c_impl impl);
/* rdmax_crc32c by impl, which must be supported. */
uint32_t rdmax_crc32c_with(enum rdmax_crc32c_impl impl, uint32_t crc, const void *buf, size_t len);
/* The implementation rdmax_crc32c uses in this process. */
enum rdmax_crc32c_impl rdmax_crc32c_selected(void);

#endif
