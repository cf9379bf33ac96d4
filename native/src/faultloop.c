/*
 * The userfaultfd fault loop.
 *
 * One thread owns every uffd of the restored tasks. Each turn it first reads
 * all pending uffd messages (faults and the non-cooperative events FORK,
 * REMAP, REMOVE, UNMAP), and only then, once restore has finished, installs
 * one batch of the pages still owed: faults always go first, the batch never
 * holds off a fault for more than one chunk's copy.
 *
 * What a task is owed is an interval list (its lazy ranges minus what was
 * installed, unmapped or dropped). A fault outside it gets a zero page, which
 * is what the process would see had the memory never been lazy; a fault
 * inside it gets the store's data, or waits for the data to arrive.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "common.h"
#include "store_internal.h"
#include "faultloop.h"
#include "ranges.h"

/* Pages installed together with a faulted one: sequential access is common,
 * and 64 KiB more costs a few microseconds. */
#define FAULT_AROUND_PAGES 16
/* Eager install near the last fault, within this distance, comes first. */
#define NEIGHBOURHOOD (8UL << 20)
#define FORK_KEY_BASE (1ULL << 40)
/* Eager batches: a whole chunk when the process is quiet; while it faults
 * (within the last millisecond), 512 KiB, so that a fault waits behind a few
 * hundred microseconds of copying at most; much smaller batches cost more in
 * loop turns than they save. */
#define BATCH_QUIET CHUNK_PAGES
#define BATCH_BUSY 128
#define BUSY_NS 1000000
#define LAT_BUCKETS (48 * 8)

struct waiting {
	uint64_t addr;
	uint64_t since_ns;
};

/* An mremap, remembered so that pages moved before their data arrived can
 * still be asked for at their address in the images. */
struct remap {
	uint64_t from, to, len;
};

struct task {
	int uffd;
	uint64_t key;
	int32_t pid;
	struct store_task *st;
	hm_ranges *owed;
	int exited;
	int blocked;     /* EAGAIN: the kernel has events for us to read first */
	uint64_t cursor; /* where eager install goes on in this task */
	uint64_t first_absent, first_absent_pages; /* seen by this eager pass */
	struct waiting *waiting;
	uint64_t nwaiting, capwaiting;
	struct remap *remaps;
	uint64_t nremaps;
	struct task *next;
};

struct hm_loop {
	hm_store *store;
	int epfd, ctlfd, miss_rd, miss_wr;
	pthread_t thread;
	int started;

	/* Everything below is guarded by lock; the loop thread drops it only
	 * while it sleeps in epoll_wait. */
	pthread_mutex_t lock;
	pthread_cond_t cond;
	struct task *tasks;
	uint64_t next_fork_key;
	int eager, stop, done, idle;
	int ask_absent; /* idle for 100 ms: ask for absent pages */
	struct task *hint_task;
	uint64_t hint_addr;
	uint64_t last_fault_ns;
	struct hm_loop_stats st;
	uint64_t lat[LAT_BUCKETS];
};

/* --- latency histogram: 8 sub-buckets per power of two ------------------ */

static unsigned lat_bucket(uint64_t ns)
{
	unsigned msb = 63 - __builtin_clzll(ns | 1);
	unsigned sub = msb >= 3 ? (ns >> (msb - 3)) & 7 : ns & 7;
	unsigned b = msb * 8 + sub;
	return b < LAT_BUCKETS ? b : LAT_BUCKETS - 1;
}

static uint64_t lat_bucket_value(unsigned b)
{
	unsigned msb = b / 8, sub = b % 8;
	return msb >= 3 ? ((8ULL + sub) << (msb - 3)) : sub;
}

static void record_latency(hm_loop *l, uint64_t since_ns)
{
	uint64_t ns = now_ns() - since_ns;

	l->lat[lat_bucket(ns)]++;
	if (ns > l->st.lat_max_ns)
		l->st.lat_max_ns = ns;
}

