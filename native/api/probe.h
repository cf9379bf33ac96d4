/* Probes of what the running kernel offers: userfaultfd and its features,
 * the PAGEMAP_SCAN ioctl with asynchronous write protection, soft-dirty,
 * process_vm_readv, pidfd_getfd. Each works on the calling process only,
 * leaves nothing behind, and returns 0 or -errno. */

/* userfaultfd features: the UFFD_FEATURE_* bits of the 6.8 uapi. */
#define HM_UFFD_FEATURE_PAGEFAULT_FLAG_WP  1
#define HM_UFFD_FEATURE_EVENT_FORK	   2
#define HM_UFFD_FEATURE_EVENT_REMAP	   4
#define HM_UFFD_FEATURE_EVENT_REMOVE	   8
#define HM_UFFD_FEATURE_MISSING_HUGETLBFS  16
#define HM_UFFD_FEATURE_MISSING_SHMEM	   32
#define HM_UFFD_FEATURE_EVENT_UNMAP	   64
#define HM_UFFD_FEATURE_SIGBUS		   128
#define HM_UFFD_FEATURE_THREAD_ID	   256
#define HM_UFFD_FEATURE_MINOR_HUGETLBFS	   512
#define HM_UFFD_FEATURE_MINOR_SHMEM	   1024
#define HM_UFFD_FEATURE_EXACT_ADDRESS	   2048
#define HM_UFFD_FEATURE_WP_HUGETLBFS_SHMEM 4096
#define HM_UFFD_FEATURE_WP_UNPOPULATED	   8192
#define HM_UFFD_FEATURE_POISON		   16384
#define HM_UFFD_FEATURE_WP_ASYNC	   32768
#define HM_UFFD_FEATURE_MOVE		   65536

/* How to open a userfaultfd (hm_probe_uffd_open). */
#define HM_UFFD_OPEN_SYSCALL   0 /* userfaultfd(2): what CRIU's lazy restore uses */
#define HM_UFFD_OPEN_USER_ONLY 1 /* userfaultfd(2) with UFFD_USER_MODE_ONLY: always allowed */
#define HM_UFFD_OPEN_DEV       2 /* /dev/userfaultfd, USERFAULTFD_IOC_NEW (6.1+) */

/* Open a userfaultfd the first way that works (syscall, user-mode-only
 * syscall, /dev/userfaultfd) and learn the features and ioctls the kernel
 * supports; *via_dev is 1 when it took /dev/userfaultfd. -errno of the
 * plain syscall when no way works. */
int hm_probe_uffd(uint64_t *features, uint64_t *ioctls, int *via_dev);
/* The same through one given way (HM_UFFD_OPEN_*), asking the kernel to
 * grant the features in `want`: -EINVAL if it lacks one, -EPERM if it
 * refuses one (EVENT_FORK needs CAP_SYS_PTRACE). */
int hm_probe_uffd_open(int how, uint64_t want, uint64_t *features, uint64_t *ioctls);
/* 0 when a page written after uffd-wp async protection is reported by
 * PAGEMAP_SCAN as PAGE_IS_WRITTEN (and the others are not). */
int hm_probe_pagemap_scan(void);
/* 0 when clear_refs 4 clears and a write sets pagemap bit 55, else
 * -EOPNOTSUPP (kernel built without CONFIG_MEM_SOFT_DIRTY). */
int hm_probe_soft_dirty(void);
/* 0 when process_vm_readv reads this process's memory correctly. */
int hm_probe_process_vm_readv(void);
/* 0 when pidfd_open + pidfd_getfd duplicate one of this process's fds. */
int hm_probe_pidfd_getfd(void);
