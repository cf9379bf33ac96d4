/* Two small private mappings side by side, so that CRIU's pagemap cache
 * scans them in one PAGEMAP_SCAN call: 16 anonymous pages of which the first
 * 8 are written, then 16 pages of the file argv[1] (at least 64 KiB), all
 * read (present, file-backed) and the first 4 written (copied on write:
 * anonymous). A dump must keep the 8 + 4 written pages and no other
 * (scripts/criu-patches/0004 must not take the file's pages for anonymous
 * ones). Prints the address of the first mapping, then "ready". */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define N 16
#define WINDOW (2ul << 20)

int main(int argc, char **argv)
{
	volatile char sum = 0;
	char *base, *anon, *file;
	int fd, i;

	if (argc != 2 || (fd = open(argv[1], O_RDONLY)) < 0) {
		fprintf(stderr, "usage: mixedmaps FILE (of at least %d bytes)\n", N * PAGE);
		return 1;
	}
	/* reserve room, then map both adjacent at a 2 MiB boundary in it: the
	 * cache scans the VMAs of a 2 MiB window at once if the first starts
	 * near the window's start */
	base = mmap(NULL, 2 * WINDOW, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	base = (char *)(((unsigned long)base + WINDOW - 1) & ~(WINDOW - 1));
	anon = mmap(base, N * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	file = mmap(base + N * PAGE, N * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0);
	if (anon != base || file != base + N * PAGE) {
		perror("mmap");
		return 1;
	}
	for (i = 0; i < N / 2; i++)
		anon[i * PAGE] = 1;
	for (i = 0; i < N; i++)
		sum += file[i * PAGE];
	for (i = 0; i < N / 4; i++)
		file[i * PAGE + 1] = 1;
	printf("%lx\nready\n", (unsigned long)base);
	fflush(stdout);
	for (;;)
		pause();
}
