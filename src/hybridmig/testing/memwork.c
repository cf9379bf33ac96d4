/*
 * memwork: a self-verifying memory workload for migration tests.
 *
 *   memwork --size-mb N [--threads T] [--procs P] [--report FILE]
 *           [--rate PAGES_PER_S_PER_THREAD] [--hot PERCENT] [--check-writes 1]
 *           [--compressible 1]
 *
 * Every process of the tree owns one private anonymous region of N MiB and,
 * in separate memory, a generation counter per page.  Writer threads keep
 * rewriting pages; a page's whole content is a function of (index,
 * generation), so after a checkpoint/restore or a migration every page can be
 * checked exactly: a lost page (all zeros), a stale page (old generation), a
 * misplaced page (wrong index) or a corrupted one are told apart.
 *
 * Page layout (page i, generation g, 64-bit little-endian words w[]):
 *   w[0] = MAGIC
 *   w[1] = i
 *   w[2] = g
 *   w[3] = header_check(i, g)          (mix of magic, i and g)
 *   w[4..] = splitmix64 stream seeded by seed(i, g), to the end of the page
 * w[0] is never zero, so an all-zero page is always detected.  The first 64
 * bytes (w[0..7]) are the header; w[4..7] are already stream words.
 *
 * Control, by signal to a process (the root forwards each to its children):
 *   SIGUSR1   verify: pause the writers at a safe point, check every page,
 *             append {"event":"verify",...}, resume.
 *   SIGUSR2   fork-verify: pause the writers, fork, resume; the child checks
 *             the snapshot it inherited and appends {"event":"fork-verify"}.
 *   SIGRTMIN  churn: pause the writers, change the mappings (see churn()),
 *             verify, append {"event":"churn-verify",...}, resume.
 *   SIGTERM   clean exit ({"event":"exit"}).
 * All of them are blocked in every thread and taken by the main thread with
 * sigwaitinfo(); handlers are installed as well because the init of a PID
 * namespace only receives signals it has a handler for.
 *
 * With --check-writes 1 a writer also checks a page's header before it
 * rewrites it, and reports the first wrong one it meets ({"event":"corrupt"}):
 * a copy that reads memory it does not have (a migration's page still owed,
 * read as zeros) says so within milliseconds, not at the next verify.  A
 * crash (SIGSEGV, SIGBUS, SIGFPE, SIGILL: zeroed bookkeeping, e.g. a null
 * page address) is reported as {"event":"crash"} before the process dies of
 * it, always (see raw_begin() for how).
 *
 * The report file is opened (O_APPEND), written with one write() per line,
 * and closed every time: no descriptor stays open across a checkpoint.
 * Nothing is written to stdout/stderr after the arguments are parsed.
 *
 * Times that must survive a migration use CLOCK_REALTIME: CRIU restores into
 * a time namespace whose CLOCK_MONOTONIC hides the migration gap.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x4d454d574f524b31ULL /* "MEMWORK1" */
#define TL_BUCKETS 6000             /* timeline: last 10 min ... */
#define TL_BUCKET_NS 100000000ULL   /* ... in 100 ms buckets */
#define MAX_BAD_DETAIL 8
#define MAX_PROCS 64
#define CHURN_PAGES 16 /* pages per churn operation (move, unmap, zero) */

enum page_state { PS_NORMAL = 0, PS_ZEROED = 1, PS_UNMAPPED = 2 };

struct tl_slot {
	uint64_t bucket; /* bucket id = realtime_ns / TL_BUCKET_NS */
	uint64_t ops;
};

struct writer {
	pthread_t tid;
	int idx;
	size_t first, count; /* slice of pages owned by this thread */
	size_t stride, pos;
	uint64_t ops;
	uint64_t max_gap_ns, max_gap_at_ns, recent_gap_ns;
	int corrupt_reported; /* --check-writes: the first wrong page only */
	struct tl_slot tl[TL_BUCKETS];
};

/* Bad page description, kept for the first few bad pages of a verify. */
struct bad {
	size_t page;
	const char *kind;
	uint64_t found_index, found_gen, expect_gen;
};

struct result {
	size_t pages, bad, zero_pages, zero_pages_bad, unmapped, moved;
	long first_bad;
	int ndetail;
	struct bad detail[MAX_BAD_DETAIL];
};

