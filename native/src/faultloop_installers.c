/*
 * The installer threads (installer_main): once restore has finished, each
 * claims a run of owed pages under the loop lock (claim_next: near the last
 * fault, or from its own cursor, apart from the others), copies it with the
 * lock dropped one batch at a time (copy_claim), and settles it under the
 * lock again (settle). How the threads fit: faultloop.c.
 */
#include <errno.h>
#include <sched.h>

#include "faultloop_internal.h"

/* Claim the next run of t from `from` on: taken off the owed list, to be
 * copied with the loop lock dropped. 1 if claimed. Runs whose data has not
 * come are skipped, CLAIM_SKIP_MAX at most (the first is remembered, to be
 * asked for when idle). */
static int claim_from(hm_loop *l, struct task *t, uint64_t from, int k, struct claim *c)
{
	uint64_t start, end, npages;
	const uint8_t *data;
	int kind, skipped = 0;

	while (skipped < CLAIM_SKIP_MAX && hm_ranges_next(t->owed, from, &start, &end)) {
		store_task_lock(t->st);
		kind = store_run(t->st, start, MIN((uint64_t)MAX(l->batch_pages, CLAIM_PAGES), (end - start) / PAGE_SZ),
				 &npages, &data);
		store_task_unlock(t->st);
		if (kind == HM_PAGE_ABSENT) {
			if (!t->first_absent)
				t->first_absent = start, t->first_absent_pages = npages;
			from = start + npages * PAGE_SZ;
			skipped++;
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
	if (done < c->npages && !t->exited && hm_ranges_add(t->owed, c->addr + done * PAGE_SZ, c->addr + c->npages * PAGE_SZ))
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

void *installer_main(void *arg)
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
