/*
 * bench-crc: GB/s of each CRC-32C implementation (transport/crc32c.c) this
 * CPU supports, per buffer size: the table, one serial chain of SSE4.2
 * crc32 (the old path), and the three-way interleaved rounds combined in C
 * and by PCLMULQDQ. Each cell checks the same buffer again and again and
 * counts bytes per second of this thread's CPU time (the machine may be
 * shared); the buffer stays in cache, as a frame just written does.
 *
 * Usage: bench-crc [--seconds S] [--smoke]
 * --smoke: one call per cell, and every implementation must agree with the
 * table (meson test, so the bench cannot rot unnoticed).
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "crc32c-impl.h"

static const size_t sizes[] = {64, 1024, 4096, 65536, 262144};

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    double seconds = 0.3;
    bool smoke = false;
    size_t max = sizes[sizeof(sizes) / sizeof(sizes[0]) - 1];
    uint8_t *buf;
    int rc = 0;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--smoke") == 0) {
            smoke = true;
        } else if (strcmp(argv[i], "--seconds") == 0 && i + 1 < argc) {
            seconds = atof(argv[++i]);
        } else {
            fprintf(stderr, "usage: bench-crc [--seconds S] [--smoke]\n");
            return 2;
        }
    }
    buf = aligned_alloc(64, max);
    if (!buf) {
        fprintf(stderr, "bench-crc: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < max; i++) {
        buf[i] = (uint8_t)(i * 2654435761u >> 13);
    }

    printf("%-20s", "GB/s");
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
        printf(" %9zuB", sizes[s]);
    }
    printf("\n");
    for (int impl = 0; impl < RDMAX_CRC32C_NIMPL; impl++) {
        if (!rdmax_crc32c_impl_supported(impl)) {
            printf("%-20s (not supported by this CPU)\n", rdmax_crc32c_impl_name(impl));
            continue;
        }
        printf("%-20s", rdmax_crc32c_impl_name(impl));
        for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
            size_t n = sizes[s];
            uint32_t want = rdmax_crc32c_with(RDMAX_CRC32C_TABLE, 0, buf, n);
            uint32_t c = rdmax_crc32c_with(impl, 0, buf, n);
            uint64_t calls = 1, batch = 1 + (1 << 20) / n;
            double t0, t;

            if (c != want) {
                fprintf(stderr, "bench-crc: %s gives %08x on %zu bytes, table %08x\n",
                        rdmax_crc32c_impl_name(impl), c, n, want);
                rc = 1;
            }
            if (smoke) {
                printf(" %10s", "ok");
                continue;
            }
            t0 = now_s();
            do {
                for (uint64_t i = 0; i < batch; i++) {
                    /* Chained, so no call can be skipped or overlapped. */
                    c = rdmax_crc32c_with(impl, c, buf, n);
                }
                calls += batch;
                t = now_s() - t0;
            } while (t < seconds);
            __asm__ volatile("" : : "r"(c));
            printf(" %10.2f", (double)(calls - 1) * (double)n / t * 1e-9);
        }
        printf("\n");
        fflush(stdout);
    }
    printf("rdmax_crc32c uses %s here\n", rdmax_crc32c_impl_name(rdmax_crc32c_selected()));
    free(buf);
    return rc;
}
