/* The userfaultfd fault loop: one native thread, epoll over the uffds of all
 * restored tasks, serving every fault from the page store with no Python and
 * no GIL on the way. Functions return 0 or -errno unless said otherwise. */
typedef struct hm_loop hm_loop;

struct hm_loop_stats {
	uint64_t faults;         /* page-fault messages read */
	uint64_t pages_fault;    /* faulted pages installed from the store */
	uint64_t pages_prefetch; /* pages installed ahead of any fault */
	uint64_t pages_zero;     /* pages installed as zero pages */
	uint64_t bytes_copied;   /* bytes installed with UFFDIO_COPY */
	uint64_t pages_owed;     /* pages still to install, all tasks */
	uint64_t pages_waiting;  /* faults waiting for their data to arrive */
	uint64_t tasks;          /* tasks served, forked children included */
	uint64_t tasks_exited;
	uint64_t events_fork, events_remap, events_remove, events_unmap;
	uint64_t eager_ns;       /* CLOCK_MONOTONIC when eager install began, 0 if not */
	uint64_t done_ns;        /* CLOCK_MONOTONIC when all was installed, 0 if not */
	uint64_t lat_p50_ns, lat_p99_ns, lat_max_ns; /* fault read -> page installed */
	int64_t error;           /* -errno of a fatal loop error, else 0 */
};

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
/* runs: nruns pairs (vaddr, npages) of pages the task is owed. */
int hm_loop_add_task(hm_loop *l, int uffd, uint64_t key, int32_t pid, const uint64_t *runs, uint64_t nruns);
int hm_loop_start(hm_loop *l);
int hm_loop_begin_eager(hm_loop *l);
int hm_loop_notify(hm_loop *l);
int hm_loop_miss_fd(hm_loop *l);
/* 1 once everything is installed (or the tasks exited), 0 on timeout. */
int hm_loop_wait(hm_loop *l, int timeout_ms);
int hm_loop_stop(hm_loop *l);
void hm_loop_get_stats(hm_loop *l, struct hm_loop_stats *out);
void hm_loop_free(hm_loop *l);
