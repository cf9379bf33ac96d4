/* RAM page store: pages of many tasks, keyed by (task key, virtual address),
 * kept in native memory in 2 MiB chunks. Safe for one writer thread (network
 * or image loader) and the fault loop at once: each task has its own lock.
 * Functions return 0 or -errno. */
typedef struct hm_store hm_store;

/* The page size of every native module (and of hybridmig: the bindings export it). */
#define HM_PAGE_SIZE 4096

struct hm_store_stats {
	uint64_t tasks;
	uint64_t chunks;
	uint64_t pages_data;   /* pages held with their contents */
	uint64_t pages_zero;   /* pages known to be all zeros (held as a flag) */
	uint64_t bytes_mapped; /* chunk buffers currently mapped */
};

#define HM_PAGE_ABSENT 0
#define HM_PAGE_DATA   1
#define HM_PAGE_ZERO   2

int hm_store_new(hm_store **out);
void hm_store_free(hm_store *s);
int hm_store_put(hm_store *s, uint64_t key, uint64_t vaddr, const uint8_t *buf, uint64_t npages);
int hm_store_put_zero(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages);
/* npages pages at vaddr as a PAGES extent carries them: bit i of
 * zero_bitmap set, page i is all zeros (a flag); the others' data follow
 * each other in data, which holds ndata pages. Returns the data pages
 * used, or -EINVAL if data holds fewer than the extent needs. */
int64_t hm_store_put_pages(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages, const uint8_t *zero_bitmap,
			   const uint8_t *data, uint64_t ndata);
int hm_store_load_fd(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages, int fd, uint64_t offset);
int hm_store_invalidate(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages);
/* Pages of n (vaddr, npages) pairs become absent; their memory is kept
 * (no madvise): refilled soon, as post-copy's stale pages are. */
int hm_store_forget(hm_store *s, uint64_t key, const uint64_t *pairs, uint64_t n);
int hm_store_get(hm_store *s, uint64_t key, uint64_t vaddr, uint8_t *out);
int hm_store_count(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages, uint64_t *data, uint64_t *zero);
int hm_store_clone_task(hm_store *s, uint64_t src, uint64_t dst);
int hm_store_move(hm_store *s, uint64_t key, uint64_t from, uint64_t to, uint64_t npages);
int hm_store_drop_task(hm_store *s, uint64_t key);
/* Map the task's file-mapped pages into the page tables now: installing
 * them then never faults on the source. */
int hm_store_populate(hm_store *s, uint64_t key);
void hm_store_stats(hm_store *s, struct hm_store_stats *out);
