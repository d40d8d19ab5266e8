/* rdma-x: pre-flight bookkeeping for migrations at once; see admission.h. */
#include "admission.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>

#include "session.h"

struct admitted {
    const void *who; /* NULL: free */
    uint64_t need;
    const _Atomic uint64_t *delivered[2];
};

struct rdmax_admission {
    pthread_mutex_t mu;
    struct admitted m[RDMAX_SLOTS_MAX]; /* mu */
};

int rdmax_admission_create(struct rdmax_admission **out)
{
    struct rdmax_admission *a = calloc(1, sizeof(*a));

    if (!a) {
        return -ENOMEM;
    }
    pthread_mutex_init(&a->mu, NULL);
    *out = a;
    return 0;
}

void rdmax_admission_destroy(struct rdmax_admission *a)
{
    if (a) {
        pthread_mutex_destroy(&a->mu);
        free(a);
    }
}

static uint64_t still_held(const struct admitted *m)
{
    uint64_t done = 0;

    for (unsigned i = 0; i < 2; i++) {
        if (m->delivered[i]) {
            done += atomic_load_explicit(m->delivered[i], memory_order_relaxed);
        }
    }
    return done >= m->need ? 0 : m->need - done;
}

int rdmax_admission_admit(struct rdmax_admission *a, const void *who, uint64_t need,
                          uint64_t avail, const _Atomic uint64_t *delivered0,
                          const _Atomic uint64_t *delivered1, uint64_t *held)
{
    struct admitted *free_one = NULL;
    uint64_t others = 0;
    int r = 0;

    pthread_mutex_lock(&a->mu);
    for (unsigned i = 0; i < RDMAX_SLOTS_MAX; i++) {
        if (a->m[i].who == who) {
            free_one = &a->m[i]; /* admitted again: replaces its own */
        } else if (a->m[i].who) {
            others += still_held(&a->m[i]);
        } else if (!free_one) {
            free_one = &a->m[i];
        }
    }
    *held = others;
    if (!free_one) {
        r = -ENOSPC;
    } else if (others > avail || need > avail - others) {
        r = -ENOMEM;
    } else {
        *free_one = (struct admitted){who, need, {delivered0, delivered1}};
    }
    pthread_mutex_unlock(&a->mu);
    return r;
}

void rdmax_admission_release(struct rdmax_admission *a, const void *who)
{
    if (!a) {
        return;
    }
    pthread_mutex_lock(&a->mu);
    for (unsigned i = 0; i < RDMAX_SLOTS_MAX; i++) {
        if (a->m[i].who == who) {
            a->m[i].who = NULL;
        }
    }
    pthread_mutex_unlock(&a->mu);
}
