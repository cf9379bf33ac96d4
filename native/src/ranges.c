/* Interval lists as sorted arrays. Lists stay short (one interval per lazy
 * VMA part, split only where faults punched holes), so binary search plus
 * memmove beats any tree here. Every function returns 0 or -errno. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "ranges.h"

struct range {
	uint64_t start, end;
};

struct hm_ranges {
	struct range *v;
	uint64_t n, cap;
};

int hm_ranges_new(hm_ranges **out)
{
	*out = calloc(1, sizeof(hm_ranges));
	return *out ? 0 : -ENOMEM;
}

void hm_ranges_free(hm_ranges *r)
{
	if (!r)
		return;
	free(r->v);
	free(r);
}

static int reserve(hm_ranges *r, uint64_t n)
{
	struct range *v;
	uint64_t cap;

	if (n <= r->cap)
		return 0;
	cap = MAX(n, r->cap * 2 + 8);
	v = realloc(r->v, cap * sizeof(*v));
	if (!v)
		return -ENOMEM;
	r->v = v;
	r->cap = cap;
	return 0;
}

/* Index of the first range whose end is > addr (n if none). */
static uint64_t lower(const hm_ranges *r, uint64_t addr)
{
	uint64_t lo = 0, hi = r->n;

	while (lo < hi) {
		uint64_t mid = (lo + hi) / 2;
		if (r->v[mid].end <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

int hm_ranges_add(hm_ranges *r, uint64_t start, uint64_t end)
{
	uint64_t i, j;

	if (start >= end)
		return start == end ? 0 : -EINVAL;
	/* first range touching or after start (adjacent ranges merge) */
	i = lower(r, start ? start - 1 : 0);
	j = i;
	while (j < r->n && r->v[j].start <= end) {
		start = MIN(start, r->v[j].start);
		end = MAX(end, r->v[j].end);
		j++;
	}
	if (j == i) {
		if (reserve(r, r->n + 1))
			return -ENOMEM;
		memmove(&r->v[i + 1], &r->v[i], (r->n - i) * sizeof(struct range));
		r->n++;
	} else if (j > i + 1) {
		memmove(&r->v[i + 1], &r->v[j], (r->n - j) * sizeof(struct range));
		r->n -= j - i - 1;
	}
	r->v[i].start = start;
	r->v[i].end = end;
	return 0;
}

int hm_ranges_remove(hm_ranges *r, uint64_t start, uint64_t end)
{
	uint64_t i, j;

	if (start >= end)
		return start == end ? 0 : -EINVAL;
	i = lower(r, start);
	if (i == r->n || r->v[i].start >= end)
		return 0;
	/* a hole strictly inside one range splits it */
	if (r->v[i].start < start && r->v[i].end > end) {
		if (reserve(r, r->n + 1))
			return -ENOMEM;
		memmove(&r->v[i + 1], &r->v[i], (r->n - i) * sizeof(struct range));
		r->n++;
		r->v[i].end = start;
		r->v[i + 1].start = end;
		return 0;
	}
	if (r->v[i].start < start) {
		r->v[i].end = start;
		i++;
	}
	j = i;
	while (j < r->n && r->v[j].end <= end)
		j++;
	if (j < r->n && r->v[j].start < end)
		r->v[j].start = end;
	memmove(&r->v[i], &r->v[j], (r->n - j) * sizeof(struct range));
	r->n -= j - i;
	return 0;
}

int hm_ranges_contains(const hm_ranges *r, uint64_t addr)
{
	uint64_t i = lower(r, addr);
	return i < r->n && r->v[i].start <= addr;
}

int hm_ranges_next(const hm_ranges *r, uint64_t addr, uint64_t *start, uint64_t *end)
{
	uint64_t i = lower(r, addr);

	if (i == r->n)
		return 0;
	*start = MAX(addr, r->v[i].start);
	*end = r->v[i].end;
	return 1;
}

/* mremap moved [from, from+len) to [to, to+len): owed pages move along. */
int hm_ranges_move(hm_ranges *r, uint64_t from, uint64_t to, uint64_t len)
{
	struct range *moved;
	uint64_t i, n = 0;
	int rc = 0;

	moved = malloc((r->n + 1) * sizeof(*moved));
	if (!moved)
		return -ENOMEM;
	for (i = lower(r, from); i < r->n && r->v[i].start < from + len; i++) {
		moved[n].start = MAX(r->v[i].start, from) - from + to;
		moved[n].end = MIN(r->v[i].end, from + len) - from + to;
		n++;
	}
	/* like mremap, the move replaces whatever was at the destination */
	rc = hm_ranges_remove(r, from, from + len) ?: hm_ranges_remove(r, to, to + len);
	for (i = 0; !rc && i < n; i++)
		rc = hm_ranges_add(r, moved[i].start, moved[i].end);
	free(moved);
	return rc;
}

int hm_ranges_copy(const hm_ranges *src, hm_ranges *dst)
{
	if (reserve(dst, src->n))
		return -ENOMEM;
	memcpy(dst->v, src->v, src->n * sizeof(struct range));
	dst->n = src->n;
	return 0;
}

uint64_t hm_ranges_count(const hm_ranges *r)
{
	return r->n;
}

uint64_t hm_ranges_total(const hm_ranges *r)
{
	uint64_t i, total = 0;

	for (i = 0; i < r->n; i++)
		total += r->v[i].end - r->v[i].start;
	return total;
}

int hm_ranges_get(const hm_ranges *r, uint64_t i, uint64_t *start, uint64_t *end)
{
	if (i >= r->n)
		return -ERANGE;
	*start = r->v[i].start;
	*end = r->v[i].end;
	return 0;
}