/* --- configuration and process-wide state ----------------------------- */
static size_t g_size_mb = 64;
static int g_threads = 1;
static int g_procs = 1;
static double g_rate;
static double g_hot = 100; /* percent of each writer's slice it keeps rewriting */
static int g_check_writes;
static const char *g_report;
/* The report path, copied out of argv: CRIU leaves only the page at a
 * thread's stack pointer out of a lazy restore, and argv lies above it. In
 * .data, a private file mapping, never lazy, so a copy that runs on memory it
 * was never given can still say so. */
static char g_report_path[4096] __attribute__((section(".data")));
static int g_proc_index; /* 0 = root of the tree */

static size_t g_psize;       /* page size */
static size_t g_npages;
static unsigned char *g_region;
static uintptr_t *g_addr;    /* current address of each page */
static uint32_t *g_gen;      /* generation of each page */
static unsigned char *g_state; /* enum page_state of each page */
static struct writer *g_writers;

static pid_t g_children[MAX_PROCS];
static int g_nchildren;
static unsigned g_churns;

/* Pause protocol: see writer_loop() and pause_writers(). */
static atomic_int g_pause;
static atomic_int g_stop;
static int g_parked;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv_parked = PTHREAD_COND_INITIALIZER;
static pthread_cond_t g_cv_resume = PTHREAD_COND_INITIALIZER;

static volatile sig_atomic_t g_flag; /* set by the (normally unused) handler */

/* --- helpers ------------------------------------------------------------ */
static uint64_t now_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline uint64_t splitmix64(uint64_t *state)
{
	uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
	return z ^ (z >> 31);
}

static inline uint64_t page_seed(uint64_t i, uint64_t g)
{
	return (i * 0x9E3779B97F4A7C15ULL) ^ (g * 0xD1B54A32D192ED03ULL) ^ MAGIC;
}

static inline uint64_t header_check(uint64_t i, uint64_t g)
{
	uint64_t s = page_seed(i, g) ^ 0xA5A5A5A5A5A5A5A5ULL;
	return splitmix64(&s);
}

/* --compressible 1: a page's body is its first COMPRESSIBLE_PERIOD random
 * words over and over (lz4 shrinks it to ~1/7), as much memory of real
 * programs does; else random words throughout (incompressible). */
#define COMPRESSIBLE_PERIOD 64
static int g_compressible;

static inline uint64_t body_word(const uint64_t *w, size_t k, uint64_t *s)
{
	if (g_compressible && k >= 4 + COMPRESSIBLE_PERIOD)
		return w[k - COMPRESSIBLE_PERIOD];
	return splitmix64(s);
}

static void fill_page(size_t i, uint64_t g)
{
	uint64_t *w = (uint64_t *)g_addr[i];
	size_t nw = g_psize / 8;
	uint64_t s = page_seed(i, g);

	w[0] = MAGIC;
	w[1] = i;
	w[2] = g;
	w[3] = header_check(i, g);
	for (size_t k = 4; k < nw; k++)
		w[k] = body_word(w, k, &s);
}

static int page_is_zero(const uint64_t *w)
{
	for (size_t k = 0; k < g_psize / 8; k++)
		if (w[k])
			return 0;
	return 1;
}

/* Returns NULL if page i is as expected, else a short reason. */
static const char *check_page(size_t i, uint64_t *found_index, uint64_t *found_gen)
{
	const uint64_t *w = (const uint64_t *)g_addr[i];
	uint64_t g = g_gen[i];
	size_t nw = g_psize / 8;
	uint64_t s;

	*found_index = w[1];
	*found_gen = w[2];
	if (g_state[i] == PS_ZEROED)
		return page_is_zero(w) ? NULL : "not-zero";
	if (w[0] != MAGIC)
		return page_is_zero(w) ? "zero" : "magic";
	if (w[1] != i)
		return "index";
	if (w[2] != g)
		return w[2] < g ? "stale" : "gen";
	if (w[3] != header_check(i, g))
		return "check";
	s = page_seed(i, g);
	for (size_t k = 4; k < nw; k++)
		if (w[k] != body_word(w, k, &s))
			return "body";
	return NULL;
}