static uint64_t lat_percentile(const hm_loop *l, double p)
{
	uint64_t total = 0, seen = 0;
	unsigned b;

	for (b = 0; b < LAT_BUCKETS; b++)
		total += l->lat[b];
	if (!total)
		return 0;
	for (b = 0; b < LAT_BUCKETS; b++) {
		seen += l->lat[b];
		if (seen >= p * total)
			return lat_bucket_value(b);
	}
	return l->st.lat_max_ns;
}

/* --- installing pages ---------------------------------------------------- */

enum install_result {
	INSTALLED,   /* some pages went in (or turned out to be there already) */
	ABSENT,      /* owed, but the store does not hold the data yet */
	BLOCKED,     /* the kernel wants its events read first (EAGAIN) */
	GONE,        /* the task exited */
};

static void task_exited(hm_loop *l, struct task *t)
{
	uint64_t start, end;

	if (t->exited)
		return;
	t->exited = 1;
	l->st.tasks_exited++;
	store_task_lock(t->st);
	while (hm_ranges_next(t->owed, 0, &start, &end)) {
		store_release(t->st, start, (end - start) / PAGE_SZ);
		hm_ranges_remove(t->owed, start, end);
	}
	store_task_unlock(t->st);
	t->nwaiting = 0;
}

/* Threads waiting on a range we will not install retry their access. */
static void wake(struct task *t, uint64_t addr, uint64_t len)
{
	struct uffdio_range r = { .start = addr, .len = len };

	ioctl(t->uffd, UFFDIO_WAKE, &r);
}

/*
 * One UFFDIO_COPY (data) or UFFDIO_ZEROPAGE (data NULL) of up to npages at
 * addr. Returns the pages dealt with, of which *installed went in by us, or
 * -errno. The ioctls report the bytes done even when they fail half-way (the
 * ioctl then says EAGAIN), so progress always counts.
 */
static int64_t fill(struct task *t, uint64_t addr, uint64_t npages, const uint8_t *data, uint64_t *installed)
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
			/* Already mapped: another thread faulted it in a moment ago, or
			 * a fault-around overlapped. Either way the page is there, but
			 * a failed ioctl wakes no one: a thread still waiting on it
			 * would sleep forever, so wake the page explicitly. */
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

/*
 * Install up to max_pages owed pages of t from addr on. *done gets the number
 * of pages dealt with. Faulted pages count as "fault", the rest as prefetch.
 */
static enum install_result install(hm_loop *l, struct task *t, uint64_t addr, uint64_t max_pages, int faulted,
				   uint64_t *done)
{
	uint64_t start, end, npages;
	uint64_t installed;
	const uint8_t *data;
	int64_t n;
	int kind;

	*done = 0;
	if (t->exited)
		return GONE;
	if (!hm_ranges_next(t->owed, addr, &start, &end) || start != addr)
		return INSTALLED; /* nothing owed here */
	max_pages = MIN(max_pages, (end - addr) / PAGE_SZ);

	store_task_lock(t->st);
	kind = store_run(t->st, addr, max_pages, &npages, &data);
	if (kind == HM_PAGE_ABSENT) {
		store_task_unlock(t->st);
		return ABSENT;
	}
	n = fill(t, addr, npages, data, &installed);
	if (n > 0)
		store_release(t->st, addr, n);
	store_task_unlock(t->st);

	if (n == -EAGAIN) {
		t->blocked = 1;
		return BLOCKED;
	}
	if (n == -ESRCH) {
		task_exited(l, t);
		return GONE;
	}
	if (n < 0) {
		l->st.error = n;
		return GONE;
	}
	hm_ranges_remove(t->owed, addr, addr + n * PAGE_SZ);
	*done = n;
	if (kind == HM_PAGE_ZERO) {
		l->st.pages_zero += installed;
	} else if (installed) {
		l->st.bytes_copied += installed * PAGE_SZ;
		l->st.pages_fault += faulted ? 1 : 0;
		l->st.pages_prefetch += faulted ? installed - 1 : installed;
	}
	return INSTALLED;
}

