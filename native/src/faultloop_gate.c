/*
 * The gate between the fault thread and the installers: why the fault
 * thread reads a task's uffd only while no installer copy into the task is
 * in flight, and how its wait is kept short.
 */
#include <sched.h>

#include "faultloop_internal.h"

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
void lock_spinning(hm_loop *l)
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

void gate_close(hm_loop *l, struct task *t)
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

void gate_open(hm_loop *l, struct task *t)
{
	__atomic_store_n(&t->gated, 0, __ATOMIC_RELEASE);
	pthread_cond_broadcast(&l->work);
}
