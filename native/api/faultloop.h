/* The userfaultfd fault loop: native threads serving the uffds of all
 * restored tasks from the page store with no Python and no GIL on the way.
 * A fault thread reads every uffd (epoll) and serves faults and events at
 * once; installer threads install every owed page once restore finished.
 * Functions return 0 or -errno unless said otherwise. */
typedef struct hm_loop hm_loop;

struct hm_loop_stats {
	uint64_t faults;		/* page-fault messages read */
	uint64_t faults_during_install; /* of which read while an installer copy was in flight */
	uint64_t faults_absent;		/* of which waited for their data to come */
	uint64_t faults_blocked;	/* of which waited for the kernel (EAGAIN: an event pending) */
	uint64_t pages_fault;		/* faulted pages installed from the store */
	uint64_t pages_prefetch;	/* pages installed ahead of any fault */
	uint64_t pages_zero;		/* pages installed as zero pages */
	uint64_t bytes_copied;		/* bytes installed with UFFDIO_COPY */
	uint64_t pages_owed;		/* pages still to install, all tasks */
	uint64_t pages_waiting;		/* faults waiting for their data to arrive */
	uint64_t tasks;			/* tasks served, forked children included */
	uint64_t tasks_exited;
	uint64_t events_fork, events_remap, events_remove, events_unmap;
	uint64_t events_during_install;		     /* of those, read between restore-finished and all installed */
	uint64_t eager_ns;			     /* CLOCK_MONOTONIC when eager install began, 0 if not */
	uint64_t done_ns;			     /* CLOCK_MONOTONIC when all was installed, 0 if not */
	uint64_t lat_p50_ns, lat_p99_ns, lat_max_ns; /* fault thread woke for it -> page installed */
	int64_t error;				     /* -errno of a fatal loop error, else 0; then: */
	int64_t error_op;			     /* what failed: HM_LOOP_OP_* */
	int64_t error_pid;			     /* the task it was for, 0 if none */
	uint64_t error_addr;			     /* the address it was at, 0 if none */
	uint64_t installers;			     /* installer threads */
	uint64_t batch_pages;			     /* pages per installer copy */
	uint64_t fault_thread_rt;		     /* 1 if the fault thread got SCHED_FIFO */
	uint64_t gate_waits;			     /* reads of a uffd that waited for installer copies in flight */
	uint64_t gate_same_cpu;			     /* installers waited for that were last seen on the fault thread's CPU */
	uint64_t gate_slept;			     /* waits that outlasted the spin and slept on an installer's copy lock */
	uint64_t installers_pinned;		     /* installers running on a CPU of their own */
	uint64_t claims_cut;			     /* installer claims stopped between two ioctls by a fault at the gate */
	uint64_t guard_holds;			     /* forked children's uffds handed to the guard (hm_loop_set_guard) */
};

/* The operations a fatal error names (error_op). */
#define HM_LOOP_OP_NONE	    0
#define HM_LOOP_OP_COPY	    1  /* UFFDIO_COPY */
#define HM_LOOP_OP_ZEROPAGE 2  /* UFFDIO_ZEROPAGE */
#define HM_LOOP_OP_READ	    3  /* reading a uffd's messages */
#define HM_LOOP_OP_EPOLL    4  /* epoll_wait on the uffds */
#define HM_LOOP_OP_FAULT    5  /* serving a page fault */
#define HM_LOOP_OP_FORK	    6  /* a FORK event */
#define HM_LOOP_OP_REMAP    7  /* a REMAP event */
#define HM_LOOP_OP_REMOVE   8  /* a REMOVE or UNMAP event */
#define HM_LOOP_OP_SETTLE   9  /* owing again the rest of an installer's claim */
#define HM_LOOP_OP_GUARD    10 /* handing a forked child's uffd to the guard */

/* Histograms (hm_loop_histogram): HM_HIST_BUCKETS buckets, 8 per power of
 * two of nanoseconds; hm_loop_bucket_ns(b) is the lower bound of bucket b. */
#define HM_HIST_BUCKETS	       384
#define HM_HIST_LATENCY	       0 /* a fault: fault thread woke -> page installed */
#define HM_HIST_GATE	       1 /* a fault: wait at the gate of the read that found it */
#define HM_HIST_FAULT_COPY     2 /* a fault: the copy of the faulted page */
#define HM_HIST_INSTALLER_COPY 3 /* an installer copy (batch_pages pages) */
#define HM_HIST_LOCK	       4 /* a wake-up of the fault thread: epoll_wait -> loop lock */
#define HM_HIST_COUNT	       5

/* Pages owed but not (yet) in the store, wanted now: read from miss_fd.
 * They are the images' pages of task `pid` at `src`, to be stored for task
 * `key` at `vaddr`: key differs from pid for a task forked after restore
 * (it owes what its parent owed at the fork), src from vaddr for pages that
 * mremap moved before their data arrived. */
struct hm_miss {
	uint64_t key;
	uint64_t vaddr;
	uint64_t npages;
	int64_t pid;
	uint64_t src;
};

int hm_loop_new(hm_store *store, hm_loop **out);
/* Before start: installer threads (default 2, at most the CPUs online) and
 * pages per installer ioctl (default 8): a fault waits for at most one
 * installer ioctl into its task. */
int hm_loop_configure(hm_loop *l, int installers, int batch_pages);
/* runs: nruns pairs (vaddr, npages) of pages the task is owed. */
int hm_loop_add_task(hm_loop *l, int uffd, uint64_t key, int32_t pid, const uint64_t *runs, uint64_t nruns);
/* The guard's socket (destination/guard.py; SOCK_SEQPACKET): the loop keeps
 * a duplicate, -1 drops it. The uffd of a child forked while its parent owes
 * pages is sent there ("hold 0", SCM_RIGHTS) before the child is served; a
 * send that fails, or waits more than 50 ms, is a fatal error
 * (HM_LOOP_OP_GUARD). */
int hm_loop_set_guard(hm_loop *l, int sockfd);
int hm_loop_start(hm_loop *l);
int hm_loop_begin_eager(hm_loop *l);
int hm_loop_notify(hm_loop *l);
int hm_loop_miss_fd(hm_loop *l);
/* 1 once everything is installed (or the tasks exited), 0 on timeout. */
int hm_loop_wait(hm_loop *l, int timeout_ms);
int hm_loop_stop(hm_loop *l);
void hm_loop_get_stats(hm_loop *l, struct hm_loop_stats *out);
int hm_loop_histogram(hm_loop *l, int which, uint64_t *counts, int nbuckets);
uint64_t hm_loop_bucket_ns(int bucket);
void hm_loop_free(hm_loop *l);