static void verify_all(struct result *r)
{
	memset(r, 0, sizeof(*r));
	r->first_bad = -1;
	for (size_t i = 0; i < g_npages; i++) {
		uint64_t fi, fg;
		const char *why;

		if (g_state[i] == PS_UNMAPPED) {
			r->unmapped++;
			continue;
		}
		r->pages++;
		if (g_addr[i] != (uintptr_t)(g_region + i * g_psize))
			r->moved++;
		if (g_state[i] == PS_ZEROED)
			r->zero_pages++;
		why = check_page(i, &fi, &fg);
		if (!why)
			continue;
		r->bad++;
		if (g_state[i] == PS_ZEROED)
			r->zero_pages_bad++;
		if (r->first_bad < 0)
			r->first_bad = (long)i;
		if (r->ndetail < MAX_BAD_DETAIL) {
			struct bad *b = &r->detail[r->ndetail++];
			b->page = i;
			b->kind = why;
			b->found_index = fi;
			b->found_gen = fg;
			b->expect_gen = g_gen[i];
		}
	}
}

/* --- JSON report ---------------------------------------------------------- */
struct buf {
	char *p;
	size_t len, cap;
};

static void bprintf(struct buf *b, const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
		va_end(ap);
		if (n < 0)
			return;
		if (b->len + (size_t)n < b->cap) {
			b->len += (size_t)n;
			return;
		}
		size_t ncap = b->cap * 2 + (size_t)n;
		char *np = realloc(b->p, ncap);
		if (!np)
			return;
		b->p = np;
		b->cap = ncap;
	}
}

static void buf_init(struct buf *b)
{
	b->cap = 8192;
	b->len = 0;
	b->p = malloc(b->cap);
	b->p[0] = 0;
}

