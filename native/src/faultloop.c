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
 * The one rule that ties the threads together (the "gate", see gate_close):
 * the fault thread reads or serves a task only while no installer copy into
 * that task is in flight, and installers start no copy into a task while the
 * fault thread has it. The reasons are kernel races, explained there.
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
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
/* Installer batch, pages per ioctl: a fault on a task waits for the
 * installer ioctls in flight into it (the gate), so a batch is what a fault
 * may wait for. 8 pages take ~11 us to copy here (~1.3 us a page, most of it
 * the target's page allocation), 16 ~24 us; with the claim's locking paid
 * once per CLAIM_PAGES, 8 installed 4 GiB as fast as 16 (1.21-1.23 s
 * against 1.27-1.28 s, one run each) and halved the gate's p50 and p90. */
#define BATCH_PAGES_DEFAULT 8
#define INSTALLERS_DEFAULT 2
#define INSTALLERS_MAX 8
/* An installer with nothing to install looks again after this long: to ask
 * for pages whose data has not come, and to retry tasks held back by EAGAIN. */
#define IDLE_ASK_MS 100
#define BLOCKED_RETRY_MS 1
/* At the gate, the fault thread spins this long before it sleeps. */
#define GATE_SPIN_NS 40000
#define LOCK_SPIN_NS 20000
/* An installer claims up to this many pages at once (or batch_pages if
 * more) and copies them one ioctl of batch_pages at a time, stopping early
 * when a fault comes: a fault still waits for one batch at most, and the
 * claim's locking is paid once. */
#define CLAIM_PAGES 64
#define LAT_BUCKETS HM_HIST_BUCKETS

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
	hm_ranges *owed; /* owed, and not claimed by an installer copy in flight */
	int exited;
	int blocked;      /* EAGAIN: the kernel has events for us to read first */
	unsigned copying; /* installer copies in flight into this task */
	int gated;        /* the fault thread has the task: no new copies */
	int install_seen; /* copies were in flight when the fault thread came */
	/* Where each installer goes on in this task. They start apart, at
	 * equal shares of the owed pages: two installers copying next to each
	 * other take turns at the same page table's lock (PTE spinlock
	 * contention was 7 % of their time). */
	uint64_t cursor[INSTALLERS_MAX];
	int cursors_set;
	uint64_t first_absent, first_absent_pages; /* seen by an idle pass */
	struct waiting *waiting;
	uint64_t nwaiting, capwaiting;
	struct remap *remaps;
	uint64_t nremaps;
	struct task *next;
};

/* A run of pages an installer copies with the loop lock dropped. */
struct claim {
	struct task *t;
	int installer;
	uint64_t addr, npages;
	const uint8_t *data; /* NULL: zero pages */
};

struct hm_loop {
	hm_store *store;
	int epfd, ctlfd, miss_rd, miss_wr;
	pthread_t fault_thread;
	struct installer {
		hm_loop *l;
		pthread_t thread;
		/* Held (priority inheritance) from a claim to its settling; the
		 * fault thread waiting at the gate locks it too, which lends the
		 * installer its real-time priority until the claim is settled.
		 * Lock order: loop lock, then copy lock at a claim; copy lock,
		 * then loop lock at settling: no cycle, as the fault thread holds
		 * nothing else while it waits for a copy lock. */
		pthread_mutex_t copy_lock;
		struct task *copying; /* the task copied into, under lock */
		int cpu; /* where it last started a copy (stats: same CPU as the fault thread?) */
	} installers[INSTALLERS_MAX];
	int ninstallers, batch_pages;
	int started;

