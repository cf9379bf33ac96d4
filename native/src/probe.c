/*
 * Kernel feature probes for `hybridmig doctor` and the engine's start-up.
 *
 * Each probe exercises the feature for real on a scrap of the calling
 * process's own memory rather than trusting a version number or a config
 * file: kernels are backported, patched and built with options turned off,
 * and the only reliable answer is whether the call does what we need.
 * Every probe undoes what it did (fds closed, mappings unmapped, userfaultfd
 * registration dropped with its fd) on every path.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common.h"
#include "kernel_compat.h"
#include "probe.h"

/* The cffi-visible constants must be the uapi values. */
_Static_assert(HM_UFFD_FEATURE_PAGEFAULT_FLAG_WP == UFFD_FEATURE_PAGEFAULT_FLAG_WP, "uapi");
_Static_assert(HM_UFFD_FEATURE_EVENT_FORK == UFFD_FEATURE_EVENT_FORK, "uapi");
_Static_assert(HM_UFFD_FEATURE_EVENT_REMAP == UFFD_FEATURE_EVENT_REMAP, "uapi");
_Static_assert(HM_UFFD_FEATURE_EVENT_REMOVE == UFFD_FEATURE_EVENT_REMOVE, "uapi");
_Static_assert(HM_UFFD_FEATURE_MISSING_HUGETLBFS == UFFD_FEATURE_MISSING_HUGETLBFS, "uapi");
_Static_assert(HM_UFFD_FEATURE_MISSING_SHMEM == UFFD_FEATURE_MISSING_SHMEM, "uapi");
_Static_assert(HM_UFFD_FEATURE_EVENT_UNMAP == UFFD_FEATURE_EVENT_UNMAP, "uapi");
_Static_assert(HM_UFFD_FEATURE_SIGBUS == UFFD_FEATURE_SIGBUS, "uapi");
_Static_assert(HM_UFFD_FEATURE_THREAD_ID == UFFD_FEATURE_THREAD_ID, "uapi");
_Static_assert(HM_UFFD_FEATURE_MINOR_HUGETLBFS == UFFD_FEATURE_MINOR_HUGETLBFS, "uapi");
_Static_assert(HM_UFFD_FEATURE_MINOR_SHMEM == UFFD_FEATURE_MINOR_SHMEM, "uapi");
_Static_assert(HM_UFFD_FEATURE_EXACT_ADDRESS == UFFD_FEATURE_EXACT_ADDRESS, "uapi");
_Static_assert(HM_UFFD_FEATURE_WP_HUGETLBFS_SHMEM == UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "uapi");
_Static_assert(HM_UFFD_FEATURE_WP_UNPOPULATED == UFFD_FEATURE_WP_UNPOPULATED, "uapi");
_Static_assert(HM_UFFD_FEATURE_POISON == UFFD_FEATURE_POISON, "uapi");
_Static_assert(HM_UFFD_FEATURE_WP_ASYNC == UFFD_FEATURE_WP_ASYNC, "uapi");
_Static_assert(HM_UFFD_FEATURE_MOVE == UFFD_FEATURE_MOVE, "uapi");

#define PROBE_PAGES 4

/* --- userfaultfd --------------------------------------------------------- */

/* A new userfaultfd (O_CLOEXEC | O_NONBLOCK) opened one way, or -errno. */
static int uffd_open(int how)
{
	int dev, fd, err;

	switch (how) {
	case HM_UFFD_OPEN_SYSCALL:
		/* Needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1. */
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
		return fd < 0 ? -errno : fd;
	case HM_UFFD_OPEN_USER_ONLY:
		/* Always allowed, but faults taken in kernel mode (a read(2)
		 * into lazy memory) are not reported: fine for write tracking,
		 * not for serving lazy pages. */
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
		return fd < 0 ? -errno : fd;
	case HM_UFFD_OPEN_DEV:
		/* Access is governed by the device node's permissions. */
		dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev < 0)
			return -errno;
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
		err = errno;
		close(dev);
		return fd < 0 ? -err : fd;
	default:
		return -EINVAL;
	}
}

/* The UFFDIO_API handshake asking for `want`. Whatever was asked, the kernel
 * answers with every feature it supports; it refuses (EINVAL) a feature it
 * lacks and (EPERM) EVENT_FORK to a caller without CAP_SYS_PTRACE. */
static int uffd_api(int fd, uint64_t want, uint64_t *features, uint64_t *ioctls)
{
	struct uffdio_api api = { .api = UFFD_API, .features = want };

	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	if (features)
		*features = api.features;
	if (ioctls)
		*ioctls = api.ioctls;
	return 0;
}

