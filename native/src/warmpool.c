/* The warm pool (warmpool.h): one thread maps and populates chunk buffers
 * while the pool holds fewer than its target; a lower target unmaps the
 * surplus at once. */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "common.h"
#include "warmpool.h"

/* Ahead of a receiver at ~1-2 GB/s, 64 MiB is 30-60 ms of pages. */
#define WARM_MAX 32

struct warm_pool {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	pthread_t thread;
	int started, stop, filling;
	uint64_t target, n;
	void *bufs[WARM_MAX];
};

static void *fill(void *arg)
{
	struct warm_pool *p = arg;

	pthread_mutex_lock(&p->lock);
	while (!p->stop) {
		void *b;

		if (p->n + p->filling >= p->target) {
			pthread_cond_wait(&p->cond, &p->lock);
			continue;
		}
		/* counted while populated (outside the lock, so that take()
		 * never waits for it): the pool never holds more than its target
		 * and this one buffer */
		p->filling = 1;
		pthread_mutex_unlock(&p->lock);
		b = mmap(NULL, CHUNK_SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (b != MAP_FAILED && madvise(b, CHUNK_SZ, MADV_POPULATE_WRITE)) {
			munmap(b, CHUNK_SZ);
			b = MAP_FAILED;
		}
		pthread_mutex_lock(&p->lock);
		p->filling = 0;
		if (b == MAP_FAILED) {
			/* out of memory, or no MADV_POPULATE_WRITE (before 5.14):
			 * puts fault their pages in themselves, as without a pool */
			p->target = 0;
		} else if (p->n < p->target && !p->stop) {
			p->bufs[p->n++] = b;
		} else {
			pthread_mutex_unlock(&p->lock);
			munmap(b, CHUNK_SZ);
			pthread_mutex_lock(&p->lock);
		}
	}
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

int warm_pool_new(struct warm_pool **out)
{
	struct warm_pool *p = calloc(1, sizeof(*p));

	if (!p)
		return -ENOMEM;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->cond, NULL);
	*out = p;
	return 0;
}

void warm_pool_free(struct warm_pool *p)
{
	if (!p)
		return;
	pthread_mutex_lock(&p->lock);
	p->stop = 1;
	pthread_cond_signal(&p->cond);
	pthread_mutex_unlock(&p->lock);
	if (p->started)
		pthread_join(p->thread, NULL);
	while (p->n)
		munmap(p->bufs[--p->n], CHUNK_SZ);
	pthread_cond_destroy(&p->cond);
	pthread_mutex_destroy(&p->lock);
	free(p);
}

int warm_pool_set(struct warm_pool *p, uint64_t n)
{
	void *surplus[WARM_MAX];
	int rc = 0, k = 0;

	pthread_mutex_lock(&p->lock);
	p->target = MIN(n, WARM_MAX);
	/* unmapped now, not by the thread: the caller counts on the pool
	 * holding no more than n once this returns */
	while (p->n > p->target)
		surplus[k++] = p->bufs[--p->n];
	if (p->target && !p->started) {
		rc = -pthread_create(&p->thread, NULL, fill, p);
		p->started = !rc;
		if (rc)
			p->target = 0;
	}
	pthread_cond_signal(&p->cond);
	pthread_mutex_unlock(&p->lock);
	while (k)
		munmap(surplus[--k], CHUNK_SZ);
	return rc;
}

void *warm_pool_take(struct warm_pool *p)
{
	void *b = NULL;

	pthread_mutex_lock(&p->lock);
	if (p->n) {
		b = p->bufs[--p->n];
		pthread_cond_signal(&p->cond);
	}
	pthread_mutex_unlock(&p->lock);
	return b;
}

uint64_t warm_pool_held(struct warm_pool *p)
{
	uint64_t n;

	pthread_mutex_lock(&p->lock);
	n = p->n;
	pthread_mutex_unlock(&p->lock);
	return n;
}
