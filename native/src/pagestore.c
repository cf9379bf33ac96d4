/* RAM page store. A task's pages live in 2 MiB chunks, sorted by address;
 * each chunk has a lazily mapped buffer and two bitmaps: pages held with
 * data, and pages known to be zero (which need no buffer at all). */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"
#include "store_internal.h"

#define BITMAP_WORDS (CHUNK_PAGES / 64)

struct chunk {
	uint64_t base;
	uint8_t *buf; /* CHUNK_SZ bytes, mapped while ndata > 0 */
	uint64_t data[BITMAP_WORDS];
	uint64_t zero[BITMAP_WORDS];
	uint32_t ndata, nzero;
};

struct store_task {
	uint64_t key;
	pthread_mutex_t lock;
	struct chunk **chunks; /* sorted by base */
	uint64_t n, cap;
	struct store_task *next;
};

struct hm_store {
	pthread_mutex_t lock; /* guards the task list, not the tasks */
	struct store_task *tasks;
};

static inline int bit_test(const uint64_t *bm, uint64_t i)
{
	return (bm[i / 64] >> (i % 64)) & 1;
}

static inline void bit_set(uint64_t *bm, uint64_t i)
{
	bm[i / 64] |= 1ULL << (i % 64);
}

static inline void bit_clear(uint64_t *bm, uint64_t i)
{
	bm[i / 64] &= ~(1ULL << (i % 64));
}

static int page_kind(const struct chunk *c, uint64_t i)
{
	if (bit_test(c->data, i))
		return HM_PAGE_DATA;
	if (bit_test(c->zero, i))
		return HM_PAGE_ZERO;
	return HM_PAGE_ABSENT;
}