/* One write() per line: O_APPEND makes lines of concurrent processes atomic. */
static void report_line(struct buf *b)
{
	int fd;

	bprintf(b, "}\n");
	if (!g_report)
		return;
	fd = open(g_report, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	if (write(fd, b->p, b->len) < 0) {
		/* nowhere to tell: stdout/stderr are not ours */
	}
	close(fd);
}

/*
 * The "corrupt" and "crash" lines are made with no libc but raw system
 * calls: in a copy running on memory it was never given, the heap, a
 * thread's TLS (libc's locale and cancellation state) and most of its stack
 * may read as zeros, and snprintf() or open() would fault on them.
 */
struct rawline {
	char p[384];
	size_t len;
};

static void raw_str(struct rawline *l, const char *s)
{
	while (*s && l->len < sizeof(l->p) - 2)
		l->p[l->len++] = *s++;
}

static void raw_num(struct rawline *l, uint64_t v)
{
	char d[24];
	int n = 0;

	do
		d[n++] = (char)('0' + v % 10);
	while ((v /= 10));
	while (n && l->len < sizeof(l->p) - 2)
		l->p[l->len++] = d[--n];
}

static void raw_begin(struct rawline *l, const char *event)
{
	struct timespec ts = { 0, 0 };

	syscall(SYS_clock_gettime, CLOCK_REALTIME, &ts);
	l->len = 0;
	raw_str(l, "{\"event\":\"");
	raw_str(l, event);
	raw_str(l, "\",\"pid\":");
	raw_num(l, (uint64_t)syscall(SYS_getpid));
	raw_str(l, ",\"proc_index\":");
	raw_num(l, (uint64_t)g_proc_index);
	raw_str(l, ",\"realtime\":");
	raw_num(l, (uint64_t)ts.tv_sec);
}

static void raw_report(struct rawline *l)
{
	long fd;

	l->p[l->len++] = '}';
	l->p[l->len++] = '\n';
	if (!g_report)
		return;
	fd = syscall(SYS_openat, AT_FDCWD, g_report, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	syscall(SYS_write, fd, l->p, l->len);
	syscall(SYS_close, fd);
}

static void on_crash(int sig, siginfo_t *si, void *ctx)
{
	struct rawline l;

	(void)ctx;
	raw_begin(&l, "crash");
	raw_str(&l, ",\"signal\":");
	raw_num(&l, (uint64_t)sig);
	raw_str(&l, ",\"addr\":");
	raw_num(&l, (uint64_t)(uintptr_t)si->si_addr);
	raw_report(&l);
	/* SA_RESETHAND: the faulting instruction runs again and kills us. */
}

/* Before page i is rewritten: does it still hold generation g_gen[i]? */
static void check_before_write(struct writer *w, size_t i)
{
	const uint64_t *p = (const uint64_t *)g_addr[i];
	uint64_t g = g_gen[i];
	const char *why = NULL;
	struct rawline l;

	if (p[0] != MAGIC)
		why = page_is_zero(p) ? "zero" : "magic";
	else if (p[1] != i)
		why = "index";
	else if (p[2] != g)
		why = p[2] < g ? "stale" : "gen";
	else if (p[3] != header_check(i, g))
		why = "check";
	if (!why)
		return;
	w->corrupt_reported = 1;
	raw_begin(&l, "corrupt");
	raw_str(&l, ",\"thread\":");
	raw_num(&l, (uint64_t)w->idx);
	raw_str(&l, ",\"page\":");
	raw_num(&l, i);
	raw_str(&l, ",\"kind\":\"");
	raw_str(&l, why);
	raw_str(&l, "\",\"expect_gen\":");
	raw_num(&l, g);
	raw_str(&l, ",\"found_gen\":");
	raw_num(&l, p[2]);
	raw_report(&l);
}

static void report_begin(struct buf *b, const char *event)
{
	buf_init(b);
	bprintf(b, "{\"event\":\"%s\",\"pid\":%d,\"ppid\":%d,\"proc_index\":%d,"
		   "\"realtime\":%.6f",
		event, (int)getpid(), (int)getppid(), g_proc_index,
		now_ns(CLOCK_REALTIME) / 1e9);
}

static void report_result(struct buf *b, const struct result *r)
{
	bprintf(b, ",\"pages\":%zu,\"bad\":%zu,\"first_bad\":%ld,\"zero_pages\":%zu,"
		   "\"zero_pages_bad\":%zu,\"unmapped\":%zu,\"moved\":%zu,\"bad_detail\":[",
		r->pages, r->bad, r->first_bad, r->zero_pages, r->zero_pages_bad,
		r->unmapped, r->moved);
	for (int k = 0; k < r->ndetail; k++) {
		const struct bad *d = &r->detail[k];
		bprintf(b, "%s{\"page\":%zu,\"kind\":\"%s\",\"expect_gen\":%llu,"
			   "\"found_gen\":%llu,\"found_index\":%llu}",
			k ? "," : "", d->page, d->kind, (unsigned long long)d->expect_gen,
			(unsigned long long)d->found_gen, (unsigned long long)d->found_index);
	}
	bprintf(b, "]");
}

/* Writer statistics; only called while the writers are parked. */
static void report_stats(struct buf *b, int with_timeline)
{
	uint64_t ops = 0, gap = 0, gap_at = 0, recent = 0;

	for (int t = 0; t < g_threads; t++) {
		struct writer *w = &g_writers[t];
		ops += w->ops;
		if (w->max_gap_ns > gap) {
			gap = w->max_gap_ns;
			gap_at = w->max_gap_at_ns;
		}
		if (w->recent_gap_ns > recent)
			recent = w->recent_gap_ns;
		w->recent_gap_ns = 0;
	}
	bprintf(b, ",\"threads\":%d,\"ops\":%llu,\"ops_per_thread\":[", g_threads,
		(unsigned long long)ops);
	for (int t = 0; t < g_threads; t++)
		bprintf(b, "%s%llu", t ? "," : "", (unsigned long long)g_writers[t].ops);
	bprintf(b, "],\"max_gap_ms\":%.3f,\"max_gap_at\":%.6f,\"max_gap_recent_ms\":%.3f",
		gap / 1e6, gap_at / 1e9, recent / 1e6);
	if (!with_timeline)
		return;

	/* Ops per 100 ms bucket for the last TL_BUCKETS buckets, oldest first. */
	uint64_t cur = now_ns(CLOCK_REALTIME) / TL_BUCKET_NS;
	uint64_t first = cur - (TL_BUCKETS - 1);
	bprintf(b, ",\"timeline\":{\"bucket_ms\":%llu,\"start\":%.1f,\"ops\":[",
		(unsigned long long)(TL_BUCKET_NS / 1000000), first * (TL_BUCKET_NS / 1e9));
	for (uint64_t id = first; id <= cur; id++) {
		uint64_t n = 0;
		for (int t = 0; t < g_threads; t++) {
			const struct tl_slot *s = &g_writers[t].tl[id % TL_BUCKETS];
			if (s->bucket == id)
				n += s->ops;
		}
		bprintf(b, "%s%llu", id == first ? "" : ",", (unsigned long long)n);
	}
	bprintf(b, "]}");
}

/* --- writers ---------------------------------------------------------------- */

/*
 * Pause protocol.  A writer looks at g_pause only at the top of its loop,
 * i.e. between two complete page writes, so a parked writer never leaves a
 * half-written page behind.  pause_writers() returns once every writer is
 * parked; resume_writers() lets them go.  The time spent parked is not
 * counted as a gap: gaps are meant to show freezes (a migration), not our
 * own verification pauses.
 */
static void park(void)
{
	pthread_mutex_lock(&g_mu);
	g_parked++;
	pthread_cond_broadcast(&g_cv_parked);
	while (atomic_load(&g_pause))
		pthread_cond_wait(&g_cv_resume, &g_mu);
	g_parked--;
	pthread_mutex_unlock(&g_mu);
}

static void pause_writers(void)
{
	pthread_mutex_lock(&g_mu);
	atomic_store(&g_pause, 1);
	while (g_parked < g_threads)
		pthread_cond_wait(&g_cv_parked, &g_mu);
	pthread_mutex_unlock(&g_mu);
}

static void resume_writers(void)
{
	pthread_mutex_lock(&g_mu);
	atomic_store(&g_pause, 0);
	pthread_cond_broadcast(&g_cv_resume);
	pthread_mutex_unlock(&g_mu);
}

/* Sleeps until the MONOTONIC deadline, waking early on a pause or stop. */
static void pace(uint64_t deadline)
{
	for (;;) {
		uint64_t now = now_ns(CLOCK_MONOTONIC);
		if (now >= deadline || atomic_load(&g_pause) || atomic_load(&g_stop))
			return;
		uint64_t d = deadline - now;
		if (d > 20000000ULL)
			d = 20000000ULL; /* 20 ms: bounds the pause latency */
		struct timespec ts = { .tv_sec = 0, .tv_nsec = (long)d };
		nanosleep(&ts, NULL);
	}
}

static size_t gcd(size_t a, size_t b)
{
	while (b) {
		size_t t = a % b;
		a = b;
		b = t;
	}
	return a;
}

static void *writer_loop(void *arg)
{
	struct writer *w = arg;
	uint64_t last = now_ns(CLOCK_REALTIME);
	uint64_t period = g_rate > 0 ? (uint64_t)(1e9 / g_rate) : 0;
	uint64_t deadline = now_ns(CLOCK_MONOTONIC);

	for (;;) {
		if (atomic_load(&g_pause)) {
			park();
			last = now_ns(CLOCK_REALTIME);
			deadline = now_ns(CLOCK_MONOTONIC);
		}
		if (atomic_load(&g_stop))
			break;

		/* Next page of the slice that is still written (not zeroed/unmapped). */
		size_t i = 0, tries;
		for (tries = 0; tries < w->count; tries++) {
			w->pos = (w->pos + w->stride) % w->count;
			i = w->first + w->pos;
			if (g_state[i] == PS_NORMAL)
				break;
		}
		if (tries == w->count) { /* nothing left to write in this slice */
			struct timespec ts = { 0, 10000000 };
			nanosleep(&ts, NULL);
			last = now_ns(CLOCK_REALTIME);
			continue;
		}
		if (g_check_writes && !w->corrupt_reported)
			check_before_write(w, i);
		g_gen[i]++;
		fill_page(i, g_gen[i]);
		w->ops++;

		uint64_t now = now_ns(CLOCK_REALTIME);
		uint64_t gap = now - last;
		if (now < last)
			gap = 0; /* realtime stepped backwards */
		if (gap > w->max_gap_ns) {
			w->max_gap_ns = gap;
			w->max_gap_at_ns = now;
		}
		if (gap > w->recent_gap_ns)
			w->recent_gap_ns = gap;
		last = now;

		uint64_t id = now / TL_BUCKET_NS;
		struct tl_slot *s = &w->tl[id % TL_BUCKETS];
		if (s->bucket != id) {
			s->bucket = id;
			s->ops = 0;
		}
		s->ops++;

		if (period) {
			/* Pace on MONOTONIC; after a long stall do not burst to catch up. */
			uint64_t m = now_ns(CLOCK_MONOTONIC);
			deadline += period;
			if (m > deadline + 100000000ULL)
				deadline = m;
			pace(deadline);
		}
	}
	return NULL;
}

/* --- control operations ---------------------------------------------------- */
static void do_verify(void)
{
	struct result r;
	struct buf b;

	pause_writers();
	verify_all(&r);
	report_begin(&b, "verify");
	report_result(&b, &r);
	report_stats(&b, 1);
	resume_writers();
	report_line(&b);
	free(b.p);
}

static void do_fork_verify(void)
{
	pid_t pid;
	int err;

	pause_writers();
	pid = fork();
	err = errno;
	if (pid == 0) {
		/* Only this thread exists here; the writers were parked, so the
		 * inherited snapshot is consistent with the inherited generations. */
		struct result r;
		struct buf b;
		pid_t parent = getppid();

		prctl(PR_SET_NAME, "memwork-fv");
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		verify_all(&r);
		report_begin(&b, "fork-verify");
		bprintf(&b, ",\"parent\":%d", (int)parent);
		report_result(&b, &r);
		report_line(&b);
		_exit(r.bad ? 1 : 0);
	}
	resume_writers();
	if (pid < 0) {
		struct buf b;
		report_begin(&b, "fork-verify");
		bprintf(&b, ",\"parent\":%d,\"error\":\"fork: %s\"", (int)getpid(),
			strerror(err));
		report_line(&b);
		free(b.p);
	}
	/* The child is reaped on SIGCHLD by the control loop. */
}

/*
 * Churn: changes the mappings under the writers' feet; writers are parked.
 *
 * A window of 3 * CHURN_PAGES consecutive page indices [s, s + 48) is chosen,
 * starting the search at the middle of the region, such that all its pages
 * are still PS_NORMAL and virtually contiguous (so each churn may be repeated
 * and never touches a page twice).  Then:
 *   [s,      s + 16)  moved: mremap(MREMAP_MAYMOVE|MREMAP_FIXED) onto a fresh
 *                     16-page reservation elsewhere; g_addr[] follows, the
 *                     content and generations are unchanged, writers go on
 *                     writing them at the new address; the old range is a hole.
 *   [s + 16, s + 32)  munmap'ed: PS_UNMAPPED, no longer written nor verified.
 *   [s + 32, s + 48)  madvise(MADV_DONTNEED): PS_ZEROED, no longer written,
 *                     and from now on must read as all zeros.
 * Then everything is verified and one "churn-verify" line is appended; its
 * "churn" object gives the first page index and the addresses (as integers)
 * of the three ranges.
 */
static void do_churn(void)
{
	const size_t W = 3 * CHURN_PAGES;
	size_t s = 0, found = 0;
	struct result r;
	struct buf b;
	const char *err = NULL;
	void *dst = NULL;
	uintptr_t moved_from = 0;

	pause_writers();
	for (size_t k = 0; k < g_npages && !found && g_npages >= W; k++) {
		size_t c = (g_npages / 2 + k) % g_npages;
		size_t j;
		if (c + W > g_npages)
			continue;
		for (j = 0; j < W; j++) {
			if (g_state[c + j] != PS_NORMAL)
				break;
			if (j && g_addr[c + j] != g_addr[c + j - 1] + g_psize)
				break;
		}
		if (j == W) {
			s = c;
			found = 1;
		}
	}
	if (found) {
		size_t len = CHURN_PAGES * g_psize;
		moved_from = g_addr[s];
		void *res = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (res == MAP_FAILED) {
			err = "mmap reservation failed";
		} else {
			dst = mremap((void *)g_addr[s], len, len, MREMAP_MAYMOVE | MREMAP_FIXED, res);
			if (dst == MAP_FAILED) {
				err = "mremap failed";
				munmap(res, len);
			}
		}
		if (!err) {
			for (size_t j = 0; j < CHURN_PAGES; j++)
				g_addr[s + j] = (uintptr_t)dst + j * g_psize;
			if (munmap((void *)g_addr[s + CHURN_PAGES], len) != 0)
				err = "munmap failed";
			else
				for (size_t j = 0; j < CHURN_PAGES; j++)
					g_state[s + CHURN_PAGES + j] = PS_UNMAPPED;
		}
		if (!err) {
			if (madvise((void *)g_addr[s + 2 * CHURN_PAGES], len, MADV_DONTNEED) != 0)
				err = "madvise failed";
			else
				for (size_t j = 0; j < CHURN_PAGES; j++)
					g_state[s + 2 * CHURN_PAGES + j] = PS_ZEROED;
		}
		g_churns++;
	}
	verify_all(&r);
	report_begin(&b, "churn-verify");
	bprintf(&b, ",\"churn\":{\"done\":%s,\"first\":%ld,\"count\":%u", found && !err ? "true" : "false",
		found ? (long)s : -1L, g_churns);
	if (found && !err)
		bprintf(&b, ",\"moved_from\":%lu,\"moved_to\":%lu,\"unmapped_at\":%lu,\"zeroed_at\":%lu",
			(unsigned long)moved_from, (unsigned long)dst,
			(unsigned long)(moved_from + CHURN_PAGES * g_psize),
			(unsigned long)(moved_from + 2 * CHURN_PAGES * g_psize));
	if (err)
		bprintf(&b, ",\"error\":\"%s: %s\"", err, strerror(errno));
	bprintf(&b, "}");
	report_result(&b, &r);
	report_stats(&b, 0);
	resume_writers();
	report_line(&b);
	free(b.p);
}

/* --- setup ---------------------------------------------------------------- */
static void on_signal(int sig)
{
	g_flag = sig;
}

static int churn_signal(void)
{
	return SIGRTMIN;
}

static void control_sigset(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGUSR1);
	sigaddset(set, SIGUSR2);
	sigaddset(set, churn_signal());
	sigaddset(set, SIGTERM);
	sigaddset(set, SIGINT);
	sigaddset(set, SIGHUP);
	sigaddset(set, SIGCHLD);
}

static void forward(int sig)
{
	for (int k = 0; k < g_nchildren; k++)
		if (g_children[k] > 0)
			kill(g_children[k], sig);
}

static void reap(void)
{
	pid_t pid;
	int status;

	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		for (int k = 0; k < g_nchildren; k++) {
			if (g_children[k] != pid)
				continue;
			/* A workload process of the tree died: say so. */
			struct buf b;
			report_begin(&b, "child-exit");
			bprintf(&b, ",\"child\":%d,\"status\":%d", (int)pid, status);
			report_line(&b);
			free(b.p);
			g_children[k] = 0;
		}
	}
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s --size-mb N [--threads T] [--procs P] [--report FILE] "
		"[--rate PAGES_PER_S_PER_THREAD] [--hot PERCENT] [--check-writes 1] [--compressible 1]\n",
		argv0);
	exit(2);
}

