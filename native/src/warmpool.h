/* Chunk buffers faulted in ahead of need by a thread of their own, so that
 * pre-copy's puts into fresh chunks copy into memory already there: on a VM
 * the first touch of fresh memory (the kernel clearing it, the host backing
 * it) cost the receiving thread 0.3-2.5 CPU-s per GiB. The pool holds at
 * most its target; the store's owner sets the target within its quota. */
#pragma once
#include <stdint.h>

struct warm_pool;

int warm_pool_new(struct warm_pool **out);
/* Stops the thread and unmaps what the pool holds. */
void warm_pool_free(struct warm_pool *p);
/* Hold up to n buffers (CHUNK_SZ each, every page written); buffers over
 * the target are unmapped. The thread starts at the first n > 0. */
int warm_pool_set(struct warm_pool *p, uint64_t n);
/* A buffer of the pool, now the caller's (munmap CHUNK_SZ), or NULL. */
void *warm_pool_take(struct warm_pool *p);
/* Buffers held now. */
uint64_t warm_pool_held(struct warm_pool *p);
