/*
 * System calls run inside another process, the way CRIU's compel and gdb do
 * it, and whole-process freezing for the soft-dirty tracker.
 *
 * Injection holds one thread only, for as short a time as possible:
 *
 *   PTRACE_SEIZE + PTRACE_INTERRUPT   the thread stops inside get_signal()
 *   save registers and signal mask, block every signal
 *   for each syscall: registers = saved + rax/args, rip = a `syscall`
 *       instruction, orig_rax = -1; PTRACE_SYSCALL to its entry, PTRACE_SYSCALL
 *       to its exit, read rax
 *   restore registers and mask, PTRACE_DETACH
 *
 * Choices that keep the target unharmed:
 *  - No code is written. The `syscall` instruction (0f 05) is found in the
 *    vDSO (or any executable mapping) and jumped to: patching the code at the
 *    thread's rip would race with the target's other threads running the
 *    same code.
 *  - No signal is generated: syscall-stops (not single-stepping, whose
 *    SIGTRAP is force-sent and would reset a blocked or ignored SIGTRAP's
 *    handler), and the target's signals are blocked meanwhile, so none is
 *    delivered with the borrowed registers.
 *  - orig_rax = -1 while borrowing the thread, so the kernel does not apply
 *    the syscall-restart fix-up to the borrowed registers.
 *  - A thread stopped inside a restartable syscall (rax = -ERESTART*) gets
 *    its registers back inside get_signal() again (a second PTRACE_INTERRUPT
 *    stop), never at a syscall-exit stop: the kernel applies the restart
 *    (rip -= 2, rax = orig_rax) only on its way out of get_signal(), so the
 *    interrupted syscall resumes exactly as if we had not been there.
 *  - Seccomp: a filter of the target must not kill it (or trap, or hand the
 *    call to a supervisor) for a syscall it never made. PTRACE_O_SUSPEND_SECCOMP
 *    turns every filter of the seized thread off until we detach (the kernel
 *    skips seccomp entirely for it); it needs CAP_SYS_ADMIN and a tracer
 *    without seccomp of its own. Without it, a thread in seccomp mode 1 or 2
 *    (/proc/PID/task/TID/status "Seccomp:") is refused with -ECANCELED
 *    before any syscall is injected: the thread only sees a stop.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"
#include "inject.h"

#ifndef PTRACE_O_SUSPEND_SECCOMP
#define PTRACE_O_SUSPEND_SECCOMP 0x00200000
#endif

/* Kernel-internal restart codes a stopped syscall may hold in rax. */
#define ERESTARTSYS	      512
#define ERESTARTNOINTR	      513
#define ERESTARTNOHAND	      514
#define ERESTART_RESTARTBLOCK 516

#define USER_CS_64 0x33 /* __USER_CS: the thread runs 64-bit code */

/* --- threads --------------------------------------------------------------- */

/* State letter of /proc/PID/task/TID/stat, or 0 if it cannot be read. */
static char thread_state(pid_t pid, pid_t tid)
{
	char path[64], buf[512], *p;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", pid, tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	p = strrchr(buf, ')'); /* comm may hold spaces and parentheses */
	return p && p[1] == ' ' ? p[2] : 0;
}

static int live_state(char st)
{
	return st && st != 'Z' && st != 'X';
}

/* The thread-group leader, or any live thread if the leader is a zombie
 * (it called pthread_exit while others run on). */
int hm_pick_thread(pid_t pid, pid_t *tid)
{
	char path[64];
	struct dirent *d;
	DIR *dir;

	if (live_state(thread_state(pid, pid))) {
		*tid = pid;
		return 0;
	}
	snprintf(path, sizeof(path), "/proc/%d/task", pid);
	dir = opendir(path);
	if (!dir)
		return errno == ENOENT ? -ESRCH : -errno;
	while ((d = readdir(dir))) {
		pid_t t = (pid_t)atoi(d->d_name);
		if (t > 0 && live_state(thread_state(pid, t))) {
			closedir(dir);
			*tid = t;
			return 0;
		}
	}
	closedir(dir);
	return -ESRCH;
}

/* waitpid for a stop of tid; -ESRCH if it died instead. */
static int wait_stop(pid_t tid, int *status)
{
	for (;;) {
		pid_t r = waitpid(tid, status, __WALL);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return errno == ECHILD ? -ESRCH : -errno;
		}
		if (WIFEXITED(*status) || WIFSIGNALED(*status))
			return -ESRCH;
		if (WIFSTOPPED(*status))
			return 0;
	}
}

