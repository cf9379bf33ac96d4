/*
 * dirtyset: a process that dirties exactly the pages it is told to, for the
 * dirty-tracker tests.
 *
 * Commands come one per line on stdin; each gets one answer line on stdout,
 * "ok ..." or "err MESSAGE". Regions are numbered in the order mapped.
 *
 *   map PAGES                 mmap a private anonymous region: "ok ID ADDR"
 *   touch ID P[,P...]         plain stores, one byte per page: "ok ADDR..."
 *   threads ID T P[,P...]     the same pages written by T new threads
 *                             (page k by thread k % T): "ok ADDR..."
 *   read ID P N PATH          read(2) N pages of file PATH into pages
 *                             P..P+N-1 (the kernel writes them): "ok ADDR..."
 *   zap ID P[,P...]           madvise(MADV_DONTNEED) those pages: "ok ADDR..."
 *   mremap ID                 move the region elsewhere (mremap MAYMOVE|FIXED
 *                             to a fresh address): "ok OLD NEW"
 *   renew ID                  replace it by a fresh mapping at the same
 *                             address (mmap MAP_FIXED): "ok ADDR"
 *   punch ID P N              munmap pages P..P+N-1 of it: "ok ADDR"
 *   unmap ID                  munmap it: "ok ADDR"
 *   stride ID FIRST STEP N    plain stores to pages FIRST, FIRST+STEP, ...
 *                             (N of them): "ok N" (too many to list)
 *   fork                      fork a child that waits for a signal:
 *                             "ok CHILDPID"
 *   reap CHILDPID             SIGKILL it and wait for it: "ok"
 *   orphan                    the main thread hands the command loop to a
 *                             new thread and calls pthread_exit (the leader
 *                             becomes a zombie, the process runs on): "ok"
 *   pid                       "ok PID"
 *   sleep MS                  sleep, then "ok" (blocks in nanosleep)
 *   seccomp                   install a seccomp filter on every thread that
 *                             kills the process at userfaultfd(2): "ok"
 *   uffd                      call userfaultfd(2) itself: "ok FD" or
 *                             "err ERRNO" (or die of SIGSYS under the filter)
 *   exit                      exit(0)
 *
 * ADDR values are hex page addresses, in the order the pages were named.
 * Stores write a value that is never zero and differs each time, so every
 * write really changes the page.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_REGIONS 64
#define MAX_PAGES 4096
#define MAX_THREADS 16

struct region {
	unsigned char *base;
	size_t pages;
};

static struct region regions[MAX_REGIONS];
static int nregions;
static size_t psize;
static unsigned char stamp = 1;

static void answer(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void answer(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static unsigned char next_stamp(void)
{
	if (++stamp == 0)
		stamp = 1;
	return stamp;
}

static struct region *region_arg(const char *s)
{
	int id = atoi(s);
	return id >= 0 && id < nregions && regions[id].base ? &regions[id] : NULL;
}

/* Parse "P,P,..." into pages[]; number of pages, -1 if one is out of range. */
static int page_list(const char *s, const struct region *r, size_t *pages)
{
	int n = 0;
	char *end;

	while (*s && n < MAX_PAGES) {
		unsigned long p = strtoul(s, &end, 10);
		if (end == s || p >= r->pages)
			return -1;
		pages[n++] = p;
		s = *end == ',' ? end + 1 : end;
		if (*end != ',')
			break;
	}
	return n;
}

static char outbuf[MAX_PAGES * 20 + 64];

static void answer_pages(const struct region *r, const size_t *pages, int n)
{
	size_t at = 0;
	at += (size_t)snprintf(outbuf + at, sizeof(outbuf) - at, "ok");
	for (int i = 0; i < n; i++)
		at += (size_t)snprintf(outbuf + at, sizeof(outbuf) - at, " %lx",
				       (unsigned long)(uintptr_t)(r->base + pages[i] * psize));
	answer("%s", outbuf);
}

struct job {
	struct region *r;
	size_t *pages;
	int n, k, stride;
	unsigned char value;
};

