/* Three small anonymous mappings with flags CRIU must restore: the first
 * MADV_DONTFORK, the second read-only, the third MADV_WIPEONFORK, one page
 * of PROT_NONE between them so that none merges with another. With "toggle",
 * the first two then flip in a loop (MADV_DOFORK/DONTFORK, PROT_READ/
 * PROT_READ|PROT_WRITE): their VMAs' flags change all the time, their
 * ranges never. Prints "ready" once set up. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define LEN  (16 * PAGE)

int main(int argc, char **argv)
{
	int toggle = argc > 1 && !strcmp(argv[1], "toggle");
	char *base, *a, *b, *c;
	unsigned long i;

	base = mmap(NULL, 3 * (LEN + PAGE), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	a = base;
	b = a + LEN + PAGE;
	c = b + LEN + PAGE;
	if (mprotect(a, LEN, PROT_READ | PROT_WRITE) || mprotect(b, LEN, PROT_READ | PROT_WRITE) ||
	    mprotect(c, LEN, PROT_READ | PROT_WRITE)) {
		perror("mprotect");
		return 1;
	}
	memset(a, 1, LEN);
	memset(b, 2, LEN);
	memset(c, 3, LEN);
	if (madvise(a, LEN, MADV_DONTFORK) || mprotect(b, LEN, PROT_READ) || madvise(c, LEN, MADV_WIPEONFORK)) {
		perror("madvise");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	for (i = 0;; i++) {
		if (!toggle) {
			pause();
			continue;
		}
		madvise(a, LEN, i & 1 ? MADV_DONTFORK : MADV_DOFORK);
		mprotect(b, LEN, i & 1 ? PROT_READ : PROT_READ | PROT_WRITE);
	}
}