int hm_probe_uffd_open(int how, uint64_t want, uint64_t *features, uint64_t *ioctls)
{
	int fd, rc;

	fd = uffd_open(how);
	if (fd < 0)
		return fd;
	rc = uffd_api(fd, want, features, ioctls);
	close(fd);
	return rc;
}

int hm_probe_uffd(uint64_t *features, uint64_t *ioctls, int *via_dev)
{
	static const int ways[] = { HM_UFFD_OPEN_SYSCALL, HM_UFFD_OPEN_USER_ONLY, HM_UFFD_OPEN_DEV };
	int first = 0, rc;
	unsigned i;

	for (i = 0; i < sizeof(ways) / sizeof(ways[0]); i++) {
		rc = hm_probe_uffd_open(ways[i], 0, features, ioctls);
		if (rc == 0) {
			if (via_dev)
				*via_dev = ways[i] == HM_UFFD_OPEN_DEV;
			return 0;
		}
		/* The plain syscall's error says most (ENOSYS: no userfaultfd
		 * at all; EPERM: not allowed), so that is the one reported. */
		if (!first)
			first = rc;
	}
	return first;
}

/* --- PAGEMAP_SCAN with asynchronous uffd write protection ---------------- */

/* The first way of opening a userfaultfd that works, or -errno. */
static int uffd_open_any(void)
{
	int fd, first = 0, how;

	for (how = HM_UFFD_OPEN_SYSCALL; how <= HM_UFFD_OPEN_DEV; how++) {
		fd = uffd_open(how);
		if (fd >= 0)
			return fd;
		if (!first)
			first = fd;
	}
	return first;
}

/* PAGEMAP_SCAN over [start, end) reporting PAGE_IS_WRITTEN pages into
 * regs; with wp, also write-protects them again (the tracker's
 * get-and-clear). Number of regions, or -errno. */
static int scan_written(int pagemap, uint64_t start, uint64_t end, int wp, struct page_region *regs, unsigned nregs)
{
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = wp ? PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC : 0,
		.start = start,
		.end = end,
		.vec = (uintptr_t)regs,
		.vec_len = nregs,
		.category_mask = PAGE_IS_WRITTEN,
		.return_mask = PAGE_IS_WRITTEN,
	};
	int n = ioctl(pagemap, PAGEMAP_SCAN, &arg);

	if (n < 0)
		return -errno;
	/* The walk must have covered the whole range. */
	if (arg.walk_end != end)
		return -EIO;
	return n;
}

/* Exactly one region [start, end), reported written? */
static int one_region(const struct page_region *regs, int n, uint64_t start, uint64_t end)
{
	return n == 1 && regs[0].start == start && regs[0].end == end && (regs[0].categories & PAGE_IS_WRITTEN);
}

int hm_probe_pagemap_scan(void)
{
	const uint64_t len = PROBE_PAGES * PAGE_SZ;
	struct page_region regs[PROBE_PAGES];
	struct uffdio_register reg;
	volatile char *mem;
	uint64_t base;
	int uffd = -1, pagemap = -1, rc, n;

	mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return -errno;
	base = (uintptr_t)mem;

	uffd = uffd_open_any();
	if (uffd < 0) {
		rc = uffd;
		goto out;
	}
	/* WP_ASYNC: a write to a protected page is resolved by the kernel
	 * itself (no message to read), which only clears the page's uffd-wp
	 * bit; PAGEMAP_SCAN then reports it as PAGE_IS_WRITTEN. */
	rc = uffd_api(uffd, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, NULL, NULL);
	if (rc == -EINVAL)
		rc = -EOPNOTSUPP; /* the kernel lacks WP_ASYNC (< 6.7) */
	if (rc < 0)
		goto out;

	reg.range.start = base;
	reg.range.len = len;
	reg.mode = UFFDIO_REGISTER_MODE_WP;
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
		rc = -errno;
		goto out;
	}

	pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pagemap < 0) {
		rc = -errno;
		goto out;
	}

	/* Populate every page, then get-and-protect: all of them are
	 * reported written (never protected yet) and protected on the way. */
	for (unsigned i = 0; i < PROBE_PAGES; i++)
		mem[i * PAGE_SZ] = 1;
	n = scan_written(pagemap, base, base + len, 1, regs, PROBE_PAGES);
	if (n < 0) {
		rc = n; /* ENOTTY: no PAGEMAP_SCAN (< 6.7) */
		goto out;
	}
	if (!one_region(regs, n, base, base + len)) {
		rc = -EIO;
		goto out;
	}

	/* Dirty page 1 only: it alone must be reported. */
	mem[PAGE_SZ] = 2;
	n = scan_written(pagemap, base, base + len, 0, regs, PROBE_PAGES);
	if (n < 0) {
		rc = n;
		goto out;
	}
	rc = one_region(regs, n, base + PAGE_SZ, base + 2 * PAGE_SZ) && mem[PAGE_SZ] == 2 ? 0 : -EIO;

