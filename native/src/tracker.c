/*
 * Dirty-page tracking of another process (uffd-wp async + PAGEMAP_SCAN, or
 * soft-dirty) and fast page reading for the pre-copy sender.
 *
 * PAGEMAP_SCAN semantics this relies on (fs/proc/task_mmu.c, 6.7+):
 *  - category_mask = PAGE_IS_WRITTEN with return_mask = PAGE_IS_WRITTEN and
 *    no anyof/inverted mask selects the pages whose uffd-wp bit is clear:
 *    written since protected. category_mask means "all of these", anyof
 *    "at least one" (after XOR with category_inverted); with one category
 *    they select the same pages, but only this exact form takes the
 *    kernel's PAGE_IS_WRITTEN fast path. That path has always counted a
 *    pte_none as written: an anonymous page dropped by MADV_DONTNEED after
 *    protection (zapping anonymous memory drops the marker too), whose
 *    content did change, to zeros. The other forms did not until the fix
 *    "fs/proc/task_mmu: fix PAGEMAP_SCAN written state for unpopulated
 *    ptes" (6.18.44 here reports it with all of them, measured).
 *  - PM_SCAN_WP_MATCHING protects exactly the pages reported, under the
 *    page-table lock, in the same walk: a write racing with the scan either
 *    lands before (reported now) or after (reported next time).
 *  - When the output vector is full the walk stops; walk_end is the first
 *    page neither reported nor protected, and a new scan resumes there.
 *  - PM_SCAN_CHECK_WPASYNC fails the scan with EPERM at a VMA that is not
 *    registered for async WP. Without it such a VMA is skipped silently:
 *    a VMA replaced at the same address (munmap + mmap, common with large
 *    malloc blocks) would read as never written. The regions found before
 *    the failure are then lost (already re-protected, the count not
 *    returned), so the caller treats the whole range as written.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "common.h"
#include "inject.h"
#include "kernel_compat.h"
#include "tracker.h"

_Static_assert(sizeof(struct hm_page_region) == sizeof(struct page_region), "page_region layout");

#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL /* include/uapi/linux/pidfd.h, 6.9 */
#endif

#define UFFD_WANT	 (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
#define READ_BATCH_PAGES 1024UL /* 4 MiB per process_vm_readv */
#define PAGEMAP_BATCH	 8192UL /* pagemap entries per pread (64 KiB) */

struct hm_tracker {
	int32_t pid;
	int uffd;    /* our copy of the userfaultfd opened in the target */
	int pagemap; /* /proc/PID/pagemap, for PAGEMAP_SCAN */
};

struct hm_frozen {
	struct hm_freeze_set set;
};

/* /proc/PID/task/TID/name of a live thread of pid: /proc/PID/name of a
 * process whose leader is a zombie has no mm behind it. */