/* A fault outside what is owed: the page was never lazy, or was dropped. */
static enum install_result install_zero(hm_loop *l, struct task *t, uint64_t addr)
{
	uint64_t installed;
	int64_t n = fill(t, addr, 1, NULL, &installed);

	if (n == -EAGAIN) {
		t->blocked = 1;
		return BLOCKED;
	}
	if (n == -ESRCH) {
		task_exited(l, t);
		return GONE;
	}
	if (n < 0) {
		l->st.error = n;
		return GONE;
	}
	l->st.pages_zero += installed;
	return INSTALLED;
}

/* Ask the fetcher for pages the store lacks. A full pipe only loses a hint:
 * the fetcher fetches every task's pages anyway, and eager install asks
 * again for what is still missing. */
static void ask_for(hm_loop *l, struct task *t, uint64_t addr, uint64_t npages)
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

/* Queue a fault until it can be served: 1 if newly queued, 0 if it already
 * was, or -errno. */
static int add_waiting(struct task *t, uint64_t addr, uint64_t since_ns)
{
	uint64_t i;

	for (i = 0; i < t->nwaiting; i++)
		if (t->waiting[i].addr == addr)
			return 0;
	if (t->nwaiting == t->capwaiting) {
		uint64_t cap = t->capwaiting * 2 + 16;
		struct waiting *w = realloc(t->waiting, cap * sizeof(*w));
		if (!w)
			return -ENOMEM;
		t->waiting = w;
		t->capwaiting = cap;
	}
	t->waiting[t->nwaiting].addr = addr;
	t->waiting[t->nwaiting].since_ns = since_ns;
	t->nwaiting++;
	return 1;
}

/* Serve one faulted page, or queue it until it can be: 0, or -errno. */
static int serve_fault(hm_loop *l, struct task *t, uint64_t addr, uint64_t since_ns)
{
	enum install_result r;
	uint64_t done;
	int rc;

	if (hm_ranges_contains(t->owed, addr))
		r = install(l, t, addr, FAULT_AROUND_PAGES, 1, &done);
	else
		r = install_zero(l, t, addr);

	switch (r) {
	case INSTALLED:
		record_latency(l, since_ns);
		l->hint_task = t;
		l->hint_addr = addr;
		return 0;
	case GONE:
		return (int)l->st.error;
	case ABSENT:
		/* asked for once, when first queued: retries must not flood the pipe */
		rc = add_waiting(t, addr, since_ns);
		if (rc == 1)
			ask_for(l, t, addr, FAULT_AROUND_PAGES);
		return rc < 0 ? rc : 0;
	case BLOCKED:
		rc = add_waiting(t, addr, since_ns);
		return rc < 0 ? rc : 0;
	}
	return 0;
}

/* Serve the queued faults again; those still unservable queue up anew. */
static void retry_waiting(hm_loop *l, struct task *t)
{
	struct waiting *w = t->waiting;
	uint64_t i, n = t->nwaiting;

	t->waiting = NULL;
	t->nwaiting = t->capwaiting = 0;
	for (i = 0; i < n && !t->exited; i++)
		serve_fault(l, t, w[i].addr, w[i].since_ns);
	free(w);
}

/* --- uffd events ---------------------------------------------------------- */

/* A task starts served: what it owes is in place before its uffd joins the
 * epoll set, or a fault read in between would get a zero page. Takes `owed`. */
static struct task *new_task(hm_loop *l, int uffd, uint64_t key, int32_t pid, hm_ranges *owed)
{
	struct task *t = calloc(1, sizeof(*t));
	struct epoll_event ev = { .events = EPOLLIN };

	if (!t)
		return NULL;
	t->uffd = uffd;
	t->key = key;
	t->pid = pid;
	t->owed = owed;
	t->st = store_task(l->store, key, 1);
	fcntl(uffd, F_SETFL, fcntl(uffd, F_GETFL) | O_NONBLOCK);
	ev.data.ptr = t;
	if (!t->st || epoll_ctl(l->epfd, EPOLL_CTL_ADD, uffd, &ev)) {
		free(t);
		return NULL;
	}
	t->next = l->tasks;
	l->tasks = t;
	l->st.tasks++;
	l->idle = 0;
	return t;
}

