/* Shared internals of the native module: page geometry and helpers. */
#pragma once
#include <stdint.h>
#include <time.h>

#define PAGE_SHIFT 12
#define PAGE_SZ	   (1UL << PAGE_SHIFT)

/* Pages are kept in chunks of 2 MiB: big enough that one UFFDIO_COPY moves
 * megabytes, small enough that memory returns to the system soon after the
 * pages of a chunk are installed. */
#define CHUNK_PAGES	    512UL
#define CHUNK_SZ	    (CHUNK_PAGES * PAGE_SZ)
#define CHUNK_BASE(addr)    ((addr) & ~(CHUNK_SZ - 1))
#define PAGE_IN_CHUNK(addr) (((addr) & (CHUNK_SZ - 1)) >> PAGE_SHIFT)

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

/* A spin-wait's pause: lets the sibling hyperthread (or the hypervisor) run,
 * and spares the memory bus. x86's PAUSE, arm64's YIELD, else nothing. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#endif
}

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}
