/*
 * The userfaultfd fault loop: one fault thread and a few installer threads.
 *
 * The fault thread owns every uffd of the restored tasks: it alone reads
 * them, in handle_uffd(), and serves what it reads at once: page faults
 * (handle_pagefault) from the store, and the non-cooperative events FORK,
 * REMAP, REMOVE and UNMAP (handle_fork, handle_remap, handle_remove). It
 * never copies more than a fault's own few pages, so a fault never waits
 * behind the eager install of the whole memory.
 *
 * The installer threads (installer_main) install, once restore has finished,
 * every page still owed: each claims a run of owed pages (CLAIM_PAGES)
 * under the loop lock, copies it with the lock dropped, in ioctls of
 * batch_pages, and settles it under the lock again. Two installers on two
 * cores copy twice as fast as one: UFFDIO_COPY takes only the per-VMA lock
 * of the target's mm, and most of its cost is allocating and filling the
 * target's pages. Each runs on a CPU of its own when there are enough.
 *
 * What a task is owed is an interval list (its lazy ranges minus what was
 * installed, unmapped, dropped, or is being copied right now by an
 * installer). A fault outside it gets a zero page, which is what the process
 * would see had the memory never been lazy; a fault inside it gets the
 * store's data, or waits for the data to arrive.
 *
 * The one rule that ties the threads together (the "gate", see gate_close,
 * faultloop_gate.c):
 * the fault thread reads or serves a task only while no installer copy into
 * that task is in flight, and installers start no copy into a task while the
 * fault thread has it. The reasons are kernel races, explained there.
 *
 * The files: faultloop.c (this one: creating, starting, waiting for and
 * stopping the loop, and how it ends: done, or a fatal error),
 * faultloop_fault.c (the fault thread and the events it reads),
 * faultloop_gate.c (the gate), faultloop_installers.c (the installer
 * threads), faultloop_fill.c (one copy into a task, for both kinds of
 * thread), faultloop_stats.c (the stats and histograms), and
 * faultloop_internal.h (the structures they share, the tunables, and the
 * functions one file calls in another).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "faultloop_internal.h"

/* --- the end: done, or a fatal error --------------------------------------- */

/* A fatal error ends the loop: the first one is kept, with what failed
 * (HM_LOOP_OP_*), for which task and where, for the caller to report. */
void loop_fail(hm_loop *l, int op, const struct task *t, uint64_t addr, int64_t err)
{
	if (l->st.error)
		return;
	l->st.error = err;
	l->st.error_op = op;
	l->st.error_pid = t ? t->pid : 0;
	l->st.error_addr = addr;
}

static int all_done(hm_loop *l)
{
	struct task *t;

	if (!l->eager || l->inflight)
		return 0;
	for (t = l->tasks; t; t = t->next)
		if (!t->exited && (hm_ranges_count(t->owed) || t->nwaiting))
			return 0;
	return 1;
}

void check_done(hm_loop *l)
{
	if (!l->done && all_done(l)) {
		l->done = 1;
		l->st.done_ns = now_ns();
	}
	if (l->done || l->st.error)
		pthread_cond_broadcast(&l->cond);
}

/* --- public API ------------------------------------------------------------ */

static void kick(hm_loop *l)
{
	uint64_t one = 1;
	if (write(l->ctlfd, &one, sizeof(one)) < 0) {
		/* the counter cannot overflow at one per call; nothing to do */
	}
}

int hm_loop_new(hm_store *store, hm_loop **out)
{
	hm_loop *l = calloc(1, sizeof(*l));
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = NULL };
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	pthread_mutexattr_t ma;
	int pipefd[2], rc = 0, i;

	if (!l)
		return -ENOMEM;
	l->store = store;
	l->guard_fd = -1;
	l->next_fork_key = FORK_KEY_BASE;
	l->ninstallers = ncpu > 0 && ncpu < INSTALLERS_DEFAULT ? (int)ncpu : INSTALLERS_DEFAULT;
	l->batch_pages = BATCH_PAGES_DEFAULT;
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	l->ctlfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (pipe2(pipefd, O_CLOEXEC | O_NONBLOCK) == 0) {
		l->miss_rd = pipefd[0];
		l->miss_wr = pipefd[1];
	} else {
		l->miss_rd = l->miss_wr = -1;
		rc = -errno;
	}
	if (l->epfd < 0 || l->ctlfd < 0)
		rc = -errno;
	if (!rc && epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->ctlfd, &ev))
		rc = -errno;
	/* Priority inheritance: an installer holding the lock runs at the
	 * fault thread's priority while the fault thread waits for it, instead
	 * of waiting for a time slice among the other threads. */
	pthread_mutexattr_init(&ma);
	pthread_mutexattr_setprotocol(&ma, PTHREAD_PRIO_INHERIT);
	pthread_mutex_init(&l->lock, &ma);
	for (i = 0; i < INSTALLERS_MAX; i++) {
		l->installers[i].l = l;
		pthread_mutex_init(&l->installers[i].copy_lock, &ma);
	}
	pthread_mutexattr_destroy(&ma);
	pthread_cond_init(&l->cond, NULL);
	pthread_cond_init(&l->work, NULL);
	if (rc) {
		hm_loop_free(l);
		return rc;
	}
	*out = l;
	return 0;
}

