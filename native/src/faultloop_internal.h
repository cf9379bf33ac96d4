/*
 * Internal to the fault loop (native/src/faultloop*.c): the tunables, the
 * structures its threads share, and the functions one of its files calls in
 * another. How the pieces fit: the opening comment of faultloop.c.
 */
#pragma once
#include <pthread.h>
#include <stdint.h>

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
#define INSTALLERS_DEFAULT  2
#define INSTALLERS_MAX	    8
/* An installer with nothing to install looks again after this long: to ask
 * for pages whose data has not come, and to retry tasks held back by EAGAIN. */
#define IDLE_ASK_MS	 100
#define BLOCKED_RETRY_MS 1
/* At the gate, the fault thread spins this long before it sleeps. */
#define GATE_SPIN_NS 40000
#define LOCK_SPIN_NS 20000
/* An installer claims up to this many pages at once (or batch_pages if
 * more) and copies them one ioctl of batch_pages at a time, stopping early
 * when a fault comes: a fault still waits for one batch at most, and the
 * claim's locking is paid once. */
#define CLAIM_PAGES 64
/* Runs whose data has not come that one claim skips at most (under the
 * loop lock): in post-copy the owed list ahead of the push is every page
 * not arrived, 55 000 scattered runs at 1 GiB, and walking all of them on
 * each arrival held the lock from the fault thread for milliseconds and
 * kept the destination's CPU busy (the push crawled at 11.7 MB/s at 4 GiB).
 * A claim that gives up leaves the installer to try from the task's start,
 * then to wait for the next arrival; a page it did not reach is installed
 * when faulted, or once the runs before it have come. */
#define CLAIM_SKIP_MAX 64
#define LAT_BUCKETS    HM_HIST_BUCKETS

/* The longest the fault thread waits for room in the guard's socket (a
 * stopped or starved guard) before it fails the loop: every fault waits
 * meanwhile. The guard reads a message in microseconds, and its socket holds
 * hundreds. */
#define GUARD_SEND_MS 50

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
	int blocked;	  /* EAGAIN: the kernel has events for us to read first */
	unsigned copying; /* installer copies in flight into this task */
	int gated;	  /* the fault thread has the task: no new copies */
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
		int cpu;	      /* where it last started a copy (stats: same CPU as the fault thread?) */
	} installers[INSTALLERS_MAX];
	int ninstallers, batch_pages;
	int started;
	int guard_fd; /* the guard's socket (a duplicate), -1 if none; set before start */

	/* Everything below is guarded by lock. The fault thread drops it only
	 * in epoll_wait and at the gate; installers while they copy and wait. */
	pthread_mutex_t lock;
	pthread_cond_t cond; /* done or error: hm_loop_wait */
	pthread_cond_t work; /* installers: there may be something to install */
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

enum install_result {
	INSTALLED, /* some pages went in (or turned out to be there already) */
	ABSENT,	   /* owed, but the store does not hold the data yet */
	BLOCKED,   /* the kernel wants its events read first (EAGAIN) */
	GONE,	   /* the task exited, or a fatal error (l->st.error) */
};

/* --- latency histogram: 8 sub-buckets per power of two ------------------ */

static inline unsigned lat_bucket(uint64_t ns)
{
	unsigned msb = 63 - __builtin_clzll(ns | 1);
	unsigned sub = msb >= 3 ? (ns >> (msb - 3)) & 7 : ns & 7;
	unsigned b = msb * 8 + sub;
	return b < LAT_BUCKETS ? b : LAT_BUCKETS - 1;
}

static inline void hist_add(hm_loop *l, int which, uint64_t ns)
{
	l->hist[which][lat_bucket(ns)]++;
}

/*
 * Hidden: called across the loop's files, and no part of the module's API
 * (as the static functions they were, they bind within the module).
 */
#pragma GCC visibility push(hidden)

/* faultloop.c: how the loop ends */
void loop_fail(hm_loop *l, int op, const struct task *t, uint64_t addr, int64_t err);
void check_done(hm_loop *l);

/* faultloop_fault.c: the fault thread */
void *fault_main(void *arg);
struct task *new_task(hm_loop *l, int uffd, uint64_t key, int32_t pid, hm_ranges *owed);

/* faultloop_installers.c: an installer thread (arg: its struct installer) */
void *installer_main(void *arg);

/* faultloop_gate.c */
void lock_spinning(hm_loop *l);
void gate_close(hm_loop *l, struct task *t);
void gate_open(hm_loop *l, struct task *t);

/* faultloop_fill.c: installing pages, for both kinds of thread */
void wake(struct task *t, uint64_t addr, uint64_t len);
int64_t fill(struct task *t, uint64_t addr, uint64_t npages, const uint8_t *data, uint64_t *installed);
void count_installed(hm_loop *l, int kind, uint64_t installed, int faulted);
enum install_result fill_failed(hm_loop *l, struct task *t, uint64_t addr, const uint8_t *data, int64_t n);
void ask_for(hm_loop *l, struct task *t, uint64_t addr, uint64_t npages);

/* faultloop_stats.c */
void record_latency(hm_loop *l, uint64_t since_ns);

#pragma GCC visibility pop
