/*
 * Pre-flight with several migrations at once (recv with several slots,
 * main.c): what the host still owes the migrations already admitted.
 * MemAvailable shrinks only as their destination QEMUs fill guest RAM, so
 * a second migration checked against MemAvailable alone would be admitted
 * into memory the first one is about to take. Each admitted migration
 * holds what it asked for less what it has delivered so far.
 */
#ifndef RDMAX_ADMISSION_H
#define RDMAX_ADMISSION_H

#include <stdatomic.h>
#include <stdint.h>

struct rdmax_admission;

/* 0 or -ENOMEM. */
int rdmax_admission_create(struct rdmax_admission **out);
/* Accepts NULL. Every admitted migration must have been released. */
void rdmax_admission_destroy(struct rdmax_admission *a);

/*
 * Admit `who` (a session) needing `need` bytes when need plus what the
 * others still hold fits in avail. delivered[0..1]: the counters of what
 * who has delivered (read relaxed, any thread; valid until release).
 * 0, or -ENOMEM (nothing held) with *held the others' total either way;
 * -ENOSPC when RDMAX_SLOTS_MAX migrations are admitted already.
 */
int rdmax_admission_admit(struct rdmax_admission *a, const void *who, uint64_t need,
                          uint64_t avail, const _Atomic uint64_t *delivered0,
                          const _Atomic uint64_t *delivered1, uint64_t *held);

/* who's migration ended: it holds nothing now. Unknown who: nothing happens. */
void rdmax_admission_release(struct rdmax_admission *a, const void *who);

#endif
