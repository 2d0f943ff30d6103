/* run_threads.h: how run.c's forward pass shares a batch's work among threads, and how many threads it uses.
   Part of run.c's single compile unit (run.c includes it). */
#ifndef RUN_THREADS_H
#define RUN_THREADS_H
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "run_kernels.h"

/* The most threads the engine runs: far more than any machine's cores, few enough that per-thread buffers and
   OpenMP's thread stacks stay small (a huge count would exhaust memory inside the OpenMP runtime). */
#define MAX_THREADS 1024

/* One thread's share of a phase's work items (see share_take). */
typedef struct {
    _Alignas(64) _Atomic uint64_t span; /* the items not yet taken: front << 32 | back; a cache line per thread */
} Share;

#define ITEM_ROWS 32 /* a batch's work item in a product: the pair of 16-row blocks its kernel takes at once */

/* A batch's items [0, count) of one phase start split into equal, contiguous shares, one per thread. Each
   thread takes its own front to back (a product prefetches its next item's weights), and a thread whose share
   is done takes the last item of the share with the most left: on a shared (or hybrid) machine one core is often
   slower, and with fixed shares the faster would wait for it at every barrier. */
static void share_split(Share *shares, int count, int nth) {
    for (int t = 0; t < nth; t++)
        atomic_init(&shares[t].span, (uint64_t)count * (uint64_t)t / (uint64_t)nth << 32 |
                                         (uint64_t)count * (uint64_t)(t + 1) / (uint64_t)nth);
}

/* The next item for thread tid, or -1 once every share is done. There is a share per thread asked for (slots);
   OpenMP may have started fewer, and the shares of those it did not start are taken like any others. Item order
   within a phase never changes a result: each item writes its own outputs, with the same arithmetic whichever
   thread runs it. */
static int share_take(Share *shares, int tid, int slots) {
    uint64_t span = atomic_load_explicit(&shares[tid].span, memory_order_relaxed);
    while ((uint32_t)(span >> 32) < (uint32_t)span)
        if (atomic_compare_exchange_weak_explicit(&shares[tid].span, &span, span + ((uint64_t)1 << 32),
                                                  memory_order_relaxed, memory_order_relaxed))
            return (int)(span >> 32);
    for (;;) {
        int victim = -1;
        uint32_t most = 0;
        for (int t = 0; t < slots; t++) {
            const uint64_t other = atomic_load_explicit(&shares[t].span, memory_order_relaxed);
            if ((uint32_t)other - (uint32_t)(other >> 32) > most) /* back - front: front <= back always */
                most = (uint32_t)other - (uint32_t)(other >> 32), victim = t, span = other;
        }
        if (victim < 0) return -1;
        if (atomic_compare_exchange_weak_explicit(&shares[victim].span, &span, span - 1, memory_order_relaxed,
                                                  memory_order_relaxed))
            return (int)(uint32_t)span - 1;
    }
}

/* The part of [0, count) that thread tid of nth owns: whole units (blocks of 16 rows keep RoPE pairs together). */
static void thread_share(int count, int unit, int tid, int nth, int *i0, int *i1) {
    const int units = (count + unit - 1) / unit;
    *i0 = clamp((int)((long long)units * tid / nth) * unit, 0, count);
    *i1 = clamp((int)((long long)units * (tid + 1) / nth) * unit, 0, count);
}

/* A thread's walk through a phase's rows or items: without shares its fixed share (in units of `unit`) at once,
   with them one item (`item` of them) at a time. */
typedef struct {
    Share *shares;
    int slots, count, item, unit, tid, nth, started;
} Work;

/* A phase's rows, in items of ITEM_ROWS (fixed shares in blocks of 16), or its items one by one; slots: the
   threads asked for. */
static Work rows_work(int slots, Share *shares, int rows, int tid, int nth) {
    return (Work){shares, slots, rows, ITEM_ROWS, 16, tid, nth, 0};
}
static Work items_work(int slots, Share *shares, int count, int tid, int nth) {
    return (Work){shares, slots, count, 1, 1, tid, nth, 0};
}

/* The next part [*i0, *i1) this thread does; 0 once it has none left. */
static int work_next(Work *w, int *i0, int *i1) {
    if (!w->shares) {
        if (w->started) return 0;
        w->started = 1;
        thread_share(w->count, w->unit, w->tid, w->nth, i0, i1);
        return *i0 < *i1;
    }
    const int item = share_take(w->shares, w->tid, w->slots);
    if (item < 0) return 0;
    *i0 = item * w->item;
    *i1 = min_int(*i0 + w->item, w->count);
    return 1;
}

/* OMP_NUM_THREADS when set; else the CPUs this process may run on, less those other processes are running on
   right now. On a shared machine a thread that waits for a CPU stalls the others at every barrier, so a
   thread more than there are idle CPUs costs far more than it brings. Runnable
   tasks come from /proc/loadavg (an instant count, unlike the load averages, which remember a training run
   that just ended), the least of a few looks so one short-lived process does not count. The count is the
   whole machine's, so a process allowed fewer CPUs than the machine has (a container) counts its share. */
static int default_thread_count(void) {
#ifdef _OPENMP
    if (getenv("OMP_NUM_THREADS")) return omp_get_max_threads();
    const int procs = omp_get_num_procs();
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    int others = INT32_MAX;
    for (int look = 0; look < 5 && others > 0; look++) {
        FILE *f = fopen("/proc/loadavg", "r");
        int runnable = 0;
        const int ok = f && fscanf(f, "%*f %*f %*f %d/", &runnable) == 1;
        if (f) fclose(f);
        if (!ok) return procs;
        others = runnable - 1 < others ? runnable - 1 : others; /* less this process */
        if (look < 4) nanosleep(&(struct timespec){0, 2000000}, NULL);
    }
    const int busy = online > procs ? (int)((long long)others * procs / online) : others;
    return procs - busy > 0 ? procs - busy : 1;
#else
    return 1;
#endif
}
#endif
