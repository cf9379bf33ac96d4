/*
 * The floor of an eager userfaultfd install: how fast can UFFDIO_COPY fill
 * a region from a cached pages file, with nothing else in the way (no
 * fault loop, no claims, no gate). `hybridmig lazy-pages`'s installers
 * are measured against it (docs/bench-lazy-pages.md, "Where the install
 * time goes").
 *
 *   cc -O2 -pthread -o floor bench/floor/floor.c
 *   floor -f FILE [-s MiB] [-t threads] [-b pages] [-c] [-w pages/s]
 *         [-g CGROUP_DIR] [-k] [-a 1|2] [-p] [-u] [-r]
 *
 * FILE as CRIU writes its pages images (dd bs=1M makes the same 1 MiB
 * page-cache folios; smaller writes make smaller folios, which map and
 * unmap several times slower), and cached.
 *
 *   -f  source: a file, mapped MAP_PRIVATE read-only and populated
 *       (MADV_POPULATE_READ) before the copy, as the page store does
 *   -a 1  source: anonymous memory filled with the file's data instead;
 *   -a 2  the same in transparent huge pages
 *   -k  source mapped per 2 MiB chunk and each chunk unmapped once copied
 *       (the page store's layout), not as one mapping
 *   -c  the target is another process: a forked child that registers its
 *       region and passes its uffd over a unix socket (otherwise: our own)
 *   -w  the child (or a thread of ours) writes this many random pages of
 *       the target per second while the copy runs (and waits in a fault
 *       for pages not in yet: the copy wakes it)
 *   -g  the target process joins this cgroup (its cgroup.procs) first
 *   -p  copy thread k pinned to CPU k
 *   -u  the source is unmapped only after the copy, by the main thread
 *       alone (unmap_s[0]: how long that took)
 *   -r  threads take 64-page claims in turn from one shared cursor,
 *       instead of each copying its own contiguous share
 *
 * Prints one JSON line: wall seconds of the copy, CPU seconds of the copy
 * threads (each), seconds each spent unmapping the source, and the
 * target's minor faults.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL
#define CHUNK (512 * PAGE)
#define CLAIM 64
#define MAXT 8

static uint64_t size, target_addr;
static uint8_t *src;
static uint8_t *chunk_map[1 << 16]; /* -k: per-chunk source mappings */
static int unmap_after;
static int uffd, batch = 8, nthreads = 1, pin, shared_cursor, per_chunk, anon_src, srcfd;
static uint64_t cursor;
static unsigned chunk_left[1 << 16]; /* -k: pages of each chunk not copied yet */
static double cpu_s[MAXT], unmap_s[MAXT];
static __thread int self_k;

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static const uint8_t *src_at(uint64_t off)
{
	return per_chunk ? chunk_map[off / CHUNK] + off % CHUNK : src + off;
}

static void copied(uint64_t off, uint64_t n)
{
	uint64_t c = off / CHUNK;

	if (per_chunk && !unmap_after && __atomic_sub_fetch(&chunk_left[c], (unsigned)(n / PAGE), __ATOMIC_ACQ_REL) == 0) {
		double t = now();
		munmap(chunk_map[c], CHUNK);
		unmap_s[self_k] += now() - t;
	}
}

static void copy_range(uint64_t off, uint64_t len)
{
	uint64_t done = 0;

	while (done < len) {
		uint64_t n = len - done < batch * PAGE ? len - done : batch * PAGE;
		struct uffdio_copy c = { .dst = target_addr + off + done, .src = (uintptr_t)src_at(off + done), .len = n };

		if (ioctl(uffd, UFFDIO_COPY, &c) && errno != EEXIST)
			die("UFFDIO_COPY");
		copied(off + done, n);
		done += n;
	}
}

static void *copier(void *arg)
{
	int k = (int)(intptr_t)arg;
	struct timespec ts;

	self_k = k;
	if (pin) {
		cpu_set_t one;
		CPU_ZERO(&one);
		CPU_SET(k, &one);
		sched_setaffinity(0, sizeof(one), &one);
	}
	if (shared_cursor) {
		uint64_t off;
		while ((off = __atomic_fetch_add(&cursor, CLAIM * PAGE, __ATOMIC_RELAXED)) < size)
			copy_range(off, size - off < CLAIM * PAGE ? size - off : CLAIM * PAGE);
	} else {
		uint64_t share = size / nthreads / CHUNK * CHUNK;
		uint64_t off = share * k, len = k == nthreads - 1 ? size - off : share;
		copy_range(off, len);
	}
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	cpu_s[k] = ts.tv_sec + ts.tv_nsec / 1e9;
	return NULL;
}

/* The target's writer: random pages at `rate` per second until killed. */
static uint8_t *region;
static long rate;

static void *write_loop(void *unused)
{
	uint64_t pages = size / PAGE, x = 88172645463325252ULL;
	double next = now();

	(void)unused;
	for (;;) {
		x ^= x << 13, x ^= x >> 7, x ^= x << 17;
		region[(x % pages) * PAGE + 8]++;
		next += 1.0 / rate;
		while (now() < next) {
			struct timespec d = { 0, 100000 };
			nanosleep(&d, NULL);
		}
	}
	return NULL;
}

static int new_uffd(uint8_t *region)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg = { .range = { (uintptr_t)region, size }, .mode = UFFDIO_REGISTER_MODE_MISSING };
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);

	if (fd < 0 || ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg))
		die("userfaultfd");
	return fd;
}

static void join_cgroup(const char *dir)
{
	char path[4096], pid[32];
	int fd;

	snprintf(path, sizeof(path), "%s/cgroup.procs", dir);
	snprintf(pid, sizeof(pid), "%d\n", getpid());
	fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, pid, strlen(pid)) < 0)
		die(path);
	close(fd);
}