static void parse_args(int argc, char **argv)
{
	for (int k = 1; k < argc; k++) {
		const char *a = argv[k];
		const char *v = k + 1 < argc ? argv[k + 1] : NULL;
		if (!v)
			usage(argv[0]);
		if (!strcmp(a, "--size-mb"))
			g_size_mb = strtoul(v, NULL, 10);
		else if (!strcmp(a, "--threads"))
			g_threads = atoi(v);
		else if (!strcmp(a, "--procs"))
			g_procs = atoi(v);
		else if (!strcmp(a, "--report") && strlen(v) < sizeof(g_report_path))
			g_report = strcpy(g_report_path, v);
		else if (!strcmp(a, "--rate"))
			g_rate = atof(v);
		else if (!strcmp(a, "--hot"))
			g_hot = atof(v);
		else if (!strcmp(a, "--check-writes"))
			g_check_writes = atoi(v);
		else if (!strcmp(a, "--compressible"))
			g_compressible = atoi(v);
		else
			usage(argv[0]);
		k++;
	}
	/* At least 256 pages of 4 KiB and at most 256 threads: no slice is empty. */
	if (g_size_mb < 1 || g_threads < 1 || g_threads > 256 || g_procs < 1 ||
	    g_procs > MAX_PROCS || g_rate < 0 || g_hot <= 0 || g_hot > 100)
		usage(argv[0]);
}