static int proc_open(int32_t pid, const char *name, int flags)
{
	char path[96];
	pid_t tid;
	int fd, rc;

	rc = hm_pick_thread(pid, &tid);
	if (rc < 0)
		return rc;
	snprintf(path, sizeof(path), "/proc/%d/task/%d/%s", pid, tid, name);
	fd = open(path, flags | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? -ESRCH : -errno;
	return fd;
}

static int page_aligned(uint64_t x)
{
	return (x & (PAGE_SZ - 1)) == 0;
}

/* --- injection ------------------------------------------------------------ */

int hm_remote_syscall(int32_t pid, int64_t nr, const int64_t *args, int64_t *ret, uint64_t *stop_ns)
{
	struct hm_inject s;
	long a[6], r = 0;
	int rc, rc2;

	if (pid <= 0)
		return -EINVAL;
	for (int i = 0; i < 6; i++)
		a[i] = args ? (long)args[i] : 0;
	rc = hm_inject_begin(pid, &s);
	if (rc < 0)
		return rc;
	rc = hm_inject_syscall(&s, (long)nr, a, &r);
	rc2 = hm_inject_end(&s, stop_ns);
	if (rc == 0)
		rc = rc2;
	if (rc == 0 && ret)
		*ret = r;
	return rc;
}

/* userfaultfd() run inside the target and copied into ours; the target's
 * descriptor is closed before the target runs again. */
static int steal_uffd(int32_t pid, int pidfd, uint64_t *stop_ns)
{
	long args[6] = { O_CLOEXEC | O_NONBLOCK };
	struct hm_inject s;
	long fd = -1, closed = 0;
	int ours = -1, rc, rc2;

	rc = hm_inject_begin(pid, &s);
	if (rc < 0)
		return rc;
	rc = hm_inject_syscall(&s, SYS_userfaultfd, args, &fd);
	if (rc == 0 && fd == -EPERM) {
		/* Unprivileged target without vm.unprivileged_userfaultfd: the
		 * user-mode-only kind is always allowed, and enough here (async
		 * write protection never delivers a fault to anybody). */
		args[0] |= UFFD_USER_MODE_ONLY;
		rc = hm_inject_syscall(&s, SYS_userfaultfd, args, &fd);
	}
	if (rc == 0 && fd < 0)
		rc = (int)fd; /* the target's kernel refused */
	if (rc == 0) {
		int from = pidfd;
		if (s.tid != pid) {
			/* A zombie leader has no fd table left: take the fd
			 * through the live thread we borrowed (6.9+). */
			from = (int)syscall(SYS_pidfd_open, s.tid, PIDFD_THREAD);
		}
		ours = from < 0 ? -1 : (int)syscall(SYS_pidfd_getfd, from, (int)fd, 0);
		if (ours < 0)
			rc = -errno;
		if (from != pidfd && from >= 0)
			close(from);
		args[0] = fd;
		/* Close it in the target even if the copy failed. */
		rc2 = hm_inject_syscall(&s, SYS_close, args, &closed);
		if (rc == 0)
			rc = rc2 < 0 ? rc2 : (int)closed;
	}
	rc2 = hm_inject_end(&s, stop_ns);
	if (rc == 0)
		rc = rc2;
	if (rc < 0) {
		if (ours >= 0)
			close(ours);
		return rc;
	}
	return ours;
}

/* --- uffd-wp tracker -------------------------------------------------------- */

int hm_tracker_attach(int32_t pid, hm_tracker **out, uint64_t *stop_ns)
{
	struct uffdio_api api = { .api = UFFD_API, .features = UFFD_WANT };
	hm_tracker *t;
	int pidfd, rc;

	if (pid <= 0)
		return -EINVAL;
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->pid = pid;
	t->uffd = t->pagemap = -1;
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0) {
		rc = errno == EINVAL ? -ESRCH : -errno; /* EINVAL: not a thread-group leader */
		goto fail;
	}
	/* Opened before the target is touched: a failure here leaves it be. */
	t->pagemap = proc_open(pid, "pagemap", O_RDONLY);
	if (t->pagemap < 0) {
		rc = t->pagemap;
		close(pidfd);
		goto fail;
	}
	t->uffd = steal_uffd(pid, pidfd, stop_ns);
	close(pidfd);
	if (t->uffd < 0) {
		rc = t->uffd;
		goto fail;
	}
	if (ioctl(t->uffd, UFFDIO_API, &api) < 0) {
		rc = errno == EINVAL ? -EOPNOTSUPP : -errno;
		goto fail;
	}
	if ((api.features & UFFD_WANT) != UFFD_WANT) {
		rc = -EOPNOTSUPP;
		goto fail;
	}
	*out = t;
	return 0;
fail:
	if (t->uffd >= 0)
		close(t->uffd);
	if (t->pagemap >= 0)
		close(t->pagemap);
	free(t);
	return rc;
}

