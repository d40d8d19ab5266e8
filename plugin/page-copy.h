/*
 * One 4 KiB page copy that stays a libc call. GCC inlines a constant-size
 * 4 KiB memcpy as `rep movsq`, which measured 10-25% slower on this
 * machine's AMD EPYC than libc's vector copy for pages not in cache (the
 * usual case: a page from QEMU's pipe, a frame just received, an old cache
 * slot); calling through a volatile pointer keeps the libc call.
 */
#ifndef RDMAX_PAGE_COPY_H
#define RDMAX_PAGE_COPY_H

#include <stdint.h>
#include <string.h>

#include "lane-codec.h"

static void *(*volatile const rdmax_page_copy_fn)(void *, const void *, size_t) = memcpy;

static inline void rdmax_page_copy(uint8_t *dst, const uint8_t *src)
{
    rdmax_page_copy_fn(dst, src, RDMAX_PAGE_SIZE);
}

#endif