int hm_loop_configure(hm_loop *l, int installers, int batch_pages)
{
	if (l->started)
		return -EBUSY;
	if (installers < 1 || installers > INSTALLERS_MAX || batch_pages < 1 || batch_pages > (int)CHUNK_PAGES)
		return -EINVAL;
	l->ninstallers = installers;
	l->batch_pages = batch_pages;
	return 0;
}

int hm_loop_add_task(hm_loop *l, int uffd, uint64_t key, int32_t pid, const uint64_t *runs, uint64_t nruns)
{
	hm_ranges *owed;
	struct task *t;
	uint64_t i;
	int rc;

	if (key >= FORK_KEY_BASE)
		return -ERANGE;
	rc = hm_ranges_new(&owed);
	for (i = 0; !rc && i < nruns; i++) {
		uint64_t vaddr = runs[2 * i], npages = runs[2 * i + 1];

		if (vaddr & (PAGE_SZ - 1) || npages > (UINT64_MAX - vaddr) / PAGE_SZ)
			rc = -EINVAL;
		else
			rc = hm_ranges_add(owed, vaddr, vaddr + npages * PAGE_SZ);
	}
	pthread_mutex_lock(&l->lock);
	for (t = l->tasks; !rc && t; t = t->next)
		if (t->key == key)
			rc = -EEXIST;
	if (!rc && !new_task(l, uffd, key, pid, owed))
		rc = -errno ?: -ENOMEM;
	pthread_mutex_unlock(&l->lock);
	if (rc)
		hm_ranges_free(owed);
	return rc;
}

int hm_loop_set_guard(hm_loop *l, int sockfd)
{
	int fd = -1;

	if (l->started)
		return -EBUSY;
	if (sockfd >= 0 && (fd = fcntl(sockfd, F_DUPFD_CLOEXEC, 0)) < 0)
		return -errno;
	if (l->guard_fd >= 0)
		close(l->guard_fd);
	l->guard_fd = fd;
	return 0;
}

static void join_all(hm_loop *l, int ninstallers)
{
	int i;

	pthread_mutex_lock(&l->lock);
	l->stop = 1;
	pthread_cond_broadcast(&l->work);
	pthread_mutex_unlock(&l->lock);
	kick(l);
	pthread_join(l->fault_thread, NULL);
	for (i = 0; i < ninstallers; i++)
		pthread_join(l->installers[i].thread, NULL);
}

int hm_loop_start(hm_loop *l)
{
	int rc, i;

	if (l->started)
		return -EALREADY;
	rc = -pthread_create(&l->fault_thread, NULL, fault_main, l);
	for (i = 0; !rc && i < l->ninstallers; i++) {
		rc = -pthread_create(&l->installers[i].thread, NULL, installer_main, &l->installers[i]);
		if (rc)
			join_all(l, i);
	}
	if (!rc)
		l->started = 1;
	return rc;
}

int hm_loop_begin_eager(hm_loop *l)
{
	pthread_mutex_lock(&l->lock);
	if (!l->eager) {
		l->eager = 1;
		l->st.eager_ns = now_ns();
	}
	pthread_cond_broadcast(&l->work);
	pthread_mutex_unlock(&l->lock);
	kick(l);
	return 0;
}

int hm_loop_notify(hm_loop *l)
{
	pthread_mutex_lock(&l->lock);
	pthread_cond_broadcast(&l->work);
	pthread_mutex_unlock(&l->lock);
	kick(l);
	return 0;
}

int hm_loop_miss_fd(hm_loop *l)
{
	return l->miss_rd;
}

int hm_loop_wait(hm_loop *l, int timeout_ms)
{
	struct timespec ts;
	int rc = 0;

	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_sec += timeout_ms / 1000;
	ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (ts.tv_nsec >= 1000000000L) {
		ts.tv_sec++;
		ts.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&l->lock);
	while (!l->done && !l->st.error && rc != ETIMEDOUT)
		rc = pthread_cond_timedwait(&l->cond, &l->lock, &ts);
	rc = l->st.error ? (int)l->st.error : l->done;
	pthread_mutex_unlock(&l->lock);
	return rc;
}

int hm_loop_stop(hm_loop *l)
{
	if (!l->started)
		return 0;
	join_all(l, l->ninstallers);
	l->started = 0;
	return 0;
}

void hm_loop_free(hm_loop *l)
{
	struct task *t, *next;

	if (!l)
		return;
	hm_loop_stop(l);
	for (t = l->tasks; t; t = next) {
		next = t->next;
		close(t->uffd);
		hm_ranges_free(t->owed);
		free(t->waiting);
		free(t->remaps);
		free(t);
	}
	if (l->epfd >= 0)
		close(l->epfd);
	if (l->ctlfd >= 0)
		close(l->ctlfd);
	if (l->miss_rd >= 0)
		close(l->miss_rd);
	if (l->miss_wr >= 0)
		close(l->miss_wr);
	if (l->guard_fd >= 0)
		close(l->guard_fd);
	pthread_cond_destroy(&l->cond);
	for (int i = 0; i < INSTALLERS_MAX; i++)
		pthread_mutex_destroy(&l->installers[i].copy_lock);
	pthread_cond_destroy(&l->work);
	pthread_mutex_destroy(&l->lock);
	free(l);
}
