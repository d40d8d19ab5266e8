/*
 * CRC-32C. The SSE4.2 crc32 instruction does ~8 bytes a cycle, so checking
 * every frame costs far less than the link; the table version is the
 * fallback for CPUs without it and the test oracle.
 */
#include "crc32c.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static uint32_t table[8][256];
static int mode; /* 1 table, 2 hardware; set once */
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = c & 1 ? (c >> 1) ^ 0x82f63b78u : c >> 1;
        }
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
        }
    }
}

static uint32_t crc32c_table(uint32_t crc, const uint8_t *p, size_t len)
{
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= crc;
        crc = table[7][v & 0xff] ^ table[6][(v >> 8) & 0xff] ^ table[5][(v >> 16) & 0xff] ^
              table[4][(v >> 24) & 0xff] ^ table[3][(v >> 32) & 0xff] ^ table[2][(v >> 40) & 0xff] ^
              table[1][(v >> 48) & 0xff] ^ table[0][v >> 56];
        p += 8;
        len -= 8;
    }
    while (len--) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    }
    return crc;
}

static void crc32c_init(void)
{
    table_init();
    mode = 1;
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2") && !getenv("RDMAX_NO_SIMD")) {
        mode = 2;
    }
#endif
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p,
                                                            size_t len)
{
    uint64_t c = crc;

    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        len -= 8;
    }
    crc = (uint32_t)c;
    while (len--) {
        crc = __builtin_ia32_crc32qi(crc, *p++);
    }
    return crc;
}
#endif

uint32_t rdmax_crc32c(uint32_t crc, const void *buf, size_t len)
{
    pthread_once(&once, crc32c_init);
    crc = ~crc;
#if defined(__x86_64__)
    if (mode == 2) {
        return ~crc32c_hw(crc, buf, len);
    }
#endif
    return ~crc32c_table(crc, buf, len);
}
