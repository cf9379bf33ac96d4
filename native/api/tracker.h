/* Dirty-page tracking of another (running) process for pre-copy rounds, and
 * fast reading of its pages. Functions return 0 or -errno unless said
 * otherwise; addresses and lengths are page aligned.
 *
 * uffd-wp tracker: a userfaultfd is opened inside the target by syscall
 * injection (the target is stopped for well under a millisecond), copied out
 * with pidfd_getfd and closed in the target again, so the target's fd table
 * ends as it was. Ranges registered in write-protect mode with
 * UFFD_FEATURE_WP_ASYNC: a write clears the page's protection in the kernel
 * with no message; PAGEMAP_SCAN returns the written pages and protects them
 * again in one atomic step. Closing the tracker drops every registration
 * (the kernel undoes them with the last reference to the userfaultfd, also
 * when the tracking process is killed). x86_64 only (-ENOTSUP elsewhere). */
typedef struct hm_tracker hm_tracker;

/* A range of pages [start, end). Same layout as the kernel's struct
 * page_region: categories holds the PAGE_IS_* bits of a PAGEMAP_SCAN
 * result, 0 for soft-dirty results. */
struct hm_page_region {
	uint64_t start;
	uint64_t end;
	uint64_t categories;
};

/* Bit of a /proc/PID/pagemap entry set for a soft-dirty page. */
#define HM_PAGEMAP_SOFT_DIRTY_BIT 55

/* Open a userfaultfd in process pid and keep it: -ESRCH no such process,
 * -EPERM not permitted (ptrace or userfaultfd), -EOPNOTSUPP the kernel lacks
 * UFFD_FEATURE_WP_ASYNC / WP_UNPOPULATED, -ECANCELED the thread has a
 * seccomp filter (or strict mode) that this process may not suspend while
 * injecting (it needs CAP_SYS_ADMIN and no seccomp of its own): nothing was
 * run in the target, whose filter might have killed it. The leader thread is borrowed, or
 * another thread if the leader is a zombie. *stop_ns: how long the thread
 * was held, from PTRACE_INTERRUPT to PTRACE_DETACH (an upper bound). */
int hm_tracker_attach(int32_t pid, hm_tracker **out, uint64_t *stop_ns);
/* Register [start, start + len) (whole VMAs) in write-protect mode and
 * write-protect it: the next scan reports only pages written after this.
 * -EBUSY another userfaultfd owns a VMA there; -EINVAL a VMA that cannot be
 * tracked or a gap; -ESRCH the process is gone. */
int hm_tracker_register(hm_tracker *t, uint64_t start, uint64_t len);
int hm_tracker_unregister(hm_tracker *t, uint64_t start, uint64_t len);
/* Pages of [start, end) written since they were last protected, protected
 * again atomically if protect (else left as they are); up to max regions in
 * out, *n of them. *next is where the scan stopped: end when complete, else
 * call again from *next (out was full; pages from *next on were neither
 * reported nor protected). -EPERM: a part of the range is not registered (a
 * VMA there was replaced): nothing about the range can be trusted,
 * re-register it and treat it as written. */
int hm_tracker_scan(hm_tracker *t, uint64_t start, uint64_t end, int protect, struct hm_page_region *out,
		    uint64_t max, uint64_t *n, uint64_t *next);
/* Close the userfaultfd (the kernel unregisters everything) and free t. */
int hm_tracker_detach(hm_tracker *t);

/* Run one system call nr(args[0..5]) inside pid by injection; *ret is its
 * return value (-errno from the target's kernel), *stop_ns how long the
 * thread was held; -ECANCELED as for hm_tracker_attach. For tests and
 * diagnostics. */
int hm_remote_syscall(int32_t pid, int64_t nr, const int64_t *args, int64_t *ret, uint64_t *stop_ns);

/* Read npages pages of pid at vaddr into buf (npages * 4096 bytes) with
 * process_vm_readv, 4 MiB per call, and set bit i of zero_bitmap
 * ((npages + 7) / 8 bytes, may be NULL) for each all-zero page i. With
 * ndata (zero_bitmap then required), the pages that are not all zeros are
 * packed to the front of buf, in order, and *ndata is their count: a PAGES
 * body's data, read in place. Returns the number of pages read: fewer than
 * npages when a page cannot be read (e.g. unmapped meanwhile), which is then
 * the page at vaddr + returned * 4096; or -errno (-ESRCH, -EPERM) when
 * nothing could. */
int64_t hm_read_pages(int32_t pid, uint64_t vaddr, uint64_t npages, uint8_t *buf, uint8_t *zero_bitmap,
		      uint64_t *ndata);

/* Soft-dirty fallback (kernels without WP_ASYNC but with
 * CONFIG_MEM_SOFT_DIRTY): clear every soft-dirty bit of pid (clear_refs 4). */
int hm_softdirty_clear(int32_t pid);
/* Pages of [start, end) of pid whose pagemap entry has the soft-dirty bit,
 * as regions; *n, *next as for hm_tracker_scan. Nothing is cleared. */
int hm_softdirty_scan(int32_t pid, uint64_t start, uint64_t end, struct hm_page_region *out, uint64_t max,
		      uint64_t *n, uint64_t *next);
/* The parser behind it: entries are count pagemap entries, the first for
 * the page at base; pages whose entry has any bit of mask are appended to
 * out as regions, extending out[*n - 1] when adjacent (*n is the number of
 * regions already in out, and is updated). *consumed is the number of
 * entries handled: count, or the index of the first page that did not fit. */
int hm_pagemap_ranges(const uint64_t *entries, uint64_t count, uint64_t base, uint64_t mask,
		      struct hm_page_region *out, uint64_t max, uint64_t *n, uint64_t *consumed);

/* Every thread of pid held in a ptrace stop (soft-dirty read + clear must
 * not race with the target's writes). */
typedef struct hm_frozen hm_frozen;
int hm_freeze_process(int32_t pid, hm_frozen **out, uint32_t *threads);
/* Let every thread go and free f; *stop_ns: how long it was frozen. */
int hm_thaw_process(hm_frozen *f, uint64_t *stop_ns);
