/* Internal: running system calls inside another process with ptrace, and
 * freezing all of its threads. Functions return 0 or -errno. x86_64 only
 * (elsewhere everything returns -ENOTSUP). */
#pragma once
#include <stdint.h>
#include <sys/types.h>
#include <sys/user.h>

/* The thread-group leader, or a live thread if the leader is a zombie (it
 * called pthread_exit while others run on; its mm is gone from /proc/PID). */
int hm_pick_thread(pid_t pid, pid_t *tid);

/* One stop of one thread of a target: begin, any number of syscalls, end. */
struct hm_inject {
	pid_t pid, tid;
	uint64_t syscall_ip;   /* address of a `syscall` instruction in the target */
	uint64_t t_begin;      /* CLOCK_MONOTONIC just before PTRACE_INTERRUPT */
	int attached;	       /* PTRACE_SEIZE succeeded: must detach */
	int moved;	       /* resumed since the first stop: regs no longer as saved */
	int seccomp_suspended; /* PTRACE_O_SUSPEND_SECCOMP was granted */
	uint64_t saved_mask;   /* the thread's signal mask */
#if defined(__x86_64__)
	struct user_regs_struct saved;
#endif
};

/* Seize a thread of pid (the leader, or another if the leader is a zombie),
 * stop it and save its state. On failure nothing is left attached.
 * -ECANCELED: the thread has seccomp (mode 1 or 2) and this process may not
 * suspend it (needs CAP_SYS_ADMIN, no seccomp of its own): a syscall run
 * there could be killed, trapped or sent to a supervisor. */
int hm_inject_begin(pid_t pid, struct hm_inject *s);
/* Run syscall nr(args[0..5]) in the stopped thread; *ret is its raw return
 * value (-errno on failure, as the kernel gives it). */
int hm_inject_syscall(struct hm_inject *s, long nr, const long args[6], long *ret);
/* Restore everything as saved and detach; *stop_ns (may be NULL) is how
 * long the thread was held. Always detaches, even on error. */
int hm_inject_end(struct hm_inject *s, uint64_t *stop_ns);

/* Every thread of a process held in a ptrace stop. */
struct hm_freeze_set {
	pid_t pid;
	int n, cap;
	pid_t *tids;
	uint64_t t_begin;
};

int hm_freeze_all(pid_t pid, struct hm_freeze_set *f);
/* Detach every thread; *stop_ns is how long the process was frozen. */
int hm_thaw_all(struct hm_freeze_set *f, uint64_t *stop_ns);