static int is_event_stop(int status)
{
	return (status >> 16) == PTRACE_EVENT_STOP;
}

/* After PTRACE_INTERRUPT: wait for the interrupt (or group) stop. A signal
 * that arrives first is delivered as if no tracer were there; the
 * interrupt stays pending and comes next. */
static int wait_interrupt_stop(pid_t tid)
{
	int st, rc;

	for (;;) {
		rc = wait_stop(tid, &st);
		if (rc < 0)
			return rc;
		if (is_event_stop(st))
			return 0;
		if (ptrace(PTRACE_CONT, tid, 0, (void *)(long)WSTOPSIG(st)) < 0)
			return -errno;
	}
}

/* PTRACE_SEIZE, asking for seccomp to be suspended where we may; 1 if it
 * is, 0 if not, or -errno. */
static int seize(pid_t tid, long options)
{
	if (ptrace(PTRACE_SEIZE, tid, 0, (void *)(options | PTRACE_O_SUSPEND_SECCOMP)) == 0)
		return 1;
	/* Suspending seccomp needs CAP_SYS_ADMIN, no seccomp of our own, and
	 * CONFIG_CHECKPOINT_RESTORE (EINVAL without). */
	if (errno != EPERM && errno != EINVAL)
		return -errno;
	if (ptrace(PTRACE_SEIZE, tid, 0, (void *)options) == 0)
		return 0;
	return -errno;
}

/* The seccomp mode of a thread (0 none, 1 strict, 2 filter), 0 on a kernel
 * without seccomp (no such line), or -errno. */
static int seccomp_mode(pid_t pid, pid_t tid)
{
	char path[64], line[256];
	int mode = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/task/%d/status", pid, tid);
	f = fopen(path, "re");
	if (!f)
		return errno == ENOENT ? -ESRCH : -errno;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Seccomp: %d", &mode) == 1)
			break;
	fclose(f);
	return mode;
}

#if defined(__x86_64__)

/* --- a `syscall` instruction in the target ----------------------------------- */

/* The first 0f 05 in [start, end) of the target's memory, read through
 * /proc/PID/mem (which reads execute-only text too). */
static int find_bytes(int mem, uint64_t start, uint64_t end, uint64_t *ip)
{
	static const uint64_t max_scan = 16 << 20;
	unsigned char buf[65536];
	uint64_t at;

	end = MIN(end, start + max_scan);
	for (at = start; at < end;) {
		size_t want = (size_t)MIN((uint64_t)sizeof(buf), end - at);
		ssize_t n = pread(mem, buf, want, (off_t)at);
		if (n < 2)
			return -ENOENT;
		for (ssize_t i = 0; i + 1 < n; i++) {
			if (buf[i] == 0x0f && buf[i + 1] == 0x05) {
				*ip = at + (uint64_t)i;
				return 0;
			}
		}
		at += (uint64_t)n - 1; /* overlap one byte: 0f may end a chunk */
	}
	return -ENOENT;
}

/* The vDSO first (always there, tiny, never unmapped by the program), then
 * any executable mapping (libc is full of syscall instructions). */
static int find_syscall_insn(pid_t pid, pid_t tid, uint64_t *ip)
{
	char path[96], line[512], perms[8];
	unsigned long long start, end;
	int mem, pass, rc = -ENOENT;
	FILE *maps;

	/* Through the thread: a zombie leader's /proc/PID has no mm. */
	snprintf(path, sizeof(path), "/proc/%d/task/%d/mem", pid, tid);
	mem = open(path, O_RDONLY | O_CLOEXEC);
	if (mem < 0)
		return errno == ENOENT ? -ESRCH : -errno;
	snprintf(path, sizeof(path), "/proc/%d/task/%d/maps", pid, tid);
	maps = fopen(path, "re");
	if (!maps) {
		rc = errno == ENOENT ? -ESRCH : -errno;
		close(mem);
		return rc;
	}
	for (pass = 0; pass < 2 && rc < 0; pass++) {
		rewind(maps);
		while (rc < 0 && fgets(line, sizeof(line), maps)) {
			if (sscanf(line, "%llx-%llx %7s", &start, &end, perms) != 3 || perms[2] != 'x')
				continue;
			if (pass == 0 && !strstr(line, "[vdso]"))
				continue;
			if (strstr(line, "[vsyscall]"))
				continue; /* emulated: executing it faults */
			rc = find_bytes(mem, start, end, ip);
		}
	}
	fclose(maps);
	close(mem);
	return rc;
}

/* --- injection ---------------------------------------------------------------- */