/* Index of the first chunk with base >= `base`. */
static uint64_t chunk_index(const struct store_task *t, uint64_t base)
{
	uint64_t lo = 0, hi = t->n;

	while (lo < hi) {
		uint64_t mid = (lo + hi) / 2;
		if (t->chunks[mid]->base < base)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static struct chunk *find_chunk(struct store_task *t, uint64_t addr, int create)
{
	uint64_t base = CHUNK_BASE(addr), i = chunk_index(t, base);
	struct chunk *c;

	if (i < t->n && t->chunks[i]->base == base)
		return t->chunks[i];
	if (!create)
		return NULL;
	if (t->n == t->cap) {
		uint64_t cap = t->cap * 2 + 16;
		struct chunk **v = realloc(t->chunks, cap * sizeof(*v));
		if (!v)
			return NULL;
		t->chunks = v;
		t->cap = cap;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return NULL;
	c->base = base;
	memmove(&t->chunks[i + 1], &t->chunks[i], (t->n - i) * sizeof(*t->chunks));
	t->chunks[i] = c;
	t->n++;
	return c;
}

static int chunk_buffer(struct chunk *c)
{
	void *p;

	if (c->buf)
		return 0;
	/* NORESERVE: only the pages actually filled cost memory. */
	p = mmap(NULL, CHUNK_SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		return -errno;
	c->buf = p;
	return 0;
}

/* Drop the buffer of a chunk without data (into g, if given, to be unmapped
 * later) and the chunk itself once empty. */
static void chunk_trim_into(struct store_task *t, struct chunk *c, struct store_garbage *g)
{
	uint64_t i;

	if (c->ndata == 0 && c->buf) {
		if (g && g->n < STORE_GARBAGE_MAX)
			g->bufs[g->n++] = c->buf;
		else
			munmap(c->buf, CHUNK_SZ);
		c->buf = NULL;
	}
	if (c->ndata || c->nzero)
		return;
	i = chunk_index(t, c->base);
	memmove(&t->chunks[i], &t->chunks[i + 1], (t->n - i - 1) * sizeof(c));
	t->n--;
	free(c);
}

static void chunk_trim(struct store_task *t, struct chunk *c)
{
	chunk_trim_into(t, c, NULL);
}

static int addr_cmp(const void *a, const void *b)
{
	uintptr_t x = (uintptr_t)*(void *const *)a, y = (uintptr_t)*(void *const *)b;

	return x < y ? -1 : x > y;
}

void store_garbage_free(struct store_garbage *g)
{
	int i, j;

	qsort(g->bufs, g->n, sizeof(g->bufs[0]), addr_cmp);
	for (i = 0; i < g->n; i = j) {
		for (j = i + 1; j < g->n && (uint8_t *)g->bufs[j] == (uint8_t *)g->bufs[j - 1] + CHUNK_SZ; j++)
			;
		munmap(g->bufs[i], (j - i) * CHUNK_SZ);
	}
	g->n = 0;
}

/* Mark pages [first, first+n) of a chunk as `kind`. */
static void mark(struct chunk *c, uint64_t first, uint64_t n, int kind)
{
	uint64_t i;

	for (i = first; i < first + n; i++) {
		if (bit_test(c->data, i)) {
			bit_clear(c->data, i);
			c->ndata--;
		}
		if (bit_test(c->zero, i)) {
			bit_clear(c->zero, i);
			c->nzero--;
		}
		if (kind == HM_PAGE_DATA) {
			bit_set(c->data, i);
			c->ndata++;
		} else if (kind == HM_PAGE_ZERO) {
			bit_set(c->zero, i);
			c->nzero++;
		}
	}
}

struct store_task *store_task(hm_store *s, uint64_t key, int create)
{
	struct store_task *t;

	pthread_mutex_lock(&s->lock);
	for (t = s->tasks; t; t = t->next)
		if (t->key == key)
			break;
	if (!t && create) {
		t = calloc(1, sizeof(*t));
		if (t) {
			t->key = key;
			pthread_mutex_init(&t->lock, NULL);
			t->next = s->tasks;
			s->tasks = t;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return t;
}

void store_task_lock(struct store_task *t)
{
	pthread_mutex_lock(&t->lock);
}

void store_task_unlock(struct store_task *t)
{
	pthread_mutex_unlock(&t->lock);
}

static void task_clear(struct store_task *t)
{
	uint64_t i;

	for (i = 0; i < t->n; i++) {
		if (t->chunks[i]->buf)
			munmap(t->chunks[i]->buf, CHUNK_SZ);
		free(t->chunks[i]);
	}
	t->n = 0;
}

static int check_range(uint64_t vaddr, uint64_t npages)
{
	if (vaddr & (PAGE_SZ - 1))
		return -EINVAL;
	if (npages > (UINT64_MAX - vaddr) / PAGE_SZ)
		return -ERANGE;
	return 0;
}

int hm_store_new(hm_store **out)
{
	hm_store *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	pthread_mutex_init(&s->lock, NULL);
	*out = s;
	return 0;
}

void hm_store_free(hm_store *s)
{
	struct store_task *t, *next;

	if (!s)
		return;
	for (t = s->tasks; t; t = next) {
		next = t->next;
		task_clear(t);
		free(t->chunks);
		pthread_mutex_destroy(&t->lock);
		free(t);
	}
	pthread_mutex_destroy(&s->lock);
	free(s);
}

/*
 * Walk [vaddr, vaddr + npages) chunk by chunk with the task locked for one
 * chunk at a time, so that a bulk load never holds off the fault loop for
 * longer than one chunk's worth of copying.
 */
typedef int (*chunk_fn)(struct store_task *t, struct chunk *c, uint64_t first, uint64_t n, uint64_t done, void *arg);

static int for_each_chunk(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages, int create, chunk_fn fn, void *arg)
{
	struct store_task *t;
	uint64_t done = 0;
	int rc = check_range(vaddr, npages);

	if (rc)
		return rc;
	t = store_task(s, key, create);
	if (!t)
		return create ? -ENOMEM : 0;
	while (done < npages) {
		uint64_t addr = vaddr + done * PAGE_SZ;
		uint64_t first = PAGE_IN_CHUNK(addr);
		uint64_t n = MIN(npages - done, CHUNK_PAGES - first);
		uint64_t next = UINT64_MAX;
		struct chunk *c;

		pthread_mutex_lock(&t->lock);
		c = find_chunk(t, addr, create);
		if (c)
			rc = fn(t, c, first, n, done, arg);
		else if (create)
			rc = -ENOMEM;
		else if (chunk_index(t, CHUNK_BASE(addr)) < t->n)
			next = t->chunks[chunk_index(t, CHUNK_BASE(addr))]->base;
		pthread_mutex_unlock(&t->lock);
		if (rc)
			return rc;
		if (c || create) {
			done += n;
			continue;
		}
		/* Nothing held here: on to the next chunk held, so that a call
		 * costs what the range holds, not its length (an INVALIDATE of a
		 * whole address space). */
		if (next >= vaddr + npages * PAGE_SZ)
			break;
		done = (next - vaddr) / PAGE_SZ;
	}
	return 0;
}

/* Runs of at least this many pages are populated before the copy: one
 * madvise allocates their pages without a fault each (pre-copy's first
 * round: puts into fresh chunks, 0.44 -> 0.33 CPU s/GiB here). Transparent
 * huge pages were tried too: 0.2 s/GiB when free huge pages were at hand,
 * 0.5-2.6 when the kernel had to compact memory for them first (this
 * machine's defrag setting: madvise, so stalls), so not used. Nor a
 * thread that populates buffers ahead of the puts (64 MiB, within serve's
 * quota): the putting thread's CPU halved (0.33 -> 0.16 s/GiB), the
 * process's grew (0.36), and round 0 was no faster on 2 vCPUs, where the
 * first touch's cost is CPU time wherever it is paid (docs/results.md). */
#define POPULATE_MIN_PAGES 64

static int put_chunk(struct store_task *t, struct chunk *c, uint64_t first, uint64_t n, uint64_t done, void *arg)
{
	const uint8_t *buf = arg;
	int rc = chunk_buffer(c);

	if (rc)
		return rc;
	/* the pages may be mapped read-only from a file (load_chunk) */
	if (mprotect(c->buf + first * PAGE_SZ, n * PAGE_SZ, PROT_READ | PROT_WRITE))
		return -errno;
	/* a hint: on kernels without it (before 5.14) the copy faults them in */
	if (n >= POPULATE_MIN_PAGES)
		madvise(c->buf + first * PAGE_SZ, n * PAGE_SZ, MADV_POPULATE_WRITE);
	memcpy(c->buf + first * PAGE_SZ, buf + done * PAGE_SZ, n * PAGE_SZ);
	mark(c, first, n, HM_PAGE_DATA);
	return 0;
}

int hm_store_put(hm_store *s, uint64_t key, uint64_t vaddr, const uint8_t *buf, uint64_t npages)
{
	return for_each_chunk(s, key, vaddr, npages, 1, put_chunk, (void *)buf);
}

static int put_zero_chunk(struct store_task *t, struct chunk *c, uint64_t first, uint64_t n, uint64_t done, void *arg)
{
	mark(c, first, n, HM_PAGE_ZERO);
	chunk_trim(t, c);
	return 0;
}

int hm_store_put_zero(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages)
{
	return for_each_chunk(s, key, vaddr, npages, 1, put_zero_chunk, NULL);
}

int64_t hm_store_put_pages(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages, const uint8_t *zero_bitmap,
			   const uint8_t *data, uint64_t ndata)
{
	uint64_t used = 0, i = 0;
	int rc = check_range(vaddr, npages);

	if (rc)
		return rc;
	/* one call per run of zero or data pages, in address order: a later
	 * page of the extent overrides nothing of an earlier one */
	while (i < npages) {
		int zero = zero_bitmap[i / 8] >> (i % 8) & 1;
		uint64_t j = i + 1;

		while (j < npages && (zero_bitmap[j / 8] >> (j % 8) & 1) == zero)
			j++;
		if (zero) {
			rc = hm_store_put_zero(s, key, vaddr + i * PAGE_SZ, j - i);
		} else if (ndata - used < j - i) {
			rc = -EINVAL;
		} else {
			rc = hm_store_put(s, key, vaddr + i * PAGE_SZ, data + used * PAGE_SZ, j - i);
			used += j - i;
		}
		if (rc)
			return rc;
		i = j;
	}
	return (int64_t)used;
}

struct load_arg {
	int fd;
	uint64_t offset;
};

/*
 * Pages of a file are mapped into the chunk, not copied: a private mapping of
 * the page cache costs no allocation and no copy here, and UFFDIO_COPY reads
 * straight from it. A later put() of the same page makes it writable and
 * copies on write as usual.
 * The file must not shrink while mapped: reading a page past its new end
 * raises SIGBUS (the daemon serves images that no one else writes).
 */
static int load_chunk(struct store_task *t, struct chunk *c, uint64_t first, uint64_t n, uint64_t done, void *arg)
{
	struct load_arg *la = arg;
	void *p;
	int rc = chunk_buffer(c);

	if (rc)
		return rc;
	/* Read only: nothing writes through it (put() makes a page writable
	 * first). Not MAP_POPULATE: populating here, under the task lock, kept
	 * the fault loop waiting; the loop's UFFDIO_COPY maps each page itself. */
	p = mmap(c->buf + first * PAGE_SZ, n * PAGE_SZ, PROT_READ, MAP_PRIVATE | MAP_FIXED, la->fd,
		 la->offset + done * PAGE_SZ);
	if (p == MAP_FAILED) {
		rc = -errno;
		chunk_trim(t, c);
		return rc;
	}
	mark(c, first, n, HM_PAGE_DATA);
	return 0;
}

int hm_store_load_fd(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages, int fd, uint64_t offset)
{
	struct load_arg la = { fd, offset };
	struct stat st;

	if (offset & (PAGE_SZ - 1))
		return -EINVAL;
	if (fstat(fd, &st))
		return -errno;
	/* A mapping past the end of the file would fault when installed. */
	if ((uint64_t)st.st_size < offset || ((uint64_t)st.st_size - offset) / PAGE_SZ < npages)
		return -ENODATA;
	return for_each_chunk(s, key, vaddr, npages, 1, load_chunk, &la);
}

static int invalidate_chunk(struct store_task *t, struct chunk *c, uint64_t first, uint64_t n, uint64_t done, void *arg)
{
	mark(c, first, n, HM_PAGE_ABSENT);
	if (c->buf && c->ndata)
		madvise(c->buf + first * PAGE_SZ, n * PAGE_SZ, MADV_DONTNEED);
	chunk_trim(t, c);
	return 0;
}

int hm_store_invalidate(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages)
{
	return for_each_chunk(s, key, vaddr, npages, 0, invalidate_chunk, NULL);
}

static int forget_chunk(struct store_task *t, struct chunk *c, uint64_t first, uint64_t n, uint64_t done, void *arg)
{
	mark(c, first, n, HM_PAGE_ABSENT);
	chunk_trim(t, c);
	return 0;
}

/*
 * Post-copy's STALE: tens of thousands of scattered runs dropped while the
 * process is frozen. Without invalidate's madvise per run (its syscall and
 * TLB flush: 0.33 s for 55 000 runs of 1 GiB, in the blackout): the memory
 * stays with its chunk, and the source pushes these very pages again soon.
 */
int hm_store_forget(hm_store *s, uint64_t key, const uint64_t *pairs, uint64_t n)
{
	uint64_t i;
	int rc = 0;

	for (i = 0; i < n && !rc; i++)
		rc = for_each_chunk(s, key, pairs[2 * i], pairs[2 * i + 1], 0, forget_chunk, NULL);
	return rc;
}

int hm_store_get(hm_store *s, uint64_t key, uint64_t vaddr, uint8_t *out)
{
	struct store_task *t;
	struct chunk *c;
	int kind = HM_PAGE_ABSENT, rc = check_range(vaddr, 1);

	if (rc)
		return rc;
	t = store_task(s, key, 0);
	if (!t)
		return HM_PAGE_ABSENT;
	pthread_mutex_lock(&t->lock);
	c = find_chunk(t, vaddr, 0);
	if (c)
		kind = page_kind(c, PAGE_IN_CHUNK(vaddr));
	if (kind == HM_PAGE_DATA)
		memcpy(out, c->buf + PAGE_IN_CHUNK(vaddr) * PAGE_SZ, PAGE_SZ);
	pthread_mutex_unlock(&t->lock);
	return kind;
}

struct counts {
	uint64_t data, zero;
};

static int count_chunk(struct store_task *t, struct chunk *c, uint64_t first, uint64_t n, uint64_t done, void *arg)
{
	struct counts *cnt = arg;
	uint64_t i;

	for (i = first; i < first + n; i++) {
		cnt->data += bit_test(c->data, i);
		cnt->zero += bit_test(c->zero, i);
	}
	return 0;
}

int hm_store_count(hm_store *s, uint64_t key, uint64_t vaddr, uint64_t npages, uint64_t *data, uint64_t *zero)
{
	struct counts cnt = { 0, 0 };
	int rc = for_each_chunk(s, key, vaddr, npages, 0, count_chunk, &cnt);

	*data = cnt.data;
	*zero = cnt.zero;
	return rc;
}

/* A forked child owes the same pages as its parent: it gets its own copy of
 * the parent's pages, since each of the two releases them as it installs. */
int hm_store_clone_task(hm_store *s, uint64_t src, uint64_t dst)
{
	struct store_task *from = store_task(s, src, 0), *to;
	uint64_t i;
	int rc = 0;

	if (src == dst)
		return -EINVAL;
	to = store_task(s, dst, 1);
	if (!to)
		return -ENOMEM;
	if (!from)
		return 0;
	pthread_mutex_lock(&from->lock);
	pthread_mutex_lock(&to->lock);
	task_clear(to);
	for (i = 0; i < from->n && !rc; i++) {
		struct chunk *sc = from->chunks[i], *dc = find_chunk(to, sc->base, 1);

		if (!dc) {
			rc = -ENOMEM;
			break;
		}
		memcpy(dc->data, sc->data, sizeof(sc->data));
		memcpy(dc->zero, sc->zero, sizeof(sc->zero));
		dc->ndata = sc->ndata;
		dc->nzero = sc->nzero;
		if (sc->ndata) {
			uint64_t p;

			rc = chunk_buffer(dc);
			/* only the pages held: the rest of a chunk costs nothing */
			for (p = 0; !rc && p < CHUNK_PAGES; p++)
				if (bit_test(sc->data, p))
					memcpy(dc->buf + p * PAGE_SZ, sc->buf + p * PAGE_SZ, PAGE_SZ);
		}
	}
	pthread_mutex_unlock(&to->lock);
	pthread_mutex_unlock(&from->lock);
	return rc;
}

/*
 * Move n pages from src to dst, where neither side crosses a chunk end (the
 * two may be the same chunk, overlapping). The kinds are read first, data
 * goes over in runs of consecutive data pages (memmove: overlap is fine),
 * with one mprotect for the whole destination run (a page may be mapped
 * read-only from a file): per page, mprotect split the chunk's mapping into
 * as many VMAs, and a large mremap cost a syscall a page.
 */
static int move_run(struct store_task *t, uint64_t src, uint64_t dst, uint64_t n)
{
	struct chunk *sc = find_chunk(t, src, 0), *dc;
	uint64_t si = PAGE_IN_CHUNK(src), di = PAGE_IN_CHUNK(dst), i, j;
	uint8_t kinds[CHUNK_PAGES];
	int any = 0, any_data = 0;

	for (i = 0; i < n; i++) {
		kinds[i] = sc ? page_kind(sc, si + i) : HM_PAGE_ABSENT;
		any |= kinds[i] != HM_PAGE_ABSENT;
		any_data |= kinds[i] == HM_PAGE_DATA;
	}
	/* chunks are allocated one by one: sc stays valid if this grows the array */
	dc = find_chunk(t, dst, any);
	if (!dc)
		return any ? -ENOMEM : 0;
	if (any_data) {
		int rc = chunk_buffer(dc);

		if (rc)
			return rc;
		if (mprotect(dc->buf + di * PAGE_SZ, n * PAGE_SZ, PROT_READ | PROT_WRITE))
			return -errno;
		/* run by run, in the order that never overwrites source pages of
		 * a run not moved yet (the same chunk may be both sides) */
		int up = dst > src;

		for (i = 0; i < n; i = j) {
			uint64_t a, b; /* [a, b): a run of data pages, taken from the end when moving up */

			for (j = i + 1; j < n && (kinds[up ? n - 1 - j : j] == HM_PAGE_DATA) ==
							 (kinds[up ? n - 1 - i : i] == HM_PAGE_DATA);
			     j++)
				;
			a = up ? n - j : i;
			b = up ? n - i : j;
			if (kinds[a] == HM_PAGE_DATA)
				memmove(dc->buf + (di + a) * PAGE_SZ, sc->buf + (si + a) * PAGE_SZ, (b - a) * PAGE_SZ);
		}
	}
	for (i = 0; i < n; i = j) {
		for (j = i + 1; j < n && kinds[j] == kinds[i]; j++)
			;
		mark(dc, di + i, j - i, kinds[i]);
	}
	chunk_trim(t, dc);
	return 0;
}

/* mremap moved pages: their contents follow them to the new address. */
int hm_store_move(hm_store *s, uint64_t key, uint64_t from, uint64_t to, uint64_t npages)
{
	struct store_task *t;
	uint64_t done = 0, len = npages * PAGE_SZ, gone, ngone;
	int rc = check_range(from, npages) ?: check_range(to, npages);

	if (rc)
		return rc;
	if (from == to || !npages)
		return 0;
	t = store_task(s, key, 0);
	if (!t)
		return 0;
	pthread_mutex_lock(&t->lock);
	/* In runs that cross no chunk end on either side, in the order that
	 * never overwrites a source page not yet moved: from the end when
	 * moving up, from the start when moving down. */
	while (done < npages && !rc) {
		uint64_t left = npages - done, n, off;

		if (to > from) {
			uint64_t s_end = from + left * PAGE_SZ, d_end = to + left * PAGE_SZ;
			uint64_t s_room = PAGE_IN_CHUNK(s_end - 1) + 1, d_room = PAGE_IN_CHUNK(d_end - 1) + 1;

			n = MIN(left, MIN(s_room, d_room));
			off = (left - n) * PAGE_SZ;
		} else {
			uint64_t s_room = CHUNK_PAGES - PAGE_IN_CHUNK(from + done * PAGE_SZ);
			uint64_t d_room = CHUNK_PAGES - PAGE_IN_CHUNK(to + done * PAGE_SZ);

			n = MIN(left, MIN(s_room, d_room));
			off = done * PAGE_SZ;
		}
		rc = move_run(t, from + off, to + off, n);
		done += n;
	}
	pthread_mutex_unlock(&t->lock);
	if (rc)
		return rc;
	/* Source pages outside the destination range are gone from there. */
	if (to >= from + len || to + len <= from)
		gone = from, ngone = npages;
	else if (to > from)
		gone = from, ngone = (to - from) / PAGE_SZ;
	else
		gone = to + len, ngone = (from - to) / PAGE_SZ;
	return hm_store_invalidate(s, key, gone, ngone);
}

/*
 * Map every page of the task that is mapped from a file into this process's
 * page tables now (MADV_POPULATE_READ: read-only, page tables only, no copy
 * and no memory but the page cache the file already holds). A UFFDIO_COPY
 * whose source page is not mapped yet fails its atomic copy, drops the
 * target's locks, faults the page in and starts over; that fault takes this
 * process's mmap lock, and so waits behind any munmap of a released chunk
 * (~50 us): installer copies of 16 pages took 100 us and more instead of
 * 20. Meant for before the restore starts: it holds the task lock for the
 * whole task.
 */
int hm_store_populate(hm_store *s, uint64_t key)
{
	struct store_task *t = store_task(s, key, 0);
	uint64_t i;
	int rc = 0;

	if (!t)
		return 0;
	pthread_mutex_lock(&t->lock);
	for (i = 0; i < t->n && !rc; i++) {
		struct chunk *c = t->chunks[i];

		if (c->buf && c->ndata && madvise(c->buf, CHUNK_SZ, MADV_POPULATE_READ))
			rc = -errno;
	}
	pthread_mutex_unlock(&t->lock);
	return rc;
}

int hm_store_drop_task(hm_store *s, uint64_t key)
{
	struct store_task **pp, *t = NULL;

	pthread_mutex_lock(&s->lock);
	for (pp = &s->tasks; *pp; pp = &(*pp)->next) {
		if ((*pp)->key == key) {
			t = *pp;
			*pp = t->next;
			break;
		}
	}
	pthread_mutex_unlock(&s->lock);
	if (!t)
		return -ENOENT;
	task_clear(t);
	free(t->chunks);
	pthread_mutex_destroy(&t->lock);
	free(t);
	return 0;
}

void hm_store_stats(hm_store *s, struct hm_store_stats *out)
{
	struct store_task *t;
	uint64_t i;

	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&s->lock);
	for (t = s->tasks; t; t = t->next) {
		out->tasks++;
		pthread_mutex_lock(&t->lock);
		for (i = 0; i < t->n; i++) {
			out->chunks++;
			out->pages_data += t->chunks[i]->ndata;
			out->pages_zero += t->chunks[i]->nzero;
			out->bytes_mapped += t->chunks[i]->buf ? CHUNK_SZ : 0;
		}
		pthread_mutex_unlock(&t->lock);
	}
	pthread_mutex_unlock(&s->lock);
}

int store_run(struct store_task *t, uint64_t vaddr, uint64_t max_pages, uint64_t *npages, const uint8_t **data)
{
	struct chunk *c = find_chunk(t, vaddr, 0);
	uint64_t first = PAGE_IN_CHUNK(vaddr), i;
	uint64_t limit = MIN(max_pages, CHUNK_PAGES - first);
	int kind;

	*data = NULL;
	if (!c) {
		*npages = limit;
		return HM_PAGE_ABSENT;
	}
	kind = page_kind(c, first);
	for (i = first + 1; i < first + limit && page_kind(c, i) == kind; i++)
		;
	*npages = i - first;
	if (kind == HM_PAGE_DATA)
		*data = c->buf + first * PAGE_SZ;
	return kind;
}

void store_release(struct store_task *t, uint64_t vaddr, uint64_t npages, struct store_garbage *g)
{
	while (npages) {
		uint64_t first = PAGE_IN_CHUNK(vaddr), n = MIN(npages, CHUNK_PAGES - first);
		struct chunk *c = find_chunk(t, vaddr, 0);

		if (c) {
			mark(c, first, n, HM_PAGE_ABSENT);
			chunk_trim_into(t, c, g);
		}
		vaddr += n * PAGE_SZ;
		npages -= n;
	}
}
