/*
 * The stats and the histograms (HM_HIST_*): where a fault's time goes, and
 * the installers' copies. A histogram has 8 sub-buckets per power of two of
 * nanoseconds (lat_bucket, faultloop_internal.h).
 */
#include <errno.h>
#include <string.h>

#include "faultloop_internal.h"

static uint64_t lat_bucket_value(unsigned b)
{
	unsigned msb = b / 8, sub = b % 8;
	return msb >= 3 ? ((8ULL + sub) << (msb - 3)) : sub;
}

void record_latency(hm_loop *l, uint64_t since_ns)
{
	uint64_t ns = now_ns() - since_ns;

	hist_add(l, HM_HIST_LATENCY, ns);
	if (ns > l->st.lat_max_ns)
		l->st.lat_max_ns = ns;
}

static uint64_t lat_percentile(const hm_loop *l, double p)
{
	const uint64_t *h = l->hist[HM_HIST_LATENCY];
	uint64_t total = 0, seen = 0;
	unsigned b;

	for (b = 0; b < LAT_BUCKETS; b++)
		total += h[b];
	if (!total)
		return 0;
	for (b = 0; b < LAT_BUCKETS; b++) {
		seen += h[b];
		if (seen >= p * total)
			return lat_bucket_value(b);
	}
	return l->st.lat_max_ns;
}

void hm_loop_get_stats(hm_loop *l, struct hm_loop_stats *out)
{
	struct task *t;

	pthread_mutex_lock(&l->lock);
	*out = l->st;
	out->pages_owed = 0;
	out->pages_waiting = 0;
	for (t = l->tasks; t; t = t->next) {
		out->pages_owed += hm_ranges_total(t->owed) / PAGE_SZ;
		out->pages_waiting += t->nwaiting;
	}
	out->lat_p50_ns = lat_percentile(l, 0.50);
	out->lat_p99_ns = lat_percentile(l, 0.99);
	out->installers = l->ninstallers;
	out->batch_pages = l->batch_pages;
	pthread_mutex_unlock(&l->lock);
}

int hm_loop_histogram(hm_loop *l, int which, uint64_t *counts, int nbuckets)
{
	if (which < 0 || which >= HM_HIST_COUNT || nbuckets != LAT_BUCKETS)
		return -EINVAL;
	pthread_mutex_lock(&l->lock);
	memcpy(counts, l->hist[which], sizeof(l->hist[which]));
	pthread_mutex_unlock(&l->lock);
	return 0;
}

uint64_t hm_loop_bucket_ns(int bucket)
{
	return lat_bucket_value((unsigned)bucket);
}
