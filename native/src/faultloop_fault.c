/*
 * The fault thread (fault_main): it alone reads the uffds, sleeping in
 * epoll_wait, and serves what it reads at once, the gate of the task closed
 * (handle_uffd): page faults (handle_pagefault) from the store, with a zero
 * page outside what is owed, or queued until they can be served; and the
 * events FORK, REMAP, REMOVE and UNMAP (handle_fork, handle_remap,
 * handle_remove); the uffds of forked children go to the guard first
 * (hold_forks). How the threads fit: faultloop.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "faultloop_internal.h"

/* --- serving faults (fault thread, gate closed) ---------------------------- */

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

/* --- the guard: forked children's uffds (fault thread, gate closed) ------- */

/*
 * One uffd to the guard (destination/guard.py): "hold 0" with the fd
 * (SCM_RIGHTS), the message the daemon sends for each task CRIU hands over.
 * Once sent it is held, whatever happens to us: a descriptor in flight counts
 * as open. The guard is never waited for long: the socket is written without
 * blocking, and a guard whose socket stays full (stopped, starved) for
 * GUARD_SEND_MS fails the loop, as one that is gone (EPIPE) does; the restore
 * then fails and the copy is ended. 0, or -errno.
 */
static int guard_hold(hm_loop *l, int ufd)
{
	static const char word[] = "hold 0";
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	struct iovec iov = { .iov_base = (void *)word, .iov_len = sizeof(word) - 1 };
	struct msghdr mh = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = ctl.buf,
		.msg_controllen = sizeof(ctl.buf),
	};
	uint64_t deadline = now_ns() + GUARD_SEND_MS * 1000000ULL;
	struct cmsghdr *c;

	memset(&ctl, 0, sizeof(ctl));
	c = CMSG_FIRSTHDR(&mh);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &ufd, sizeof(int));
	for (;;) {
		struct pollfd pfd = { .fd = l->guard_fd, .events = POLLOUT };
		uint64_t now;

		if (sendmsg(l->guard_fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) {
			l->st.guard_holds++;
			return 0;
		}
		if (errno == EINTR)
			continue;
		if (errno != EAGAIN)
			return -errno;
		now = now_ns();
		if (now >= deadline)
			return -ETIMEDOUT;
		if (poll(&pfd, 1, (int)((deadline - now) / 1000000) + 1) < 0 && errno != EINTR)
			return -errno;
	}
}

/*
 * The uffds of the children forked in a batch just read from t, to the guard,
 * before anything of the batch is served. Why at once (Linux 6.18,
 * userfaultfd_ctx_read and resolve_userfault_fork in fs/userfaultfd.c): the
 * read that returns a FORK event installs the child's uffd in our fd table
 * and completes the event, and the parent's fork() goes on from there: the
 * child may run and fault right away. Its faults wait, its uffd not yet being
 * in our epoll set; but until the guard holds a duplicate, ours is the only
 * one, and were we to die, its closing would end the registration
 * (userfaultfd_release) and the child would read zero pages where it is owed
 * data until the guard ended the tree. What remains is the time between the
 * read and the send, microseconds.
 *
 * "hold 0": the child has no pid yet. The kernel queues the event from
 * dup_mmap(), inside copy_process(), before alloc_pid(), and the message
 * carries none. The guard needs none: the child is a descendant of a task it
 * holds or of the pidfile's root, and it ends their trees whole.
 *
 * Only while t owes pages: a child of a parent that owes none owes none
 * either (the gate is closed: no claim of t is in flight, so t's owed list
 * is all it lacks). And so no hold is sent once everything is installed,
 * when the guard has let go of its duplicates (holding one then, a fault in
 * memory the copy zapped since would wait for a reader that is gone) and its
 * socket may be shut (a send would fail the loop under a committed copy).
 * A failure is returned for the caller to fail the loop once the batch is
 * served: the child's uffd stays in the loop, its faults waiting, until the
 * copy is ended.
 */
static int hold_forks(hm_loop *l, struct task *t, const struct uffd_msg *msgs, size_t n)
{
	int rc = 0;
	size_t i;

	if (l->guard_fd < 0 || !hm_ranges_count(t->owed))
		return 0;
	for (i = 0; !rc && i < n; i++)
		if (msgs[i].event == UFFD_EVENT_FORK)
			rc = guard_hold(l, (int)msgs[i].arg.fork.ufd);
	return rc;
}

/* --- uffd events (fault thread, gate closed) ------------------------------ */

/* A task starts served: what it owes is in place before its uffd joins the
 * epoll set, or a fault read in between would get a zero page. Takes `owed`. */
struct task *new_task(hm_loop *l, int uffd, uint64_t key, int32_t pid, hm_ranges *owed)
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
 * contents. Its uffd arrives with the event, and the guard already holds a
 * duplicate (hold_forks); the parent's fork() waited in the kernel until we
 * read the event, and the child may run from then on, but its faults and
 * events wait on its uffd until new_task adds it to our epoll set. The
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

/* Read and serve everything pending on t's uffd. since_ns: when the fault
 * thread woke for it, the start of every fault's latency. */
static int handle_uffd(hm_loop *l, struct task *t, uint64_t since_ns)
{
	struct uffd_msg msgs[32];
	int rc = 0, held = 0;

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
		held = held ?: hold_forks(l, t, msgs, n / sizeof(msgs[0]));
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
	if (!rc && held) {
		rc = held;
		loop_fail(l, HM_LOOP_OP_GUARD, t, 0, rc);
	}
	if (!rc && !t->blocked && t->nwaiting)
		retry_waiting(l, t);
	gate_open(l, t);
	return rc;
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

void *fault_main(void *arg)
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