static int add_remap(struct task *t, uint64_t from, uint64_t to, uint64_t len)
{
	struct remap *v = realloc(t->remaps, (t->nremaps + 1) * sizeof(*v));

	if (!v)
		return -ENOMEM;
	t->remaps = v;
	t->remaps[t->nremaps++] = (struct remap){ from, to, len };
	return 0;
}

/* The child of a fork owes what its parent owed at the fork, with the same
 * contents. Its uffd arrives with the event; the parent's fork() waits in the
 * kernel until we have read the event, so nothing of the child runs yet. */
static int handle_fork(hm_loop *l, struct task *parent, struct uffd_msg *msg)
{
	uint64_t key = l->next_fork_key++, i;
	struct task *child = NULL;
	hm_ranges *owed;
	int rc;

	l->st.events_fork++;
	rc = hm_store_clone_task(l->store, parent->key, key);
	if (!rc)
		rc = hm_ranges_new(&owed);
	if (rc) {
		close((int)msg->arg.fork.ufd);
		return rc;
	}
	rc = hm_ranges_copy(parent->owed, owed);
	if (!rc && !(child = new_task(l, (int)msg->arg.fork.ufd, key, parent->pid, owed)))
		rc = -ENOMEM;
	if (rc) {
		close((int)msg->arg.fork.ufd);
		hm_ranges_free(owed);
		return rc;
	}
	for (i = 0; !rc && i < parent->nremaps; i++)
		rc = add_remap(child, parent->remaps[i].from, parent->remaps[i].to, parent->remaps[i].len);
	return rc;
}

/* mremap moved pages: what was owed at `from` is now owed at `to`. */
static int handle_remap(hm_loop *l, struct task *t, struct uffd_msg *msg)
{
	uint64_t from = msg->arg.remap.from, to = msg->arg.remap.to, len = msg->arg.remap.len;
	int rc;

	l->st.events_remap++;
	rc = hm_store_move(l->store, t->key, from, to, len / PAGE_SZ);
	if (!rc)
		rc = hm_ranges_move(t->owed, from, to, len);
	return rc ?: add_remap(t, from, to, len);
}

/*
 * munmap (UNMAP) or MADV_DONTNEED/REMOVE (REMOVE) of [start, end). For
 * REMOVE the kernel waits, before it zaps, for us to read the event; UNMAP
 * comes after the unmap. In both cases mmap_changing is raised meanwhile, so
 * an install racing with them fails with EAGAIN and is retried only after
 * this event is read: once the range is off the owed list no old data can go
 * in there, and a later fault in it gets a zero page, as it would have
 * without lazy restore. Threads queued on the range are woken to retry.
 */
static int handle_remove(hm_loop *l, struct task *t, struct uffd_msg *msg)
{
	uint64_t start = msg->arg.remove.start, end = msg->arg.remove.end;
	uint64_t i, kept = 0;
	int rc;

	if (msg->event == UFFD_EVENT_REMOVE)
		l->st.events_remove++;
	else
		l->st.events_unmap++;
	rc = hm_ranges_remove(t->owed, start, end);
	if (rc)
		return rc;
	for (i = 0; i < t->nwaiting; i++)
		if (t->waiting[i].addr < start || t->waiting[i].addr >= end)
			t->waiting[kept++] = t->waiting[i];
	if (kept != t->nwaiting)
		wake(t, start, end - start);
	t->nwaiting = kept;
	return hm_store_invalidate(l->store, t->key, start, (end - start) / PAGE_SZ);
}

static int handle_pagefault(hm_loop *l, struct task *t, struct uffd_msg *msg, uint64_t read_ns)
{
	l->st.faults++;
	l->last_fault_ns = read_ns;
	return serve_fault(l, t, msg->arg.pagefault.address & ~(PAGE_SZ - 1), read_ns);
}