	/* Everything below is guarded by lock. The fault thread drops it only
	 * in epoll_wait and at the gate; installers while they copy and wait. */
	pthread_mutex_t lock;
	pthread_cond_t cond;   /* done or error: hm_loop_wait */
	pthread_cond_t work;   /* installers: there may be something to install */
	struct task *tasks;
	uint64_t next_fork_key;
	int eager, stop, done;
	unsigned inflight; /* installer copies in flight, all tasks */
	struct task *hint_task;
	uint64_t hint_addr;
	uint64_t gate_ns; /* the fault thread's wait at the gate for its last read */
	struct hm_loop_stats st;
	/* HM_HIST_*: where a fault's time goes, and the installers' copies */
	uint64_t hist[HM_HIST_COUNT][LAT_BUCKETS];
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

static void hist_add(hm_loop *l, int which, uint64_t ns)
{
	l->hist[which][lat_bucket(ns)]++;
}

static void record_latency(hm_loop *l, uint64_t since_ns)
{
	uint64_t ns = now_ns() - since_ns;

	hist_add(l, HM_HIST_LATENCY, ns);
	if (ns > l->st.lat_max_ns)
		l->st.lat_max_ns = ns;
}

static uint64_t lat_percentile(const hm_loop *l, double p)
{
	const uint64_t *h = l->hist[HM_HIST_LATENCY];
	uint64_t total = 0, seen = 0;
	unsigned b;

	for (b = 0; b < LAT_BUCKETS; b++)
		total += h[b];
	if (!total)
		return 0;
	for (b = 0; b < LAT_BUCKETS; b++) {
		seen += h[b];
		if (seen >= p * total)
			return lat_bucket_value(b);
	}
	return l->st.lat_max_ns;
}

/* --- the gate between the fault thread and the installers --------------- */

/*
 * The fault thread takes task t: it waits until no installer copy into t is
 * in flight, and no installer starts one until gate_open. Called with the
 * loop lock held; returns with it held.
 *
 * Why the fault thread must not read t's uffd while an installer copy into t
 * may be *starting*. What the kernel does (Linux 6.18; mm/userfaultfd.c
 * mfill_atomic, fs/userfaultfd.c userfaultfd_remove and
 * userfaultfd_event_wait_completion):
 *
 * - UFFDIO_COPY/ZEROPAGE (mfill_atomic) takes the target VMA's lock, then
 *   ctx->map_changing_lock for read, and fails with EAGAIN if
 *   ctx->mmap_changing is raised. It holds map_changing_lock for read until
 *   the whole range is done. It checks again only if it had to drop its
 *   locks to fault in its source page (the ENOENT retry), which the
 *   populated store avoids, and which re-checks anyway.
 * - MADV_DONTNEED (userfaultfd_remove) takes map_changing_lock for write,
 *   raises mmap_changing, drops the lock, queues UFFD_EVENT_REMOVE, and
 *   sleeps until a read() of the uffd dequeues the event; then it lowers
 *   mmap_changing, takes the mm lock again and zaps the range.
 *   munmap (UNMAP), mremap (REMAP) and fork (FORK) raise it the same way
 *   (under the mm write lock, before changing anything) and lower it once
 *   their event is read.
 *
 * So a copy whose check ran before the raise holds map_changing_lock and
 * has finished before the event is even queued: it landed before the zap,
 * which removes it. A copy whose check runs between the raise and our read
 * fails with EAGAIN. Both are safe. The copy that can land stale is one
 * whose check runs *after our read* (mmap_changing is lowered again) with
 * a range claimed before we took the event's range off the owed list: if it
 * lands after the zap, the process reads old data where MADV_DONTNEED
 * promised zeros; for REMAP it writes the old contents of `to` into pages
 * moved there; for FORK, a copy into the parent that failed with EAGAIN, or
 * landed after the fork, is missing in the child, whose owed list was made
 * without the claimed pages. Which copies those are cannot be narrowed from
 * user space:
 *
 * - the event is only known once read, and reading it is what releases the
 *   kernel: the uffd's poll and fdinfo do not tell a fault from an event,
 *   and read() returns events only when no fault is pending;
 * - an installer between its claim and the kernel's check may be preempted
 *   for any time, in user space or on its way in (uffd_mfill_lock may
 *   sleep); a flag it sets before its ioctl says nothing about where the
 *   check is, and from outside a thread inside the ioctl cannot be told
 *   from one about to enter it.
 *
 * Hence the gate, closed around every read of a uffd: the fault thread
 * reads t only once every claim of t is settled, and no claim of t is made
 * until it has processed what it read. Waiting for the copies in flight
 * (not only forbidding new ones) is the only way to know that none of them
 * is between its claim and its check. The gate stays cheap by keeping what
 * a fault waits for short: one ioctl of batch_pages per installer (claims
 * of CLAIM_PAGES stop between ioctls when the gate closes, copy_claim), the
 * installers pinned one per CPU (pin_installer) so that the one the fault
 * thread preempted is known and handed the CPU at once, and a spin for the
 * one running elsewhere.
 *
 * The gate also keeps the fault thread from answering a fault with a zero
 * page while the page is claimed (off the owed list) but not yet copied:
 * once the gate is closed every claim of t is settled, installed or owed
 * again.
 *
 * The price: a fault waits for at most one installer ioctl per installer.
 */

/* The fault thread takes the loop lock, which installers hold for a
 * microsecond or two at a time: spinning on it costs less than sleeping on
 * it and being woken from another vCPU (50-200 us here). */
static void lock_spinning(hm_loop *l)
{
	uint64_t until = now_ns() + LOCK_SPIN_NS;

	while (pthread_mutex_trylock(&l->lock))
		if (now_ns() > until) {
			pthread_mutex_lock(&l->lock);
			return;
		}
}

/* The first installer with a copy into t in flight, and last seen on `cpu`
 * unless cpu < 0; -1 if none. Loop lock held. */
static int copier(hm_loop *l, struct task *t, int cpu)
{
	int i;

	for (i = 0; i < l->ninstallers; i++)
		if (l->installers[i].copying == t && (cpu < 0 || __atomic_load_n(&l->installers[i].cpu, __ATOMIC_RELAXED) == cpu))
			return i;
	return -1;
}

/* Wait for installer i to settle its claim, lending it our real-time
 * priority: it holds its copy lock, a priority-inheritance mutex, from the
 * claim to its settling, so locking it runs the installer at once if it was
 * preempted, instead of when its time slice comes round again (a condition
 * variable left faults waiting for milliseconds on a busy machine). */
static void wait_copier(hm_loop *l, int i)
{
	pthread_mutex_unlock(&l->lock);
	pthread_mutex_lock(&l->installers[i].copy_lock);
	pthread_mutex_unlock(&l->installers[i].copy_lock);
	lock_spinning(l);
}

static void gate_close(hm_loop *l, struct task *t)
{
	int i, cpu;

	__atomic_store_n(&t->gated, 1, __ATOMIC_RELEASE);
	if (!t->copying)
		return;
	l->st.gate_waits++;
	/* Installers last seen on our CPU: we woke there and most likely
	 * preempted one of them half-way through its copy; it cannot finish
	 * while we spin (we run SCHED_FIFO), so hand it the CPU at once: its
	 * unlock then wakes us on this same CPU, which stayed busy and costs
	 * no cross-CPU wake-up. Measured before the installers were pinned
	 * and handed the CPU: 30 % of the gate waits at 4 GiB outlasted the
	 * 40 us spin, then slept, and took 100-400 us in all. */
	cpu = sched_getcpu();
	while ((i = copier(l, t, cpu)) >= 0) {
		l->st.gate_same_cpu++;
		wait_copier(l, i);
	}
	/* The others run elsewhere: spin, the lock dropped, for about one
	 * batch's copy; on this kind of VM a blocking hand-off costs a
	 * cross-CPU wake-up, an IPI and often a halted vCPU brought back:
	 * 50-200 us, several times a copy of 8 pages. */
	if (t->copying) {
		uint64_t until = now_ns() + GATE_SPIN_NS;

		pthread_mutex_unlock(&l->lock);
		while (__atomic_load_n(&t->copying, __ATOMIC_ACQUIRE) && now_ns() < until)
			cpu_relax();
		lock_spinning(l);
	}
	/* Preempted elsewhere, or slow: sleep on them. */
	while ((i = copier(l, t, -1)) >= 0) {
		l->st.gate_slept++;
		wait_copier(l, i);
	}
}

static void gate_open(hm_loop *l, struct task *t)
{
	__atomic_store_n(&t->gated, 0, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&l->work);
}

/* --- installing pages ---------------------------------------------------- */

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
static void wake(struct task *t, uint64_t addr, uint64_t len)
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

static void count_installed(hm_loop *l, int kind, uint64_t installed, int faulted)
{
	if (kind == HM_PAGE_ZERO) {
		l->st.pages_zero += installed;
	} else if (installed) {
		l->st.bytes_copied += installed * PAGE_SZ;
		l->st.pages_fault += faulted ? 1 : 0;
		l->st.pages_prefetch += faulted ? installed - 1 : installed;
	}
}

enum install_result {
	INSTALLED,   /* some pages went in (or turned out to be there already) */
	ABSENT,      /* owed, but the store does not hold the data yet */
	BLOCKED,     /* the kernel wants its events read first (EAGAIN) */
	GONE,        /* the task exited, or a fatal error (l->st.error) */
};

/* A fatal error ends the loop: the first one is kept, with what failed
 * (HM_LOOP_OP_*), for which task and where, for the caller to report. */
static void loop_fail(hm_loop *l, int op, const struct task *t, uint64_t addr, int64_t err)
{
	if (l->st.error)
		return;
	l->st.error = err;
	l->st.error_op = op;
	l->st.error_pid = t ? t->pid : 0;
	l->st.error_addr = addr;
}

/* What a failed fill (a copy of data, or of zeros) at addr means for the task. */
static enum install_result fill_failed(hm_loop *l, struct task *t, uint64_t addr, const uint8_t *data, int64_t n)
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

/*
 * The fault thread installs up to max_pages owed pages of t from addr on,
 * with the gate of t closed: no installer copies into t meanwhile, nor
 * touches its owed list, so the loop lock is dropped for the copy (an
 * installer blocked on it would sleep, and waking it costs a cross-CPU
 * wake-up, 50-200 us here, at every fault). The store's task lock is held
 * across the copy (a few pages) so that the fetcher cannot replace them
 * half-way; it is taken inside the loop lock and released before the loop
 * lock is taken again, the installers' order.
 */
static enum install_result install_faulted(hm_loop *l, struct task *t, uint64_t addr, uint64_t max_pages,
					   int faulted)
{
	uint64_t start, end, npages, installed, copy_ns;
	struct store_garbage g = { .n = 0 };
	const uint8_t *data;
	int64_t n;
	int kind;

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
	pthread_mutex_unlock(&l->lock);
	copy_ns = now_ns();
	n = fill(t, addr, npages, data, &installed);
	copy_ns = now_ns() - copy_ns;
	if (n > 0)
		store_release(t->st, addr, n, &g);
	store_task_unlock(t->st);
	store_garbage_free(&g);
	lock_spinning(l);
	if (n < 0)
		return fill_failed(l, t, addr, data, n);
	if (faulted)
		hist_add(l, HM_HIST_FAULT_COPY, copy_ns);
	hm_ranges_remove(t->owed, addr, addr + n * PAGE_SZ);
	count_installed(l, kind, installed, faulted);
	return INSTALLED;
}

/* A fault outside what is owed: the page was never lazy, or was dropped. */
static enum install_result install_zero(hm_loop *l, struct task *t, uint64_t addr)
{
	uint64_t installed;
	int64_t n;

