/* Interval lists: sorted, disjoint, non-adjacent [start, end) ranges of
 * addresses. The fault loop keeps one per task for the pages it still owes. */
typedef struct hm_ranges hm_ranges;

int hm_ranges_new(hm_ranges **out);
void hm_ranges_free(hm_ranges *r);
int hm_ranges_add(hm_ranges *r, uint64_t start, uint64_t end);
int hm_ranges_remove(hm_ranges *r, uint64_t start, uint64_t end);
int hm_ranges_contains(const hm_ranges *r, uint64_t addr);
int hm_ranges_next(const hm_ranges *r, uint64_t addr, uint64_t *start, uint64_t *end);
int hm_ranges_move(hm_ranges *r, uint64_t from, uint64_t to, uint64_t len);
int hm_ranges_copy(const hm_ranges *src, hm_ranges *dst);
uint64_t hm_ranges_count(const hm_ranges *r);
uint64_t hm_ranges_total(const hm_ranges *r);
int hm_ranges_get(const hm_ranges *r, uint64_t i, uint64_t *start, uint64_t *end);