static void *writer(void *arg)
{
	struct job *j = arg;
	for (int i = j->k; i < j->n; i += j->stride)
		((volatile unsigned char *)j->r->base)[j->pages[i] * psize + 8] = j->value;
	return NULL;
}

static void cmd_threads(struct region *r, int nthreads, size_t *pages, int n)
{
	pthread_t tids[MAX_THREADS];
	struct job jobs[MAX_THREADS];
	unsigned char v = next_stamp();

	for (int k = 0; k < nthreads; k++) {
		jobs[k] = (struct job){ r, pages, n, k, nthreads, v };
		if (pthread_create(&tids[k], NULL, writer, &jobs[k])) {
			answer("err pthread_create");
			exit(1);
		}
	}
	for (int k = 0; k < nthreads; k++)
		pthread_join(tids[k], NULL);
	answer_pages(r, pages, n);
}

static void cmd_read(struct region *r, size_t first, size_t n, const char *path)
{
	static size_t pages[MAX_PAGES];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	size_t want = n * psize, got = 0;

	if (fd < 0 || first + n > r->pages || n > MAX_PAGES) {
		answer("err read %s: %s", path, fd < 0 ? strerror(errno) : "range");
		if (fd >= 0)
			close(fd);
		return;
	}
	while (got < want) {
		ssize_t k = read(fd, r->base + first * psize + got, want - got);
		if (k <= 0)
			break;
		got += (size_t)k;
	}
	close(fd);
	if (got != want) {
		answer("err short read");
		return;
	}
	for (size_t i = 0; i < n; i++)
		pages[i] = first + i;
	answer_pages(r, pages, (int)n);
}

/* SECCOMP_RET_KILL_PROCESS at userfaultfd(2), every other syscall allowed;
 * on all threads. */
static int kill_at_userfaultfd(void)
{
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_userfaultfd, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof(code) / sizeof(code[0]), code };

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
		return -1;
	return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog);
}