static void *xmmap(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		_exit(3);
	return p;
}

static void setup_memory(void)
{
	g_psize = (size_t)sysconf(_SC_PAGESIZE);
	g_npages = g_size_mb * 1024 * 1024 / g_psize;
	/* The page bookkeeping lives in mappings of its own, apart from the region. */
	g_addr = xmmap(g_npages * sizeof(*g_addr));
	g_gen = xmmap(g_npages * sizeof(*g_gen));
	g_state = xmmap(g_npages);
	g_region = xmmap(g_npages * g_psize);
	for (size_t i = 0; i < g_npages; i++) {
		g_addr[i] = (uintptr_t)(g_region + i * g_psize);
		fill_page(i, 0); /* generation 0; touches every page */
	}
}

static void start_writers(void)
{
	g_writers = xmmap(sizeof(*g_writers) * (size_t)g_threads);
	for (int t = 0; t < g_threads; t++) {
		struct writer *w = &g_writers[t];
		w->idx = t;
		w->first = g_npages * (size_t)t / (size_t)g_threads;
		w->count = g_npages * (size_t)(t + 1) / (size_t)g_threads - w->first;
		/* The hot set: the writer only rewrites the start of its slice; the
		 * rest keeps its first generation (the whole region is still verified). */
		size_t hot = (size_t)((double)w->count * g_hot / 100.0);
		w->count = hot ? hot : 1;
		/* A stride coprime with the slice visits every page once per lap
		 * while not walking memory strictly sequentially. */
		w->stride = w->count > 7 ? w->count / 7 * 3 + 1 : 1;
		while (w->count && gcd(w->stride, w->count) != 1)
			w->stride++;
		w->pos = 0;
	}
	for (int t = 0; t < g_threads; t++)
		if (pthread_create(&g_writers[t].tid, NULL, writer_loop, &g_writers[t]) != 0)
			_exit(4);
}