	pthread_mutex_unlock(&l->lock); /* the gate is closed: as install_faulted */
	n = fill(t, addr, 1, NULL, &installed);
	lock_spinning(l);
	if (n < 0)
		return fill_failed(l, t, addr, NULL, n);
	l->st.pages_zero += installed;
	return INSTALLED;
}

/* Ask the fetcher for pages the store lacks. A full pipe only loses a hint:
 * the fetcher fetches every task's pages anyway, and idle installers ask
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

/* Serve one faulted page (gate closed), or queue it until it can be: 0, or
 * -errno. */
static int serve_fault(hm_loop *l, struct task *t, uint64_t addr, uint64_t since_ns)
{
	enum install_result r;
	int rc;

	if (hm_ranges_contains(t->owed, addr))
		r = install_faulted(l, t, addr, 1, 1);
	else
		r = install_zero(l, t, addr);

	switch (r) {
	case INSTALLED:
		record_latency(l, since_ns);
		/* The faulted page alone first: its copy wakes the thread at once;
		 * the pages after it follow, as likely next (a copy of all of
		 * them at once would wake it only at the end). */
		if (FAULT_AROUND_PAGES > 1 && hm_ranges_contains(t->owed, addr + PAGE_SZ))
			install_faulted(l, t, addr + PAGE_SZ, FAULT_AROUND_PAGES - 1, 0);
		l->hint_task = t;
		l->hint_addr = addr;
		return 0;
	case GONE:
		return (int)l->st.error;
	case ABSENT:
		/* asked for once, when first queued: retries must not flood the pipe */
		rc = add_waiting(t, addr, since_ns);
		if (rc == 1) {
			l->st.faults_absent++;
			ask_for(l, t, addr, FAULT_AROUND_PAGES);
		}
		return rc < 0 ? rc : 0;
	case BLOCKED:
		rc = add_waiting(t, addr, since_ns);
		l->st.faults_blocked += rc == 1;
		return rc < 0 ? rc : 0;
	}
	return 0;
}

/* Serve the queued faults again (gate closed); those still unservable queue
 * up anew. */
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

/* --- uffd events (fault thread, gate closed) ------------------------------ */

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
	pthread_cond_broadcast(&l->work);
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
 * kernel until we have read the event, so nothing of the child runs yet. The
 * parent's gate is closed: none of its pages is claimed, so "owed" is all
 * the parent still lacks, and the store holds all of it that has come. */
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

/* mremap moved pages: what was owed at `from` is now owed at `to`. The
 * kernel moved the page tables before it sent the event, and an installer
 * copy into `from` that starts now finds no registered VMA there (ENOENT):
 * only the bookkeeping follows. */
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
 * a fault-thread install racing with them fails with EAGAIN and is retried
 * only after this event is read; installers are kept out by the gate (see
 * gate_close). Once the range is off the owed list no old data can go in
 * there, and a later fault in it gets a zero page, as it would have without
 * lazy restore. Threads queued on the range are woken to retry.
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

static int handle_pagefault(hm_loop *l, struct task *t, struct uffd_msg *msg, uint64_t since_ns)
{
	l->st.faults++;
	hist_add(l, HM_HIST_GATE, l->gate_ns);
	l->st.faults_during_install += l->eager && t->install_seen;
	return serve_fault(l, t, msg->arg.pagefault.address & ~(PAGE_SZ - 1), since_ns);
}

/* Read and serve everything pending on t's uffd. since_ns: when the fault
 * thread woke for it, the start of every fault's latency. */
/* What a failed event's handling is reported as (loop_fail). */
static int event_op(uint8_t event)
{
	switch (event) {
	case UFFD_EVENT_PAGEFAULT:
		return HM_LOOP_OP_FAULT;
	case UFFD_EVENT_FORK:
		return HM_LOOP_OP_FORK;
	case UFFD_EVENT_REMAP:
		return HM_LOOP_OP_REMAP;
	case UFFD_EVENT_REMOVE:
	case UFFD_EVENT_UNMAP:
		return HM_LOOP_OP_REMOVE;
	default:
		return HM_LOOP_OP_READ;
	}
}

static uint64_t event_addr(const struct uffd_msg *m)
{
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		return m->arg.pagefault.address;
	case UFFD_EVENT_REMAP:
		return m->arg.remap.from;
	case UFFD_EVENT_REMOVE:
	case UFFD_EVENT_UNMAP:
		return m->arg.remove.start;
	default:
		return 0;
	}
}

