/* A process with 16 MiB of data and a thread that waits in pause() with its
 * stack pointer exactly page-aligned: the case in which CRIU 4.2.1's
 * is_stack() (scripts/criu-patches/0001-...) took every page for a stack
 * page and made none lazy. Prints "ready" once both are in place. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define DATA (16 << 20)
#define STACK (64 << 10)

static void *waiter(void *top)
{
	sigset_t all;

	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL); /* no signal frame is ever pushed */
	/* rsp = the page-aligned top of its own mapping, then pause() for ever
	 * (the syscall instruction pushes nothing) */
	__asm__ volatile("mov %0, %%rsp\n"
			 "1: mov $34, %%eax\n" /* SYS_pause */
			 "syscall\n"
			 "jmp 1b\n" ::"r"(top)
			 : "rax", "rcx", "r11", "memory");
	return NULL;
}

int main(void)
{
	char *data = mmap(NULL, DATA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *stack = mmap(NULL, STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	pthread_t t;

	if (data == MAP_FAILED || stack == MAP_FAILED)
		return 1;
	for (size_t i = 0; i < DATA; i += 4096)
		memset(data + i, (int)(i >> 12) | 1, 64);
	if (pthread_create(&t, NULL, waiter, stack + STACK))
		return 1;
	printf("ready\n");
	fflush(stdout);
	for (;;)
		pause();
}
