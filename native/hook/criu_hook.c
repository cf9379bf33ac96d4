/*
 * The switch-over dump's CRIU action script, compiled: CRIU runs it while
 * the tree is frozen, so its start is blackout. A C program starts in about
 * 1 ms; `python -S` with the same work takes 8 to 10 ms here.
 *
 * It does exactly what src/hybridmig/criu/hook.py's main() does (read that
 * for the why of each step): ask `hybridmig run` for its verdict through a
 * unix socket, then exit 0 or 1, and after post-dump start the detached
 * child that ends CRIU's page server session
 * (`python -m hybridmig.criu.hook end-session CRIU_PID commit|abort`).
 * Any failure to ask means 1: the source is never lost.
 *
 * criu/command.py's write_hook() writes the script CRIU runs as
 *
 *   #!/path/to/this/program
 *   SOCKET_PATH (empty: $HYBRIDMIG_HOOK_SOCKET)
 *   PYTHON (the interpreter that runs hybridmig)
 *
 * so the kernel starts this program with the script's path as argv[1]
 * (CRIU's `sh -c SCRIPT` execs it: CRIU stays our parent).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define PREFIX	 "hybridmig's CRIU hook: "
#define IN_DOUBT '2' /* post-dump: keep the tasks frozen, neither commit nor resume */

#ifndef HOOK_SOURCE_SHA256
#define HOOK_SOURCE_SHA256 "unknown"
#endif
/* write_hook() finds this in the binary and refuses a program built from
 * other sources than native/hook/criu_hook.c */
const char hook_source_sha256[] = "hybridmig-hook-sha256:" HOOK_SOURCE_SHA256;

struct script {
	char socket[sizeof(((struct sockaddr_un *)0)->sun_path)];
	char python[4096];
};

static int read_line(FILE *f, char *buf, size_t size)
{
	if (!fgets(buf, (int)size, f))
		return -1;
	size_t n = strcspn(buf, "\n");
	if (buf[n] != '\n' && !feof(f))
		return -1; /* longer than buf */
	buf[n] = '\0';
	return 0;
}

static int read_script(const char *path, struct script *s)
{
	char shebang[4096];
	FILE *f = fopen(path, "re");
	if (!f) {
		fprintf(stderr, PREFIX "cannot open %s: %s\n", path, strerror(errno));
		return -1;
	}
	int bad = read_line(f, shebang, sizeof(shebang)) || read_line(f, s->socket, sizeof(s->socket)) ||
		  read_line(f, s->python, sizeof(s->python)) || s->python[0] != '/';
	fclose(f);
	if (bad) {
		fprintf(stderr, PREFIX "%s is not a script that write_hook() wrote\n", path);
		return -1;
	}
	if (!s->socket[0]) {
		const char *env = getenv("HYBRIDMIG_HOOK_SOCKET");
		if (!env || strlen(env) >= sizeof(s->socket)) {
			fprintf(stderr, PREFIX "no socket of hybridmig run in the script or $HYBRIDMIG_HOOK_SOCKET\n");
			return -1;
		}
		strcpy(s->socket, env);
	}
	return 0;
}

/* run's verdict for `action`: '0', '1', IN_DOUBT, or 0 if it could not be asked */
static char ask(const char *path, const char *action)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	char line[32], verdict = 0;
	int n = snprintf(line, sizeof(line), "%s\n", action);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	strcpy(addr.sun_path, path); /* (read_script checked its length) */
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) || send(fd, line, n, MSG_NOSIGNAL) != n) {
		fprintf(stderr, PREFIX "cannot reach hybridmig run at %s: %s\n", path, strerror(errno));
	} else {
		ssize_t got;
		do
			got = recv(fd, &verdict, 1, 0);
		while (got < 0 && errno == EINTR);
		if (got != 1) {
			fprintf(stderr, PREFIX "hybridmig run at %s gave no verdict: %s\n", path,
				got ? strerror(errno) : "it closed the connection");
			verdict = 0;
		}
	}
	if (fd >= 0)
		close(fd);
	return verdict;
}

/* `python -m hybridmig.criu.hook ARGS...`: detached (its own session, not
 * waited for) or waited for */
static int run_hook_module(const char *python, char *const args[], int detach)
{
	char *argv[8] = { (char *)python, "-m", "hybridmig.criu.hook" };
	for (int i = 0; args[i] && i < 4; i++)
		argv[3 + i] = args[i];
	pid_t pid = fork();
	if (pid < 0)
		return -1;
	if (pid == 0) {
		if (detach) {
			setsid();
			if (fork())
				_exit(0);
		}
		execv(python, argv);
		fprintf(stderr, PREFIX "cannot run %s: %s\n", python, strerror(errno));
		_exit(1);
	}
	int status;
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	return 0;
}

int main(int argc, char **argv)
{
	const char *action = getenv("CRTOOLS_SCRIPT_ACTION");
	pid_t criu = getppid(); /* CRIU runs its action scripts itself, and waits for them */
	struct script s;
	char pid[16];

	if (!action || (strcmp(action, "pre-dump") && strcmp(action, "post-dump")))
		return 0;
	if (argc < 2 || read_script(argv[1], &s))
		return 1;
	char verdict = ask(s.socket, action);
	int commit = verdict == '0';
	if (!strcmp(action, "pre-dump"))
		return commit ? 0 : 1;
	if (verdict == IN_DOUBT)
		return 0; /* `hybridmig settle` connects to CRIU's page server later */
	snprintf(pid, sizeof(pid), "%d", (int)criu);
	if (getppid() != criu) {
		/* CRIU died while we waited: the tree runs again, and after a
		 * commit the destination's copy is the one */
		if (commit)
			run_hook_module(s.python, (char *[]){ "end-tree", NULL }, 0);
		return 1;
	}
	if (run_hook_module(s.python, (char *[]){ "end-session", pid, commit ? "commit" : "abort", NULL }, 1))
		return 1;
	return commit ? 0 : 1;
}