int hm_tracker_register(hm_tracker *t, uint64_t start, uint64_t len)
{
	struct uffdio_register reg = { .range = { start, len }, .mode = UFFDIO_REGISTER_MODE_WP };
	struct uffdio_writeprotect wp = { .range = { start, len }, .mode = UFFDIO_WRITEPROTECT_MODE_WP };

	if (!page_aligned(start) || !page_aligned(len) || !len)
		return -EINVAL;
	if (ioctl(t->uffd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	/* Protect everything now (WP_UNPOPULATED: empty ptes get markers), so
	 * the first scan reports only what is written from here on. */
	while (ioctl(t->uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
		if (errno != EAGAIN)
			return -errno;
	}
	return 0;
}

int hm_tracker_unregister(hm_tracker *t, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };

	if (!page_aligned(start) || !page_aligned(len) || !len)
		return -EINVAL;
	return ioctl(t->uffd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

int hm_tracker_scan(hm_tracker *t, uint64_t start, uint64_t end, int protect, struct hm_page_region *out,
		    uint64_t max, uint64_t *n, uint64_t *next)
{
	struct pm_scan_arg arg = {
		.size = sizeof(arg),
		.flags = (protect ? PM_SCAN_WP_MATCHING : 0) | PM_SCAN_CHECK_WPASYNC,
		.start = start,
		.end = end,
		.vec = (uintptr_t)out,
		.vec_len = max,
		.category_mask = PAGE_IS_WRITTEN,
		.return_mask = PAGE_IS_WRITTEN,
	};
	int got;

	*n = 0;
	*next = start;
	if (!page_aligned(start) || !page_aligned(end) || end <= start || !max)
		return -EINVAL;
	got = ioctl(t->pagemap, PAGEMAP_SCAN, &arg);
	if (got < 0)
		return -errno;
	*n = (uint64_t)got;
	*next = arg.walk_end;
	return 0;
}

int hm_tracker_detach(hm_tracker *t)
{
	if (!t)
		return 0;
	/* The last reference: the kernel unregisters every VMA and clears the
	 * protection (ptes and markers) it left. */
	if (t->uffd >= 0)
		close(t->uffd);
	if (t->pagemap >= 0)
		close(t->pagemap);
	free(t);
	return 0;
}

/* --- page reading -------------------------------------------------------------- */

static int page_is_zero(const uint8_t *p)
{
	/* Word compares, stopping at the first non-zero word: a data page
	 * almost always fails on the first one. */
	for (size_t i = 0; i < PAGE_SZ; i += sizeof(uint64_t)) {
		uint64_t w;
		memcpy(&w, p + i, sizeof(w));
		if (w)
			return 0;
	}
	return 1;
}

/* Move the pages not flagged zero to the front of buf, in order: memmove
 * only from the first zero page on (data pages before it are in place). */
static uint64_t pack_pages(uint8_t *buf, uint64_t npages, const uint8_t *zero_bitmap)
{
	uint64_t k = 0;

	for (uint64_t i = 0; i < npages; i++) {
		if (zero_bitmap[i / 8] >> (i % 8) & 1)
			continue;
		if (k != i)
			memmove(buf + k * PAGE_SZ, buf + i * PAGE_SZ, PAGE_SZ);
		k++;
	}
	return k;
}

int64_t hm_read_pages(int32_t pid, uint64_t vaddr, uint64_t npages, uint8_t *buf, uint8_t *zero_bitmap,
		      uint64_t *ndata)
{
	uint64_t done = 0;
	pid_t tid;

	if (pid <= 0 || !page_aligned(vaddr) || (npages && !buf) || (ndata && !zero_bitmap))
		return -EINVAL;
	if (zero_bitmap)
		memset(zero_bitmap, 0, (npages + 7) / 8);
	while (done < npages) {
		uint64_t want = MIN(READ_BATCH_PAGES, npages - done);
		struct iovec local = { buf + done * PAGE_SZ, want * PAGE_SZ };
		struct iovec remote = { (void *)(uintptr_t)(vaddr + done * PAGE_SZ), want * PAGE_SZ };
		ssize_t got = process_vm_readv(pid, &local, 1, &remote, 1, 0);
		int err = errno;
		uint64_t pages;

		if (got < 0 && err == ESRCH && hm_pick_thread(pid, &tid) == 0 && tid != pid) {
			pid = tid; /* the leader is a zombie: read through a live thread */
			continue;
		}
		if (got < 0) {
			if (err == EFAULT)
				break; /* the next page cannot be read */
			return done ? (int64_t)done : -err;
		}
		pages = (uint64_t)got / PAGE_SZ;
		if (zero_bitmap)
			for (uint64_t i = done; i < done + pages; i++)
				if (page_is_zero(buf + i * PAGE_SZ))
					zero_bitmap[i / 8] |= (uint8_t)(1u << (i % 8));
		done += pages;
		if (pages < want)
			break; /* a partial read stops at the first unreadable page */
	}
	if (ndata)
		*ndata = pack_pages(buf, done, zero_bitmap);
	return (int64_t)done;
}

/* --- soft-dirty ------------------------------------------------------------------ */

int hm_softdirty_clear(int32_t pid)
{
	int fd = proc_open(pid, "clear_refs", O_WRONLY);
	ssize_t n;
	int err;

	if (fd < 0)
		return fd;
	n = write(fd, "4", 1);
	err = errno;
	close(fd);
	return n == 1 ? 0 : -err;
}

int hm_pagemap_ranges(const uint64_t *entries, uint64_t count, uint64_t base, uint64_t mask,
		      struct hm_page_region *out, uint64_t max, uint64_t *n, uint64_t *consumed)
{
	for (uint64_t i = 0; i < count; i++) {
		uint64_t addr = base + i * PAGE_SZ;

		if (!(entries[i] & mask))
			continue;
		if (*n && out[*n - 1].end == addr) {
			out[*n - 1].end += PAGE_SZ;
			continue;
		}
		if (*n >= max) {
			*consumed = i;
			return 0;
		}
		out[*n].start = addr;
		out[*n].end = addr + PAGE_SZ;
		out[*n].categories = 0;
		(*n)++;
	}
	*consumed = count;
	return 0;
}

int hm_softdirty_scan(int32_t pid, uint64_t start, uint64_t end, struct hm_page_region *out, uint64_t max,
		      uint64_t *n, uint64_t *next)
{
	uint64_t *entries, addr = start, consumed;
	int fd, rc = 0;

	*n = 0;
	*next = start;
	if (!page_aligned(start) || !page_aligned(end) || end <= start || !max)
		return -EINVAL;
	fd = proc_open(pid, "pagemap", O_RDONLY);
	if (fd < 0)
		return fd;
	entries = malloc(PAGEMAP_BATCH * sizeof(*entries));
	if (!entries) {
		close(fd);
		return -ENOMEM;
	}
	while (addr < end) {
		uint64_t want = MIN(PAGEMAP_BATCH, (end - addr) / PAGE_SZ);
		ssize_t got = pread(fd, entries, want * sizeof(*entries), (off_t)(addr / PAGE_SZ * sizeof(*entries)));

		if (got < 0) {
			rc = -errno;
			break;
		}
		if (got < (ssize_t)sizeof(*entries)) {
			rc = -EIO; /* past the end of the address space? */
			break;
		}
		want = (uint64_t)got / sizeof(*entries);
		hm_pagemap_ranges(entries, want, addr, 1ULL << HM_PAGEMAP_SOFT_DIRTY_BIT, out, max, n, &consumed);
		addr += consumed * PAGE_SZ;
		if (consumed < want)
			break; /* out is full */
	}
	free(entries);
	close(fd);
	*next = addr;
	return rc;
}

int hm_freeze_process(int32_t pid, hm_frozen **out, uint32_t *threads)
{
	hm_frozen *f;
	int rc;

	if (pid <= 0)
		return -EINVAL;
	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	rc = hm_freeze_all(pid, &f->set);
	if (rc < 0) {
		free(f);
		return rc;
	}
	if (threads)
		*threads = (uint32_t)f->set.n;
	*out = f;
	return 0;
}

int hm_thaw_process(hm_frozen *f, uint64_t *stop_ns)
{
	int rc;

	if (!f)
		return 0;
	rc = hm_thaw_all(&f->set, stop_ns);
	free(f);
	return rc;
}