static int restartable(const struct user_regs_struct *r)
{
	long rax = (long)r->rax;

	return (long)r->orig_rax >= 0 &&
	       (rax == -ERESTARTSYS || rax == -ERESTARTNOINTR || rax == -ERESTARTNOHAND ||
		rax == -ERESTART_RESTARTBLOCK);
}

int hm_inject_begin(pid_t pid, struct hm_inject *s)
{
	uint64_t all = ~0ULL;
	int rc;

	memset(s, 0, sizeof(*s));
	s->pid = pid;
	rc = hm_pick_thread(pid, &s->tid);
	if (rc < 0)
		return rc;
	/* Everything that can fail without touching the target comes first. */
	rc = find_syscall_insn(pid, s->tid, &s->syscall_ip);
	if (rc < 0)
		return rc;
	rc = seize(s->tid, PTRACE_O_TRACESYSGOOD);
	if (rc < 0)
		return rc;
	s->attached = 1;
	s->seccomp_suspended = rc;
	s->t_begin = now_ns();
	if (ptrace(PTRACE_INTERRUPT, s->tid, 0, 0) < 0) {
		rc = -errno;
		goto fail;
	}
	rc = wait_interrupt_stop(s->tid);
	if (rc < 0)
		goto fail;
	/* Read once stopped: a stopped thread installs no filter itself (a
	 * sibling's SECCOMP_FILTER_FLAG_TSYNC still could, right now). */
	if (!s->seccomp_suspended) {
		rc = seccomp_mode(pid, s->tid);
		if (rc > 0)
			rc = -ECANCELED;
		if (rc < 0)
			goto fail;
	}
	if (ptrace(PTRACE_GETREGS, s->tid, 0, &s->saved) < 0) {
		rc = -errno;
		goto fail;
	}
	if (s->saved.cs != USER_CS_64) {
		rc = -ENOTSUP; /* a 32-bit process: other syscall numbers and registers */
		goto fail;
	}
	if (ptrace(PTRACE_GETSIGMASK, s->tid, (void *)sizeof(uint64_t), &s->saved_mask) < 0) {
		rc = -errno;
		goto fail;
	}
	if (ptrace(PTRACE_SETSIGMASK, s->tid, (void *)sizeof(uint64_t), &all) < 0) {
		rc = -errno;
		goto fail;
	}
	return 0;
fail:
	/* Nothing was changed yet: detaching leaves the thread as found (a
	 * thread that died meanwhile needs nothing). */
	if (rc != -ESRCH)
		ptrace(PTRACE_DETACH, s->tid, 0, 0);
	s->attached = 0;
	return rc;
}

int hm_inject_syscall(struct hm_inject *s, long nr, const long args[6], long *ret)
{
	struct user_regs_struct r = s->saved;
	int st, rc, want = 2; /* the entry stop, then the exit stop */

	if (!s->attached)
		return -EINVAL;
	r.orig_rax = (unsigned long long)-1; /* no syscall to restart here */
	r.rax = (unsigned long long)nr;
	r.rdi = (unsigned long long)args[0];
	r.rsi = (unsigned long long)args[1];
	r.rdx = (unsigned long long)args[2];
	r.r10 = (unsigned long long)args[3];
	r.r8 = (unsigned long long)args[4];
	r.r9 = (unsigned long long)args[5];
	r.rip = s->syscall_ip;
	if (ptrace(PTRACE_SETREGS, s->tid, 0, &r) < 0)
		return -errno;
	s->moved = 1;
	for (;;) {
		if (ptrace(PTRACE_SYSCALL, s->tid, 0, 0) < 0)
			return -errno;
		rc = wait_stop(s->tid, &st);
		if (rc < 0)
			return rc;
		/* Other stops: a group stop (SIGSTOP cannot be blocked); go on. */
		if (WSTOPSIG(st) == (SIGTRAP | 0x80) && --want == 0)
			break;
	}
	if (ptrace(PTRACE_GETREGS, s->tid, 0, &r) < 0)
		return -errno;
	*ret = (long)r.rax;
	return 0;
}