static int handle_uffd(hm_loop *l, struct task *t, uint64_t since_ns)
{
	struct uffd_msg msgs[32];
	int rc = 0;

	t->install_seen = t->copying > 0;
	l->gate_ns = now_ns();
	gate_close(l, t);
	l->gate_ns = now_ns() - l->gate_ns;
	while (!rc) {
		ssize_t n = read(t->uffd, msgs, sizeof(msgs));
		size_t i;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			break;
		if (n < 0) {
			rc = -errno;
			loop_fail(l, HM_LOOP_OP_READ, t, 0, rc);
			break;
		}
		if (n == 0)
			break;
		t->blocked = 0;
		for (i = 0; !rc && i < n / sizeof(msgs[0]); i++) {
			struct uffd_msg *m = &msgs[i];

			/* (not "copies in flight" as for faults: while an event is
			 * pending, copies into the task fail with EAGAIN) */
			l->st.events_during_install += m->event != UFFD_EVENT_PAGEFAULT && l->eager && !l->done;
			switch (m->event) {
			case UFFD_EVENT_PAGEFAULT:
				rc = handle_pagefault(l, t, m, since_ns);
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
			if (rc)
				loop_fail(l, event_op(m->event), t, event_addr(m), rc);
		}
	}
	if (!rc && !t->blocked && t->nwaiting)
		retry_waiting(l, t);
	gate_open(l, t);
	return rc;
}

/* --- done ------------------------------------------------------------------ */

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

static void check_done(hm_loop *l)
{
	if (!l->done && all_done(l)) {
		l->done = 1;
		l->st.done_ns = now_ns();
	}
	if (l->done || l->st.error)
		pthread_cond_broadcast(&l->cond);
}

/* --- eager install (installer threads) ------------------------------------ */

/* Claim the next run of t from `from` on: taken off the owed list, to be
 * copied with the loop lock dropped. 1 if claimed. Runs whose data has not
 * come are skipped (the first is remembered, to be asked for when idle). */
static int claim_from(hm_loop *l, struct task *t, uint64_t from, int k, struct claim *c)
{
	uint64_t start, end, npages;
	const uint8_t *data;
	int kind;

	while (hm_ranges_next(t->owed, from, &start, &end)) {
		store_task_lock(t->st);
		kind = store_run(t->st, start, MIN((uint64_t)MAX(l->batch_pages, CLAIM_PAGES), (end - start) / PAGE_SZ),
				 &npages, &data);
		store_task_unlock(t->st);
		if (kind == HM_PAGE_ABSENT) {
			if (!t->first_absent)
				t->first_absent = start, t->first_absent_pages = npages;
			from = start + npages * PAGE_SZ;
			continue;
		}
		/* The data stays where it is until we release it: the store unmaps
		 * a chunk only once none of its pages holds data, and only the
		 * fault thread (behind the gate) invalidates or moves pages. */
		hm_ranges_remove(t->owed, start, start + npages * PAGE_SZ);
		*c = (struct claim){ t, k, start, npages, data };
		t->cursor[k] = start + npages * PAGE_SZ;
		return 1;
	}
	return 0;
}

static int installable(const struct task *t)
{
	return !t->exited && !t->blocked && !t->gated;
}

/* Installer k of n starts at the k/n share of the task's owed pages. */
static void set_cursors(hm_loop *l, struct task *t)
{
	uint64_t total = hm_ranges_total(t->owed), seen = 0, i, start, end;
	int k = 1;

	t->cursors_set = 1;
	for (i = 0; k < l->ninstallers && hm_ranges_get(t->owed, i, &start, &end) == 0; i++) {
		while (k < l->ninstallers && seen + (end - start) > total / l->ninstallers * k) {
			t->cursor[k] = start + (total / l->ninstallers * k - seen) / PAGE_SZ * PAGE_SZ;
			k++;
		}
		seen += end - start;
	}
}

/* The installer other than k about to claim at addr in t (its cursor less
 * than a chunk before it), or -1. */
static int next_to(hm_loop *l, struct task *t, int k, uint64_t addr)
{
	int j;

	for (j = 0; j < l->ninstallers; j++)
		if (j != k && addr >= t->cursor[j] && addr - t->cursor[j] < CHUNK_SZ)
			return j;
	return -1;
}

/*
 * Where installer k claims next in t, looking from `from` on. Installers
 * meet: one whose cursor runs into pages another has installed skips them
 * and lands just ahead of it, and the two then take turns, claim by claim,
 * in the same page tables. The one that would land there goes to the
 * middle of what lies ahead of the other instead, chunk-aligned, if that
 * leaves each at least two chunks.
 */
static uint64_t apart(hm_loop *l, struct task *t, int k, uint64_t from)
{
	uint64_t start, end, limit, mid;
	int i, j;

	if (!hm_ranges_next(t->owed, from, &start, &end) || (j = next_to(l, t, k, start)) < 0)
		return from;
	hm_ranges_get(t->owed, hm_ranges_count(t->owed) - 1, &start, &limit);
	for (i = 0; i < l->ninstallers; i++)
		if (i != k && t->cursor[i] > t->cursor[j] && t->cursor[i] < limit)
			limit = t->cursor[i];
	mid = CHUNK_BASE(t->cursor[j] + (limit - t->cursor[j]) / 2);
	return mid >= t->cursor[j] + 2 * CHUNK_SZ ? mid : from;
}

/* Pick the next batch for installer k: installer 0 near the last fault
 * first (unless another installer is at it already), then each from its
 * own cursor, task by task in address order. */
static int claim_next(hm_loop *l, int k, struct claim *c)
{
	struct task *t;

	if (k == 0 && l->hint_task && installable(l->hint_task)) {
		uint64_t start, end;
		if (hm_ranges_next(l->hint_task->owed, l->hint_addr, &start, &end) &&
		    start - l->hint_addr < NEIGHBOURHOOD && next_to(l, l->hint_task, k, start) < 0 &&
		    claim_from(l, l->hint_task, start, k, c)) {
			l->hint_addr = c->addr + c->npages * PAGE_SZ;
			return 1;
		}
		l->hint_task = NULL;
	}
	for (t = l->tasks; t; t = t->next) {
		if (!installable(t))
			continue;
		if (!t->cursors_set)
			set_cursors(l, t);
		if (claim_from(l, t, apart(l, t, k, t->cursor[k]), k, c) || claim_from(l, t, apart(l, t, k, 0), k, c))
			return 1;
	}
	return 0;
}

/* A claimed copy ended: the pages it did not install are owed again. */
static void settle(hm_loop *l, struct claim *c, int64_t n, uint64_t installed, struct store_garbage *g)
{
	struct task *t = c->t;
	uint64_t done = n > 0 ? (uint64_t)n : 0;

	if (done) {
		store_task_lock(t->st);
		store_release(t->st, c->addr, done, g);
		store_task_unlock(t->st);
		count_installed(l, c->data ? HM_PAGE_DATA : HM_PAGE_ZERO, installed, 0);
	}
	if (n < 0)
		fill_failed(l, t, c->addr + done * PAGE_SZ, c->data, n);
	if (t->exited && done < c->npages) {
		/* task_exited released what was owed, not what we held */
		store_task_lock(t->st);
		store_release(t->st, c->addr + done * PAGE_SZ, c->npages - done, g);
		store_task_unlock(t->st);
	}
	if (done < c->npages && !t->exited && hm_ranges_add(t->owed, c->addr + done * PAGE_SZ,
							   c->addr + c->npages * PAGE_SZ))
		loop_fail(l, HM_LOOP_OP_SETTLE, t, c->addr + done * PAGE_SZ, -ENOMEM);
	if (done < c->npages && t->cursor[c->installer] > c->addr + done * PAGE_SZ)
		t->cursor[c->installer] = c->addr + done * PAGE_SZ; /* the rest, owed again, next */
}

/* Nothing to install now: ask for absent data after IDLE_ASK_MS with
 * nothing to do (a forked child's pages, or pages mremap moved, come only
 * when asked; asking on every pass would race the fetcher, which brings the
 * rest in order anyway), and let tasks held back by EAGAIN try again. */
static void installer_idle(hm_loop *l)
{
	struct timespec ts;
	struct task *t;
	int blocked = 0, ms;

	for (t = l->tasks; t; t = t->next)
		blocked |= t->blocked && !t->exited;
	ms = blocked ? BLOCKED_RETRY_MS : IDLE_ASK_MS;
	clock_gettime(CLOCK_REALTIME, &ts);
	ts.tv_nsec += ms * 1000000L;
	ts.tv_sec += ts.tv_nsec / 1000000000L;
	ts.tv_nsec %= 1000000000L;
	if (pthread_cond_timedwait(&l->work, &l->lock, &ts) != ETIMEDOUT)
		return;
	for (t = l->tasks; t; t = t->next) {
		/* EAGAIN with no event of its own to read: the event was on
		 * another uffd (a fork holds its parent's mmap_changing) */
		t->blocked = 0;
		if (!blocked && l->eager && t->first_absent && !t->exited)
			ask_for(l, t, t->first_absent, t->first_absent_pages);
		t->first_absent = 0;
	}
}

/* Nothing to claim because the fault thread has the tasks with work: it
 * keeps them for tens of microseconds, and sleeping through that would cost
 * a cross-CPU wake-up (50-200 us here) per fault: spin instead, the lock
 * dropped. 1 if there was such a task. */
static int wait_gates(hm_loop *l)
{
	struct task *t, *gated = NULL;
	uint64_t until;

	for (t = l->tasks; t && !gated; t = t->next)
		if (t->gated && !t->exited && hm_ranges_count(t->owed))
			gated = t;
	if (!gated)
		return 0;
	until = now_ns() + GATE_SPIN_NS;
	pthread_mutex_unlock(&l->lock);
	while (__atomic_load_n(&gated->gated, __ATOMIC_ACQUIRE) && now_ns() < until)
		cpu_relax();
	pthread_mutex_lock(&l->lock);
	return 1;
}

/*
 * Copy claim c one batch (one ioctl of batch_pages) at a time, stopping
 * early once the fault thread waits at the gate of its task: the fault then
 * waits for one batch, not the whole claim. An installer that sees the gate
 * open and copies on is safe even if the fault thread closes it meanwhile:
 * the fault thread reads nothing until t->copying, which this claim holds,
 * drops to zero. Returns the pages dealt with (as fill, the whole claim),
 * or -errno if none; ns[] gets each ioctl's duration, *nb their number,
 * *cut 1 if the gate stopped the claim short.
 */
static int64_t copy_claim(hm_loop *l, struct installer *ins, const struct claim *c, uint64_t *installed,
			  uint64_t *ns, int *nb, int *cut)
{
	uint64_t done = 0;

	*installed = 0;
	*nb = *cut = 0;
	while (done < c->npages && *nb < CLAIM_PAGES) {
		uint64_t inst, t0;
		int64_t n;

		if (done && __atomic_load_n(&c->t->gated, __ATOMIC_ACQUIRE)) {
			*cut = 1;
			break;
		}
		__atomic_store_n(&ins->cpu, sched_getcpu(), __ATOMIC_RELAXED);
		t0 = now_ns();
		n = fill(c->t, c->addr + done * PAGE_SZ, MIN((uint64_t)l->batch_pages, c->npages - done),
			 c->data ? c->data + done * PAGE_SZ : NULL, &inst);
		ns[(*nb)++] = now_ns() - t0;
		if (n < 0)
			return done ? (int64_t)done : n; /* the rest is owed again, and fails anew */
		done += (uint64_t)n;
		*installed += inst;
	}
	return (int64_t)done;
}

/*
 * Installer k runs on the k-th CPU it may use, when there are as many CPUs
 * as installers: 1 if pinned. Left to the scheduler, the two installers
 * often shared one CPU while the restored workload and the fault thread
 * held the other; one of them then sat preempted half-way through a claim
 * for a time slice, and a fault waited for it at the gate (100-400 us, and
 * the SCHED_FIFO fault thread cannot tell which CPU that installer waits
 * on). Pinned, the installer a fault waits for is either running on the
 * other CPU, or preempted by the fault thread itself on this one, which
 * then hands it the CPU at once (gate_close).
 */
static int pin_installer(hm_loop *l, int k)
{
	cpu_set_t allowed, one;
	int cpu, seen = 0;

	if (sched_getaffinity(0, sizeof(allowed), &allowed) || CPU_COUNT(&allowed) < l->ninstallers)
		return 0;
	for (cpu = 0; cpu < CPU_SETSIZE; cpu++) {
		if (!CPU_ISSET(cpu, &allowed) || seen++ != k)
			continue;
		CPU_ZERO(&one);
		CPU_SET(cpu, &one);
		return sched_setaffinity(0, sizeof(one), &one) == 0;
	}
	return 0;
}

static void *installer_main(void *arg)
{
	struct installer *ins = arg;
	hm_loop *l = ins->l;
	struct store_garbage g = { .n = 0 };
	struct claim c;
	int pinned;

	pinned = pin_installer(l, (int)(ins - l->installers));
	pthread_mutex_lock(&l->lock);
	l->st.installers_pinned += pinned;
	while (!l->stop && !l->st.error) {
		uint64_t installed = 0, copy_ns[CLAIM_PAGES];
		int64_t n;
		int nb, i, cut;

		if (!l->eager || !claim_next(l, (int)(ins - l->installers), &c)) {
			check_done(l);
			if (wait_gates(l))
				continue;
			if (g.n) {
				/* idle: unmap what we released (not while a fault is
				 * served: the shootdown would interrupt it) */
				pthread_mutex_unlock(&l->lock);
				store_garbage_free(&g);
				pthread_mutex_lock(&l->lock);
				continue;
			}
			installer_idle(l);
			continue;
		}
		__atomic_add_fetch(&c.t->copying, 1, __ATOMIC_RELEASE);
		l->inflight++;
		ins->copying = c.t;
		__atomic_store_n(&ins->cpu, sched_getcpu(), __ATOMIC_RELAXED);
		/* taken before the loop lock is dropped: whoever sees
		 * ins->copying under the loop lock finds the copy lock held */
		pthread_mutex_lock(&ins->copy_lock);
		pthread_mutex_unlock(&l->lock);

		n = copy_claim(l, ins, &c, &installed, copy_ns, &nb, &cut);

		pthread_mutex_lock(&l->lock);
		l->st.claims_cut += cut;
		for (i = 0; i < nb; i++)
			hist_add(l, HM_HIST_INSTALLER_COPY, copy_ns[i]);
		ins->copying = NULL;
		settle(l, &c, n, installed, &g);
		__atomic_sub_fetch(&c.t->copying, 1, __ATOMIC_RELEASE);
		l->inflight--;
		check_done(l);
		/* the copy lock last: a fault thread woken by its unlock finds the
		 * loop lock free */
		pthread_mutex_unlock(&l->lock);
		pthread_mutex_unlock(&ins->copy_lock);
		if (!STORE_GARBAGE_ROOM(&g))
			store_garbage_free(&g);
		pthread_mutex_lock(&l->lock);
	}
	pthread_cond_broadcast(&l->cond);
	pthread_mutex_unlock(&l->lock);
	store_garbage_free(&g);
	return NULL;
}

/* --- the fault thread ------------------------------------------------------ */

static int any_blocked_waiting(hm_loop *l)
{
	struct task *t;

	for (t = l->tasks; t; t = t->next)
		if (t->blocked && t->nwaiting && !t->exited)
			return 1;
	return 0;
}

/* New data in the store (hm_loop_notify), or an EAGAIN's pause is over:
 * serve the faults queued on it. */
static void retry_all_waiting(hm_loop *l, int blocked_only)
{
	struct task *t;

	for (t = l->tasks; t; t = t->next) {
		if (!t->nwaiting || t->exited || (blocked_only && !t->blocked))
			continue;
		gate_close(l, t);
		t->blocked = 0;
		retry_waiting(l, t);
		gate_open(l, t);
	}
}

/*
 * The fault thread runs SCHED_FIFO when it may (root, or RLIMIT_RTPRIO): the
 * installers keep every CPU busy, and a fault thread of normal priority that
 * wakes for a fault, or at the gate, waits for a time slice (hundreds of
 * microseconds to milliseconds) before it can serve. It never spins: it
 * sleeps in epoll_wait or at the gate, and serves a fault in microseconds
 * (a fork's store clone is the one long job; RT throttling bounds it).
 */
static void fault_thread_priority(hm_loop *l)
{
	struct sched_param sp = { .sched_priority = 1 };

	l->st.fault_thread_rt = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp) == 0;
}