static void send_fd(int sock, int fd, uint64_t addr)
{
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { &addr, sizeof(addr) };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&m);

	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	if (sendmsg(sock, &m, 0) < 0)
		die("sendmsg");
}

static int recv_fd(int sock, uint64_t *addr)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { addr, sizeof(*addr) };
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf) };
	int fd;

	if (recvmsg(sock, &m, 0) != sizeof(*addr))
		die("recvmsg");
	memcpy(&fd, CMSG_DATA(CMSG_FIRSTHDR(&m)), sizeof(int));
	return fd;
}

static void map_source(const char *file)
{
	uint64_t c;

	srcfd = open(file, O_RDONLY);
	if (srcfd < 0)
		die(file);
	if (anon_src) {
		/* 2 MiB aligned, so that -a 2 gets huge pages throughout */
		uint8_t *p = mmap(NULL, size + CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			die("anonymous source");
		src = (uint8_t *)(((uintptr_t)p + CHUNK - 1) & ~(CHUNK - 1));
		if (anon_src == 2 && madvise(src, size, MADV_HUGEPAGE))
			die("MADV_HUGEPAGE");
		if (pread(srcfd, src, size, 0) != (ssize_t)size)
			die("anonymous source");
		return;
	}
	if (!per_chunk) {
		src = mmap(NULL, size, PROT_READ, MAP_PRIVATE, srcfd, 0);
		if (src == MAP_FAILED || madvise(src, size, MADV_POPULATE_READ))
			die("file source");
		return;
	}
	for (c = 0; c < size / CHUNK; c++) {
		chunk_map[c] = mmap(NULL, CHUNK, PROT_READ, MAP_PRIVATE, srcfd, c * CHUNK);
		if (chunk_map[c] == MAP_FAILED || madvise(chunk_map[c], CHUNK, MADV_POPULATE_READ))
			die("chunk source");
		chunk_left[c] = CHUNK / PAGE;
	}
}

int main(int argc, char **argv)
{
	const char *file = NULL, *cgroup = NULL;
	int child = 0, opt, sv[2], k;
	pid_t pid = 0;
	pthread_t th[MAXT], writer;
	struct rusage ru;
	double t0, wall;

	size = 1024UL << 20;
	while ((opt = getopt(argc, argv, "f:s:t:b:cw:g:ka:pruh")) != -1) {
		switch (opt) {
		case 'f': file = optarg; break;
		case 's': size = strtoul(optarg, NULL, 0) << 20; break;
		case 't': nthreads = atoi(optarg); break;
		case 'b': batch = atoi(optarg); break;
		case 'c': child = 1; break;
		case 'w': rate = atol(optarg); break;
		case 'g': cgroup = optarg; break;
		case 'k': per_chunk = 1; break;
		case 'a': anon_src = atoi(optarg); break;
		case 'p': pin = 1; break;
		case 'r': shared_cursor = 1; break;
		case 'u': unmap_after = 1; break;
		default:
			fprintf(stderr, "see the comment at the top of floor.c\n");
			return 2;
		}
	}
	if (!file || nthreads < 1 || nthreads > MAXT || size % CHUNK || size / CHUNK > (1 << 16))
		return 2;
	map_source(file);

	if (child) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
			die("socketpair");
		pid = fork();
		if (pid == 0) {
			close(sv[0]);
			if (cgroup)
				join_cgroup(cgroup);
			region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			send_fd(sv[1], new_uffd(region), (uintptr_t)region);
			if (read(sv[1], &k, 1) != 1) /* go */
				_exit(1);
			if (rate)
				write_loop(NULL);
			pause();
			_exit(0);
		}
		close(sv[1]);
		uffd = recv_fd(sv[0], &target_addr);
	} else {
		if (cgroup)
			join_cgroup(cgroup);
		region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		uffd = new_uffd(region);
		target_addr = (uintptr_t)region;
	}

	t0 = now();
	if (child && write(sv[0], "g", 1) != 1)
		die("go");
	if (!child && rate)
		pthread_create(&writer, NULL, write_loop, NULL);
	for (k = 0; k < nthreads; k++)
		pthread_create(&th[k], NULL, copier, (void *)(intptr_t)k);
	for (k = 0; k < nthreads; k++)
		pthread_join(th[k], NULL);
	wall = now() - t0;
	if (unmap_after) {
		uint64_t c;
		double t = now();
		if (per_chunk)
			for (c = 0; c < size / CHUNK; c++)
				munmap(chunk_map[c], CHUNK);
		else
			munmap(src, size);
		unmap_s[0] = now() - t;
	}

	printf("{\"size_mib\": %lu, \"threads\": %d, \"batch\": %d, \"child\": %d, \"write_rate\": %ld, "
	       "\"cgroup\": %s%s%s, \"per_chunk\": %d, \"anon_src\": %d, \"pinned\": %d, \"shared_cursor\": %d, "
	       "\"wall_s\": %.4f, \"cpu_s\": [",
	       size >> 20, nthreads, batch, child, rate, cgroup ? "\"" : "", cgroup ? cgroup : "null", cgroup ? "\"" : "",
	       per_chunk, anon_src, pin, shared_cursor, wall);
	for (k = 0; k < nthreads; k++)
		printf("%s%.4f", k ? ", " : "", cpu_s[k]);
	printf("], \"unmap_s\": [");
	for (k = 0; k < nthreads; k++)
		printf("%s%.4f", k ? ", " : "", unmap_s[k]);
	printf("]");
	if (child) {
		kill(pid, SIGKILL);
		waitpid(pid, NULL, 0);
		getrusage(RUSAGE_CHILDREN, &ru);
		printf(", \"target_minflt\": %ld", ru.ru_minflt);
	}
	printf("}\n");
	return 0;
}