static void *command_loop(void *announce)
{
	static size_t pages[MAX_PAGES];
	static char line[65536];

	if (announce)
		answer("ok");
	while (fgets(line, sizeof(line), stdin)) {
		char cmd[16] = "", a[4096] = "", b[4096] = "", c[4096] = "", d[4096] = "";
		struct region *r;
		int n;

		line[strcspn(line, "\n")] = 0;
		sscanf(line, "%15s %4095s %4095s %4095s %4095s", cmd, a, b, c, d);
		if (!strcmp(cmd, "map")) {
			size_t np = strtoul(a, NULL, 10);
			void *p = mmap(NULL, np * psize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED || nregions == MAX_REGIONS || np == 0) {
				answer("err mmap");
				continue;
			}
			regions[nregions] = (struct region){ p, np };
			answer("ok %d %lx", nregions++, (unsigned long)(uintptr_t)p);
		} else if (!strcmp(cmd, "touch") || !strcmp(cmd, "zap")) {
			if (!(r = region_arg(a)) || (n = page_list(b, r, pages)) < 0) {
				answer("err args");
				continue;
			}
			unsigned char v = next_stamp();
			for (int i = 0; i < n; i++) {
				if (cmd[0] == 't')
					((volatile unsigned char *)r->base)[pages[i] * psize + 16] = v;
				else if (madvise(r->base + pages[i] * psize, psize, MADV_DONTNEED)) {
					answer("err madvise");
					goto next;
				}
			}
			answer_pages(r, pages, n);
		} else if (!strcmp(cmd, "threads")) {
			int t = atoi(b);
			if (!(r = region_arg(a)) || t < 1 || t > MAX_THREADS || (n = page_list(c, r, pages)) < 0) {
				answer("err args");
				continue;
			}
			cmd_threads(r, t, pages, n);
		} else if (!strcmp(cmd, "read")) {
			if (!(r = region_arg(a))) {
				answer("err args");
				continue;
			}
			cmd_read(r, strtoul(b, NULL, 10), strtoul(c, NULL, 10), d);
		} else if (!strcmp(cmd, "mremap")) {
			size_t len;
			void *fresh, *moved;
			if (!(r = region_arg(a))) {
				answer("err args");
				continue;
			}
			len = r->pages * psize;
			/* Reserve a fresh place, then move the region onto it. */
			fresh = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			moved = fresh == MAP_FAILED ? MAP_FAILED
						    : mremap(r->base, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, fresh);
			if (moved == MAP_FAILED) {
				answer("err mremap");
				continue;
			}
			answer("ok %lx %lx", (unsigned long)(uintptr_t)r->base, (unsigned long)(uintptr_t)moved);
			r->base = moved;
		} else if (!strcmp(cmd, "renew")) {
			if (!(r = region_arg(a)) ||
			    mmap(r->base, r->pages * psize, PROT_READ | PROT_WRITE,
				 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) {
				answer("err renew");
				continue;
			}
			answer("ok %lx", (unsigned long)(uintptr_t)r->base);
		} else if (!strcmp(cmd, "punch")) {
			size_t first = strtoul(b, NULL, 10), cnt = strtoul(c, NULL, 10);
			if (!(r = region_arg(a)) || !cnt || first + cnt > r->pages ||
			    munmap(r->base + first * psize, cnt * psize)) {
				answer("err punch");
				continue;
			}
			answer("ok %lx", (unsigned long)(uintptr_t)(r->base + first * psize));
		} else if (!strcmp(cmd, "unmap")) {
			if (!(r = region_arg(a))) {
				answer("err args");
				continue;
			}
			munmap(r->base, r->pages * psize);
			answer("ok %lx", (unsigned long)(uintptr_t)r->base);
			r->base = NULL;
		} else if (!strcmp(cmd, "stride")) {
			size_t first = strtoul(b, NULL, 10), step = strtoul(c, NULL, 10), cnt = strtoul(d, NULL, 10);
			unsigned char v = next_stamp();
			if (!(r = region_arg(a)) || !step || first + (cnt ? cnt - 1 : 0) * step >= r->pages) {
				answer("err args");
				continue;
			}
			for (size_t i = 0; i < cnt; i++)
				((volatile unsigned char *)r->base)[(first + i * step) * psize + 24] = v;
			answer("ok %zu", cnt);
		} else if (!strcmp(cmd, "fork")) {
			pid_t child = fork();
			if (child == 0) {
				for (;;)
					pause();
			}
			if (child < 0)
				answer("err fork");
			else
				answer("ok %d", (int)child);
		} else if (!strcmp(cmd, "reap")) {
			pid_t child = (pid_t)atoi(a);
			kill(child, SIGKILL);
			waitpid(child, NULL, 0);
			answer("ok");
		} else if (!strcmp(cmd, "orphan")) {
			pthread_t t;
			if (pthread_create(&t, NULL, command_loop, (void *)1)) {
				answer("err pthread_create");
				continue;
			}
			pthread_exit(NULL);
		} else if (!strcmp(cmd, "pid")) {
			answer("ok %d", (int)getpid());
		} else if (!strcmp(cmd, "sleep")) {
			struct timespec ts = { atoi(a) / 1000, (long)(atoi(a) % 1000) * 1000000L };
			while (nanosleep(&ts, &ts) && errno == EINTR)
				;
			answer("ok");
		} else if (!strcmp(cmd, "seccomp")) {
			if (kill_at_userfaultfd())
				answer("err seccomp %d", errno);
			else
				answer("ok");
		} else if (!strcmp(cmd, "uffd")) {
			int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
			if (fd < 0) {
				answer("err %d", errno);
			} else {
				close(fd);
				answer("ok %d", fd);
			}
		} else if (!strcmp(cmd, "exit")) {
			exit(0);
		} else {
			answer("err unknown command %s", cmd);
		}
next:;
	}
	exit(0);
}

int main(void)
{
	psize = (size_t)sysconf(_SC_PAGESIZE);
	setvbuf(stdout, NULL, _IOLBF, 0);
	command_loop(NULL);
	return 0;
}