static int handle_uffd(hm_loop *l, struct task *t)
{
	struct uffd_msg msgs[32];
	int rc = 0;

	while (!rc) {
		ssize_t n = read(t->uffd, msgs, sizeof(msgs));
		uint64_t read_ns = now_ns();
		size_t i;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			break;
		if (n < 0)
			return -errno;
		if (n == 0)
			break;
		t->blocked = 0;
		for (i = 0; !rc && i < n / sizeof(msgs[0]); i++) {
			struct uffd_msg *m = &msgs[i];

			switch (m->event) {
			case UFFD_EVENT_PAGEFAULT:
				rc = handle_pagefault(l, t, m, read_ns);
				break;
			case UFFD_EVENT_FORK:
				rc = handle_fork(l, t, m);
				break;
			case UFFD_EVENT_REMAP:
				rc = handle_remap(l, t, m);
				break;
			case UFFD_EVENT_REMOVE:
			case UFFD_EVENT_UNMAP:
				rc = handle_remove(l, t, m);
				break;
			default:
				rc = -EPROTO;
			}
		}
	}
	if (!rc && !t->blocked && t->nwaiting)
		retry_waiting(l, t);
	return rc;
}

/* --- eager install -------------------------------------------------------- */

/* One batch from task t, starting at its cursor; 1 if something went in. */
static int eager_from(hm_loop *l, struct task *t, uint64_t from)
{
	uint64_t start, end, done;

	uint64_t batch = now_ns() - l->last_fault_ns < BUSY_NS ? BATCH_BUSY : BATCH_QUIET;

	while (!t->exited && !t->blocked && hm_ranges_next(t->owed, from, &start, &end)) {
		switch (install(l, t, start, batch, 0, &done)) {
		case INSTALLED:
			t->cursor = start + done * PAGE_SZ;
			return 1;
		case ABSENT: {
			/* skip the absent run: it waits for its data */
			uint64_t npages;
			const uint8_t *data;
			store_task_lock(t->st);
			store_run(t->st, start, (end - start) / PAGE_SZ, &npages, &data);
			store_task_unlock(t->st);
			if (!t->first_absent)
				t->first_absent = start, t->first_absent_pages = npages;
			from = start + npages * PAGE_SZ;
			break;
		}
		case BLOCKED:
		case GONE:
			return 0;
		}
	}
	return 0;
}

static int install_batch(hm_loop *l)
{
	struct task *t;

	if (l->hint_task && !l->hint_task->exited) {
		uint64_t start, end;
		if (hm_ranges_next(l->hint_task->owed, l->hint_addr, &start, &end) &&
		    start - l->hint_addr < NEIGHBOURHOOD && eager_from(l, l->hint_task, start)) {
			l->hint_addr = l->hint_task->cursor;
			return 1;
		}
		l->hint_task = NULL;
	}
	for (t = l->tasks; t; t = t->next) {
		if (eager_from(l, t, t->cursor) || eager_from(l, t, 0))
			return 1;
	}
	/* Nothing to install until data arrives. After 100 ms of that, ask for
	 * each task's first absent run: a forked child's pages, or pages mremap
	 * moved, come only when asked. (Asking on every idle pass would race the
	 * fetcher, which brings the rest in order anyway, and slow it down.) */
	for (t = l->tasks; t; t = t->next) {
		if (l->ask_absent && t->first_absent && !t->exited)
			ask_for(l, t, t->first_absent, t->first_absent_pages);
		t->first_absent = 0;
	}
	l->ask_absent = 0;
	return 0;
}

static int all_done(hm_loop *l)
{
	struct task *t;

	if (!l->eager)
		return 0;
	for (t = l->tasks; t; t = t->next)
		if (!t->exited && (hm_ranges_count(t->owed) || t->nwaiting))
			return 0;
	return 1;
}

static int any_blocked(hm_loop *l)
{
	struct task *t;

	for (t = l->tasks; t; t = t->next)
		if (t->blocked && !t->exited)
			return 1;
	return 0;
}

