/* What the fault loop needs of the store beyond the public API: direct
 * access to a task's chunks under its lock, so that UFFDIO_COPY reads the
 * page straight from the store with no intermediate copy. */
#pragma once
#include <pthread.h>
#include <stdint.h>

#include "pagestore.h"
#include "common.h"

_Static_assert(PAGE_SZ == HM_PAGE_SIZE, "common.h and the API disagree on the page size");

struct store_task;

/* The task of `key`, created if `create`; NULL if absent (or -ENOMEM). Tasks
 * live until hm_store_drop_task or hm_store_free. */
struct store_task *store_task(hm_store *s, uint64_t key, int create);
void store_task_lock(struct store_task *t);
void store_task_unlock(struct store_task *t);

/* With the task locked: the kind (HM_PAGE_*) of the page at vaddr and the
 * number of following pages of the same kind, at most max_pages and never
 * past the chunk; *data points at the first page's bytes for HM_PAGE_DATA. */
int store_run(struct store_task *t, uint64_t vaddr, uint64_t max_pages, uint64_t *npages, const uint8_t **data);
/* Chunk buffers to unmap once no lock is held, many at a time: each munmap
 * is a TLB shootdown, an IPI to every other CPU the daemon runs on (the
 * other installer's, always), which took more CPU than the zap itself here
 * (1 GiB: 0.044 CPU-s of the installers' 0.63 in munmap, over half of it
 * sending IPIs). An installer keeps what it released, up to
 * STORE_GARBAGE_MAX chunks (64 MiB), and store_garbage_free unmaps runs of
 * adjacent buffers (chunks mapped one after another are) in one call. */
#define STORE_GARBAGE_MAX 32
struct store_garbage {
	void *bufs[STORE_GARBAGE_MAX];
	int n;
};
/* Room for what one more release can add (a claim's chunk, and the rest of
 * a task that exited meanwhile): unmap before the next claim if not. */
#define STORE_GARBAGE_ROOM(g) ((g)->n <= STORE_GARBAGE_MAX - 2)
void store_garbage_free(struct store_garbage *g);

/* With the task locked: forget pages that are now installed in the process.
 * A chunk's memory goes back to the system once it holds nothing: its buffer
 * goes into g if given (then store_garbage_free it), or is unmapped now. */
void store_release(struct store_task *t, uint64_t vaddr, uint64_t npages, struct store_garbage *g);