int main(int argc, char **argv)
{
	sigset_t set;
	struct sigaction sa;
	pid_t root = getpid();

	parse_args(argc, argv);

	/* Handlers: the init of a PID namespace drops signals it has none for. */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	control_sigset(&set);
	for (int sig = 1; sig < NSIG; sig++)
		if (sigismember(&set, sig))
			sigaction(sig, &sa, NULL);
	sa.sa_sigaction = on_crash;
	sa.sa_flags = SA_SIGINFO | SA_RESETHAND;
	for (int k = 0; k < 4; k++)
		sigaction((int[]){ SIGSEGV, SIGBUS, SIGFPE, SIGILL }[k], &sa, NULL);
	/* Blocked before any fork or thread: everything inherits the mask. */
	sigprocmask(SIG_BLOCK, &set, NULL);

	/* A session of our own, so that CRIU finds the session leader in the
	 * dumped tree (fails harmlessly if we already lead one). */
	setsid();

	for (int k = 1; k < g_procs; k++) {
		pid_t pid = fork();
		if (pid < 0)
			_exit(5);
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() != root)
				_exit(0);
			g_proc_index = k;
			g_nchildren = 0;
			break;
		}
		g_children[g_nchildren++] = pid;
	}

	setup_memory();
	start_writers();
	{
		struct buf b;
		report_begin(&b, "ready");
		bprintf(&b, ",\"pages\":%zu,\"page_size\":%zu,\"region\":%lu,\"threads\":%d,"
			   "\"procs\":%d,\"children\":[",
			g_npages, g_psize, (unsigned long)g_region, g_threads, g_procs);
		for (int k = 0; k < g_nchildren; k++)
			bprintf(&b, "%s%d", k ? "," : "", (int)g_children[k]);
		bprintf(&b, "],\"churn_signal\":%d,\"rate\":%g", churn_signal(), g_rate);
		report_line(&b);
		free(b.p);
	}

	for (;;) {
		siginfo_t si;
		int sig = sigwaitinfo(&set, &si);

		if (sig < 0)
			continue; /* EINTR, e.g. when CRIU seizes and resumes us */
		if (sig == SIGCHLD) {
			reap();
			continue;
		}
		if (sig == SIGUSR1) {
			forward(sig);
			do_verify();
		} else if (sig == SIGUSR2) {
			forward(sig);
			do_fork_verify();
		} else if (sig == churn_signal()) {
			forward(sig);
			do_churn();
		} else { /* SIGTERM, SIGINT, SIGHUP */
			break;
		}
	}

	/* Clean exit: stop the children, then the writers. */
	forward(SIGTERM);
	atomic_store(&g_stop, 1);
	resume_writers();
	for (int t = 0; t < g_threads; t++)
		pthread_join(g_writers[t].tid, NULL);
	for (int k = 0; k < g_nchildren; k++)
		if (g_children[k] > 0)
			waitpid(g_children[k], NULL, 0);
	{
		struct buf b;
		uint64_t ops = 0;
		for (int t = 0; t < g_threads; t++)
			ops += g_writers[t].ops;
		report_begin(&b, "exit");
		bprintf(&b, ",\"ops\":%llu", (unsigned long long)ops);
		report_line(&b);
		free(b.p);
	}
	return 0;
}