static void *loop_main(void *arg)
{
	hm_loop *l = arg;
	struct epoll_event evs[64];

	pthread_mutex_lock(&l->lock);
	while (!l->stop && !l->st.error) {
		/* Sleep only when there is nothing to install; while the kernel
		 * holds an install back (EAGAIN) poll briefly for its events; idle
		 * with pages still owed (their data asked for), look again now and
		 * then, in case an ask was lost to a full pipe. */
		int timeout = (l->eager && !l->idle) ? 0 : any_blocked(l) ? 1 : (l->eager && !l->done) ? 100 : -1;
		int n, i;

		pthread_mutex_unlock(&l->lock);
		n = epoll_wait(l->epfd, evs, 64, timeout);
		pthread_mutex_lock(&l->lock);
		if (n < 0 && errno != EINTR) {
			l->st.error = -errno;
			break;
		}
		for (i = 0; i < n; i++) {
			struct task *t = evs[i].data.ptr;
			int rc;

			if (!t) {
				uint64_t v;
				if (read(l->ctlfd, &v, sizeof(v)) < 0) {
				}
				l->idle = 0;
				for (t = l->tasks; t; t = t->next)
					if (t->nwaiting && !t->exited)
						retry_waiting(l, t);
				continue;
			}
			rc = handle_uffd(l, t);
			if (rc) {
				l->st.error = rc;
				break;
			}
			l->idle = 0;
		}
		if (n == 0 && timeout == 100)
			l->idle = 0, l->ask_absent = 1;
		/* EAGAIN: mmap_changing is raised while an event waits to be read,
		 * on this uffd or another (a fork holds the parent's). Retry after
		 * the pause, and on every eager turn: a fault held back must not
		 * wait behind the whole eager install. */
		if (timeout == 0 || timeout == 1)
			for (struct task *t = l->tasks; t; t = t->next) {
				if (!t->blocked)
					continue;
				t->blocked = 0;
				if (t->nwaiting && !t->exited)
					retry_waiting(l, t);
			}
		if (l->eager && !l->idle && !l->st.error)
			l->idle = !install_batch(l);
		if (!l->done && all_done(l)) {
			l->done = 1;
			l->st.done_ns = now_ns();
		}
		if (l->done || l->st.error)
			pthread_cond_broadcast(&l->cond);
	}
	pthread_cond_broadcast(&l->cond);
	pthread_mutex_unlock(&l->lock);
	return NULL;
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
	int pipefd[2], rc = 0;

	if (!l)
		return -ENOMEM;
	l->store = store;
	l->next_fork_key = FORK_KEY_BASE;
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
	pthread_mutex_init(&l->lock, NULL);
	pthread_cond_init(&l->cond, NULL);
	if (rc) {
		hm_loop_free(l);
		return rc;
	}
	*out = l;
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

int hm_loop_start(hm_loop *l)
{
	int rc;

	if (l->started)
		return -EALREADY;
	rc = -pthread_create(&l->thread, NULL, loop_main, l);
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
	pthread_mutex_unlock(&l->lock);
	kick(l);
	return 0;
}

int hm_loop_notify(hm_loop *l)
{
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
	pthread_mutex_lock(&l->lock);
	l->stop = 1;
	pthread_mutex_unlock(&l->lock);
	kick(l);
	pthread_join(l->thread, NULL);
	l->started = 0;
	return 0;
}

void hm_loop_get_stats(hm_loop *l, struct hm_loop_stats *out)
{
	struct task *t;

	pthread_mutex_lock(&l->lock);
	*out = l->st;
	out->pages_owed = 0;
	out->pages_waiting = 0;
	for (t = l->tasks; t; t = t->next) {
		out->pages_owed += hm_ranges_total(t->owed) / PAGE_SZ;
		out->pages_waiting += t->nwaiting;
	}
	out->lat_p50_ns = lat_percentile(l, 0.50);
	out->lat_p99_ns = lat_percentile(l, 0.99);
	pthread_mutex_unlock(&l->lock);
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
	pthread_cond_destroy(&l->cond);
	pthread_mutex_destroy(&l->lock);
	free(l);
}