static void *fault_main(void *arg)
{
	hm_loop *l = arg;
	struct epoll_event evs[64];

	pthread_mutex_lock(&l->lock);
	fault_thread_priority(l);
	while (!l->stop && !l->st.error) {
		/* While the kernel holds a waiting fault back (EAGAIN), poll
		 * briefly for its events; otherwise sleep until a uffd or the
		 * control eventfd has something. */
		int timeout = any_blocked_waiting(l) ? BLOCKED_RETRY_MS : -1;
		uint64_t woke;
		int n, i;

		pthread_mutex_unlock(&l->lock);
		n = epoll_wait(l->epfd, evs, 64, timeout);
		woke = now_ns();
		lock_spinning(l);
		if (n > 0)
			hist_add(l, HM_HIST_LOCK, now_ns() - woke);
		if (n < 0 && errno != EINTR) {
			loop_fail(l, HM_LOOP_OP_EPOLL, NULL, 0, -errno);
			break;
		}
		for (i = 0; i < n && !l->stop; i++) {
			struct task *t = evs[i].data.ptr;
			int rc;

			if (!t) {
				uint64_t v;
				if (read(l->ctlfd, &v, sizeof(v)) < 0) {
				}
				retry_all_waiting(l, 0);
				continue;
			}
			rc = handle_uffd(l, t, woke);
			if (rc) {
				loop_fail(l, HM_LOOP_OP_READ, t, 0, rc); /* (unless it named itself) */
				break;
			}
		}
		if (n == 0)
			retry_all_waiting(l, 1);
		check_done(l);
	}
	pthread_cond_broadcast(&l->cond);
	pthread_cond_broadcast(&l->work);
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
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	pthread_mutexattr_t ma;
	int pipefd[2], rc = 0, i;

	if (!l)
		return -ENOMEM;
	l->store = store;
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
	out->installers = l->ninstallers;
	out->batch_pages = l->batch_pages;
	pthread_mutex_unlock(&l->lock);
}

int hm_loop_histogram(hm_loop *l, int which, uint64_t *counts, int nbuckets)
{
	if (which < 0 || which >= HM_HIST_COUNT || nbuckets != LAT_BUCKETS)
		return -EINVAL;
	pthread_mutex_lock(&l->lock);
	memcpy(counts, l->hist[which], sizeof(l->hist[which]));
	pthread_mutex_unlock(&l->lock);
	return 0;
}

uint64_t hm_loop_bucket_ns(int bucket)
{
	return lat_bucket_value((unsigned)bucket);
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
	for (int i = 0; i < INSTALLERS_MAX; i++)
		pthread_mutex_destroy(&l->installers[i].copy_lock);
	pthread_cond_destroy(&l->work);
	pthread_mutex_destroy(&l->lock);
	free(l);
}