int hm_inject_end(struct hm_inject *s, uint64_t *stop_ns)
{
	int rc = 0, st;

	if (!s->attached)
		return -EINVAL;
	if (s->moved && restartable(&s->saved) && ptrace(PTRACE_INTERRUPT, s->tid, 0, 0) == 0 &&
	    ptrace(PTRACE_CONT, s->tid, 0, 0) == 0) {
		/* Back into get_signal(): see the comment at the top. */
		for (;;) {
			rc = wait_stop(s->tid, &st);
			if (rc < 0) {
				s->attached = 0; /* died: nothing left to restore */
				return rc;
			}
			if (is_event_stop(st))
				break;
			/* Signals are blocked; nothing else should stop it. */
			ptrace(PTRACE_CONT, s->tid, 0, 0);
		}
	}
	if (ptrace(PTRACE_SETREGS, s->tid, 0, &s->saved) < 0)
		rc = -errno;
	if (ptrace(PTRACE_SETSIGMASK, s->tid, (void *)sizeof(uint64_t), &s->saved_mask) < 0 && rc == 0)
		rc = -errno;
	if (ptrace(PTRACE_DETACH, s->tid, 0, 0) < 0 && rc == 0)
		rc = -errno;
	if (stop_ns)
		*stop_ns = now_ns() - s->t_begin;
	s->attached = 0;
	return rc;
}

#else /* !__x86_64__ */

int hm_inject_begin(pid_t pid, struct hm_inject *s)
{
	memset(s, 0, sizeof(*s));
	return -ENOTSUP;
}

int hm_inject_syscall(struct hm_inject *s, long nr, const long args[6], long *ret)
{
	return -ENOTSUP;
}

int hm_inject_end(struct hm_inject *s, uint64_t *stop_ns)
{
	return -ENOTSUP;
}

#endif

/* --- freezing a whole process (soft-dirty: read and clear must be atomic) --- */

static int in_set(const struct hm_freeze_set *f, pid_t tid)
{
	for (int i = 0; i < f->n; i++)
		if (f->tids[i] == tid)
			return 1;
	return 0;
}

static int add_tid(struct hm_freeze_set *f, pid_t tid)
{
	if (f->n == f->cap) {
		int cap = f->cap ? f->cap * 2 : 16;
		pid_t *t = realloc(f->tids, (size_t)cap * sizeof(*t));
		if (!t)
			return -ENOMEM;
		f->tids = t;
		f->cap = cap;
	}
	f->tids[f->n++] = tid;
	return 0;
}

/* One pass over /proc/PID/task: seize and stop every thread not yet held.
 * Number of threads added, or -errno. */
static int freeze_pass(struct hm_freeze_set *f)
{
	char path[64];
	struct dirent *d;
	int added = 0, rc = 0;
	DIR *dir;

	snprintf(path, sizeof(path), "/proc/%d/task", f->pid);
	dir = opendir(path);
	if (!dir)
		return errno == ENOENT ? -ESRCH : -errno;
	while ((d = readdir(dir))) {
		pid_t tid = (pid_t)atoi(d->d_name);
		if (tid <= 0 || in_set(f, tid))
			continue;
		rc = seize(tid, 0); /* freezing injects nothing: seccomp is no matter */
		if (rc > 0)
			rc = 0;
		if (rc == -ESRCH) {
			rc = 0; /* exited meanwhile */
			continue;
		}
		if (rc < 0)
			break;
		if (ptrace(PTRACE_INTERRUPT, tid, 0, 0) < 0 || wait_interrupt_stop(tid) < 0) {
			rc = 0; /* died between seize and stop: nothing to hold */
			continue;
		}
		rc = add_tid(f, tid);
		if (rc < 0) {
			ptrace(PTRACE_DETACH, tid, 0, 0);
			break;
		}
		added++;
	}
	closedir(dir);
	return rc < 0 ? rc : added;
}

int hm_freeze_all(pid_t pid, struct hm_freeze_set *f)
{
	int rc;

	memset(f, 0, sizeof(*f));
	f->pid = pid;
	f->t_begin = now_ns();
	/* A thread not yet stopped may clone another: list again until a pass,
	 * made with every known thread stopped, finds nothing new. */
	do {
		rc = freeze_pass(f);
	} while (rc > 0);
	if (rc == 0 && f->n == 0)
		rc = -ESRCH;
	if (rc < 0) {
		hm_thaw_all(f, NULL);
		return rc;
	}
	return 0;
}

int hm_thaw_all(struct hm_freeze_set *f, uint64_t *stop_ns)
{
	int rc = 0;

	for (int i = 0; i < f->n; i++)
		if (ptrace(PTRACE_DETACH, f->tids[i], 0, 0) < 0 && errno != ESRCH && rc == 0)
			rc = -errno;
	if (stop_ns)
		*stop_ns = now_ns() - f->t_begin;
	free(f->tids);
	f->tids = NULL;
	f->n = f->cap = 0;
	return rc;
}
