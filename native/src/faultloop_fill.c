/*
 * Installing pages, for the fault thread and the installers alike: one
 * UFFDIO_COPY or UFFDIO_ZEROPAGE into a task (fill), what its failure means
 * for the task (fill_failed), counting what went in, and asking the fetcher
 * for pages the store lacks (ask_for).
 */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "faultloop_internal.h"

static void task_exited(hm_loop *l, struct task *t)
{
	uint64_t start, end;

	if (t->exited)
		return;
	t->exited = 1;
	l->st.tasks_exited++;
	store_task_lock(t->st);
	while (hm_ranges_next(t->owed, 0, &start, &end)) {
		store_release(t->st, start, (end - start) / PAGE_SZ, NULL);
		hm_ranges_remove(t->owed, start, end);
	}
	store_task_unlock(t->st);
	t->nwaiting = 0;
}

/* Threads waiting on a range we will not install retry their access. */
void wake(struct task *t, uint64_t addr, uint64_t len)
{
	struct uffdio_range r = { .start = addr, .len = len };

	ioctl(t->uffd, UFFDIO_WAKE, &r);
}

/*
 * One UFFDIO_COPY (data) or UFFDIO_ZEROPAGE (data NULL) of up to npages at
 * addr. Returns the pages dealt with, of which *installed went in by us, or
 * -errno. The ioctls report the bytes done even when they fail half-way (the
 * ioctl then says EAGAIN), so progress always counts. Needs no lock: the
 * uffd is only closed once every thread has stopped.
 */
int64_t fill(struct task *t, uint64_t addr, uint64_t npages, const uint8_t *data, uint64_t *installed)
{
	*installed = 0;
	for (;;) {
		int64_t progress;
		int rc;

		if (data) {
			struct uffdio_copy c = { .dst = addr, .src = (uint64_t)(uintptr_t)data, .len = npages * PAGE_SZ };
			rc = ioctl(t->uffd, UFFDIO_COPY, &c);
			progress = c.copy;
		} else {
			struct uffdio_zeropage z = { .range = { .start = addr, .len = npages * PAGE_SZ } };
			rc = ioctl(t->uffd, UFFDIO_ZEROPAGE, &z);
			progress = z.zeropage;
		}
		if (rc == 0)
			progress = npages * PAGE_SZ;
		if (progress > 0) {
			*installed = progress / PAGE_SZ;
			return *installed;
		}
		switch (errno) {
		case EEXIST:
			/* Already mapped: the fault thread served it, or the other
			 * side of a fault-around overlapped. Either way the page is
			 * there, but a failed ioctl wakes no one: a thread still
			 * waiting on it would sleep forever, so wake it explicitly. */
			wake(t, addr, PAGE_SZ);
			return 1;
		case ENOENT:
			/* The range leaves its VMA. An owed range may span two VMAs
			 * (adjacent lazy VMAs merge in the interval list, and mprotect
			 * splits VMAs after restore), but one ioctl works within one
			 * VMA: halve until the range fits. A single page outside any
			 * registered VMA is no longer owed; its UNMAP event is on its
			 * way or already read. */
			if (npages > 1) {
				npages /= 2;
				continue;
			}
			wake(t, addr, PAGE_SZ);
			return 1;
		default:
			return -errno;
		}
	}
}

void count_installed(hm_loop *l, int kind, uint64_t installed, int faulted)
{
	if (kind == HM_PAGE_ZERO) {
		l->st.pages_zero += installed;
	} else if (installed) {
		l->st.bytes_copied += installed * PAGE_SZ;
		l->st.pages_fault += faulted ? 1 : 0;
		l->st.pages_prefetch += faulted ? installed - 1 : installed;
	}
}

/* What a failed fill (a copy of data, or of zeros) at addr means for the task. */
enum install_result fill_failed(hm_loop *l, struct task *t, uint64_t addr, const uint8_t *data, int64_t n)
{
	if (n == -EAGAIN) {
		t->blocked = 1;
		return BLOCKED;
	}
	if (n == -ESRCH) {
		task_exited(l, t);
		return GONE;
	}
	loop_fail(l, data ? HM_LOOP_OP_COPY : HM_LOOP_OP_ZEROPAGE, t, addr, n);
	return GONE;
}

/* Ask the fetcher for pages the store lacks. A full pipe only loses a hint:
 * the fetcher fetches every task's pages anyway, and idle installers ask
 * again for what is still missing. */
void ask_for(hm_loop *l, struct task *t, uint64_t addr, uint64_t npages)
{
	struct hm_miss m = { t->key, addr, npages, t->pid, addr };
	uint64_t i;

	/* back through the mremaps, latest first, to the address in the images */
	for (i = t->nremaps; i-- > 0;) {
		struct remap *r = &t->remaps[i];
		if (m.src >= r->to && m.src < r->to + r->len) {
			m.npages = MIN(m.npages, (r->to + r->len - m.src) / PAGE_SZ);
			m.src = m.src - r->to + r->from;
		} else if (m.src < r->to && m.src + m.npages * PAGE_SZ > r->to) {
			m.npages = (r->to - m.src) / PAGE_SZ; /* stop where the moved pages start */
		}
	}

	if (write(l->miss_wr, &m, sizeof(m)) < 0) {
	}
}
