/* CRC-32C (Castagnoli): the checksum of every wire frame. */
#ifndef RDMAX_CRC32C_H
#define RDMAX_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continue a CRC-32C over buf; start with crc = 0. */
uint32_t rdmax_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