out:
	if (pagemap >= 0)
		close(pagemap);
	if (uffd >= 0)
		close(uffd); /* drops the registration and the protection */
	munmap((void *)mem, len);
	return rc;
}

/* --- soft-dirty ---------------------------------------------------------- */

static int read_pagemap_entry(uint64_t addr, uint64_t *entry)
{
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	ssize_t n;
	int err;

	if (fd < 0)
		return -errno;
	n = pread(fd, entry, sizeof(*entry), (off_t)(addr / PAGE_SZ * sizeof(*entry)));
	err = errno;
	close(fd);
	if (n < 0)
		return -err;
	return n == sizeof(*entry) ? 0 : -EIO;
}

static int clear_soft_dirty(void)
{
	int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
	ssize_t n;
	int err;

	if (fd < 0)
		return -errno;
	n = write(fd, "4", 1);
	err = errno;
	close(fd);
	return n == 1 ? 0 : -err;
}

int hm_probe_soft_dirty(void)
{
	volatile char *mem;
	uint64_t entry;
	int rc;

	mem = mmap(NULL, PAGE_SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		return -errno;
	mem[0] = 1;

	/* Without CONFIG_MEM_SOFT_DIRTY, clear_refs accepts "4" and does
	 * nothing, and bit 55 is never set: only the effect tells. This
	 * clears the soft-dirty bits of the whole calling process, which
	 * nothing in hybridmig's own process relies on. */
	rc = clear_soft_dirty();
	if (rc < 0)
		goto out;
	rc = read_pagemap_entry((uintptr_t)mem, &entry);
	if (rc < 0)
		goto out;
	if (entry & PM_ENTRY_SOFT_DIRTY) {
		rc = -EOPNOTSUPP; /* clearing did not clear */
		goto out;
	}
	mem[0] = 2;
	rc = read_pagemap_entry((uintptr_t)mem, &entry);
	if (rc < 0)
		goto out;
	rc = (entry & PM_ENTRY_SOFT_DIRTY) ? 0 : -EOPNOTSUPP;
out:
	munmap((void *)mem, PAGE_SZ);
	return rc;
}

/* --- process_vm_readv and pidfd_getfd ------------------------------------ */

int hm_probe_process_vm_readv(void)
{
	char src[256], dst[256];
	struct iovec local = { .iov_base = dst, .iov_len = sizeof(dst) };
	struct iovec remote = { .iov_base = src, .iov_len = sizeof(src) };
	ssize_t n;

	for (unsigned i = 0; i < sizeof(src); i++)
		src[i] = (char)(i * 7 + 1);
	memset(dst, 0, sizeof(dst));
	/* Seccomp profiles of container runtimes often deny it (EPERM). */
	n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
	if (n < 0)
		return -errno;
	return n == (ssize_t)sizeof(src) && !memcmp(src, dst, sizeof(src)) ? 0 : -EIO;
}

int hm_probe_pidfd_getfd(void)
{
	int pidfd, fds[2], got = -1, rc;
	struct stat a, b;

	pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
	if (pidfd < 0)
		return -errno;
	if (pipe2(fds, O_CLOEXEC) < 0) {
		rc = -errno;
		close(pidfd);
		return rc;
	}
	/* The same ptrace access check applies to another process. */
	got = (int)syscall(SYS_pidfd_getfd, pidfd, fds[0], 0);
	if (got < 0) {
		rc = -errno;
		goto out;
	}
	/* The copy must be the same open file, not merely some fd. */
	if (fstat(fds[0], &a) < 0 || fstat(got, &b) < 0) {
		rc = -errno;
		goto out;
	}
	rc = a.st_dev == b.st_dev && a.st_ino == b.st_ino ? 0 : -EIO;
out:
	if (got >= 0)
		close(got);
	close(fds[0]);
	close(fds[1]);
	close(pidfd);
	return rc;
}
