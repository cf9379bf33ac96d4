"""`hybridmig doctor`: can this machine run the engine, and which way.

Every fact is found by trying it: the native probes (bindings/probe.py)
exercise userfaultfd, PAGEMAP_SCAN, soft-dirty, process_vm_readv and
pidfd_getfd on this process's own memory, and CRIU is run. Version numbers
only explain a failure; distribution kernels backport and configure things
away, so they cannot decide one.

The check_* functions return a Check and never raise; each is computed once
per process (refresh() forgets them). The *_path() functions combine checks
into what the engine needs, and require_*() raise SetupError for the
engine's own start-up.
"""

import errno
import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass

import click

from .errors import SetupError

MIN_CRIU = (4, 2)
MIN_KERNEL = (4, 11)  # userfaultfd's non-cooperative events, which lazy restore needs
WP_ASYNC_KERNEL = (6, 7)  # UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN
PAGE_SERVER_PIPE_SIZE = 4 << 20  # CRIU's page server sets its pipes to ~3.2 MiB, rounded up
CRIU_FALLBACKS = ("/usr/local/sbin/criu", "/usr/sbin/criu")  # root's PATH may lack them
MAKE_SETUP = "install CRIU >= 4.2: make setup"
MAKE_SETUP_CRIU = "make setup builds a patched CRIU"
LAST_UNPATCHED_CRIU = (4, 2, 1)  # the last release known to lack scripts/criu-patches' fixes
CRIU_PATCH_STAMP = ".criu-hybridmig-patches"  # next to the criu scripts/setup.sh builds

# CRIU's lazy restore asks for exactly these (NEED_UFFD_API_FEATURES in criu/uffd.c).
LAZY_FEATURES = ("EVENT_FORK", "EVENT_REMAP", "EVENT_REMOVE", "EVENT_UNMAP")
WP_FEATURES = ("PAGEFAULT_FLAG_WP", "WP_ASYNC", "WP_UNPOPULATED")

CAPS = {"CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_CHECKPOINT_RESTORE": 40}

LAZY_RESTORE = "lazy restore"
UFFD_WP = "uffd-wp dirty tracking"
SOFT_DIRTY = "soft-dirty dirty tracking"
PAGE_SERVER = "criu page server"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Path:
    ok: bool
    reason: str


_memos: list = []


def _memo(fn):
    """Compute once per process: the machine does not change under us."""
    cached = functools.lru_cache(maxsize=None)(fn)
    _memos.append(cached)
    return cached


def refresh():
    """Forget every result, e.g. after the machine was fixed."""
    for cached in _memos:
        cached.cache_clear()


# --- plain facts -------------------------------------------------------------


def kernel_version(release=None) -> tuple[int, ...]:
    """(major, minor, patch) of os.uname().release, or of `release`."""
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release or os.uname().release)
    return tuple(int(x or 0) for x in m.groups()) if m else (0, 0, 0)


def capabilities() -> dict:
    """{name: present} for CAPS, from CapEff of /proc/self/status."""
    eff = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                eff = int(line.split()[1], 16)
    return {name: bool(eff >> bit & 1) for name, bit in CAPS.items()}


def find_criu() -> str | None:
    """The criu binary the engine runs: $CRIU, else PATH, else CRIU_FALLBACKS."""
    env = os.environ.get("CRIU")
    if env:
        return shutil.which(env)
    found = shutil.which("criu")
    if found:
        return found
    return next((p for p in CRIU_FALLBACKS if os.access(p, os.X_OK)), None)


def criu_version(path) -> tuple[int, ...] | None:
    """Version of the criu at path from `criu --version`, None if it will not say."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^Version:\s*(\d+(?:\.\d+)*)", out, re.M)
    return tuple(int(x) for x in m.group(1).split(".")) if m else None


def _dotted(version):
    return ".".join(map(str, version))


def _read_int(path) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _probe(call):
    """(call(bindings.probe), None), or (None, the OSError or ImportError).

    Imported here, not at the top: `hybridmig --help` and the checks that
    need no native code must work before the native module is built."""
    try:
        from .bindings import probe

        return call(probe), None
    except (ImportError, OSError) as e:
        return None, e


def _explain(err, meanings):
    """One line for a probe error: what its errno means here, else strerror."""
    if isinstance(err, ImportError):
        return f"native module not built ({err}) — run: make setup"
    return meanings.get(err.errno) or (err.strerror or str(err)).split(" (originated")[0]


# --- checks ------------------------------------------------------------------


@_memo
def check_kernel() -> Check:
    release = os.uname().release
    version = kernel_version(release)
    ok = version >= MIN_KERNEL
    note = (
        "uffd-wp async and PAGEMAP_SCAN are possible"
        if version >= WP_ASYNC_KERNEL
        else f"uffd-wp async and PAGEMAP_SCAN need >= {_dotted(WP_ASYNC_KERNEL)}"
    )
    if not ok:
        note = f"lazy restore needs >= {_dotted(MIN_KERNEL)}"
    return Check("kernel", ok, f"{release} {os.uname().machine}; {note}")


@_memo
def check_root() -> Check:
    uid = os.geteuid()
    if uid == 0:
        return Check("root", True, "running as uid 0")
    return Check("root", False, "running as uid %d — run as root" % uid)


@_memo
def check_capabilities() -> Check:
    caps = capabilities()
    have = [n for n, v in caps.items() if v]
    missing = [n for n, v in caps.items() if not v]
    detail = "present: %s" % (", ".join(have) or "none")
    if missing:
        detail += "; missing: {}".format(", ".join(missing))
    # CRIU dumps and restores with CAP_SYS_ADMIN; CAP_SYS_PTRACE lets it
    # seize the tasks and open a full userfaultfd.
    ok = caps["CAP_SYS_ADMIN"] and caps["CAP_SYS_PTRACE"]
    if not ok:
        detail += " — run as root (in a container, with these capabilities)"
    return Check("capabilities", ok, detail)


@_memo
def check_sys_resource() -> Check:
    if capabilities()["CAP_SYS_RESOURCE"]:
        return Check("CAP_SYS_RESOURCE", True, "present")
    pipes = "which it is" if check_pipe_max_size().ok else "which it is not"
    return Check(
        "CAP_SYS_RESOURCE",
        False,
        "missing (a container?): CRIU cannot dump processes of other uids, and its page server "
        f"needs fs.pipe-max-size >= 4 MiB, {pipes}",
    )


@_memo
def check_pipe_max_size() -> Check:
    size = _read_int("/proc/sys/fs/pipe-max-size")
    if size is None:
        return Check("fs.pipe-max-size", False, "cannot read /proc/sys/fs/pipe-max-size")
    detail = "%d bytes (%.3g MiB)" % (size, size / (1 << 20))
    if size >= PAGE_SERVER_PIPE_SIZE:
        return Check("fs.pipe-max-size", True, detail)
    if capabilities()["CAP_SYS_RESOURCE"]:
        return Check("fs.pipe-max-size", True, detail + "; CAP_SYS_RESOURCE lifts the limit")
    return Check(
        "fs.pipe-max-size",
        False,
        detail + "; without CAP_SYS_RESOURCE CRIU's page server needs >= 4 MiB"
        " — sysctl -w fs.pipe-max-size=%d" % PAGE_SERVER_PIPE_SIZE,
    )


@_memo
def check_ptrace() -> Check:
    scope = _read_int("/proc/sys/kernel/yama/ptrace_scope")
    if scope is None:
        return Check("ptrace", True, "no Yama restrictions")
    if scope >= 3:
        return Check("ptrace", False, "kernel.yama.ptrace_scope=3 forbids ptrace until reboot: CRIU cannot dump")
    return Check("ptrace", True, "kernel.yama.ptrace_scope=%d (root with CAP_SYS_PTRACE may attach)" % scope)


_UFFD_ERRORS = {
    errno.ENOSYS: "kernel built without CONFIG_USERFAULTFD",
    errno.EPERM: "not permitted (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)",
}


@_memo
def check_uffd_syscall() -> Check:
    """The full userfaultfd(2), as CRIU's lazy restore opens it."""
    info, err = _probe(lambda p: p.probe_uffd_open(p.SYSCALL))
    if info:
        return Check("userfaultfd syscall", True, "works; API ioctls {}".format(", ".join(info.ioctls)))
    detail = _explain(err, _UFFD_ERRORS)
    if _probe(lambda p: p.probe_uffd_open(p.USER_ONLY))[0]:
        detail += ", only with UFFD_USER_MODE_ONLY, which CRIU's lazy restore does not use"
    if getattr(err, "errno", None) == errno.EPERM:
        detail += " — run as root"
    return Check("userfaultfd syscall", False, detail)


@_memo
def check_uffd_dev() -> Check:
    """/dev/userfaultfd (6.1+): the way for processes allowed by the node's mode."""
    info, err = _probe(lambda p: p.probe_uffd_open(p.DEV))
    if info:
        return Check("/dev/userfaultfd", True, "works (USERFAULTFD_IOC_NEW)")
    return Check(
        "/dev/userfaultfd",
        False,
        _explain(
            err,
            {
                errno.ENOENT: "no /dev/userfaultfd (kernel < 6.1 or no device node)",
                errno.EACCES: "no access to /dev/userfaultfd — run as root",
                errno.ENOTTY: "kernel lacks USERFAULTFD_IOC_NEW (< 6.1)",
            },
        ),
    )


@_memo
def check_uffd_features() -> Check:
    """Every feature the kernel supports, as UFFDIO_API reports them."""
    info, err = _probe(lambda p: p.probe_uffd())
    if not info:
        return Check("userfaultfd features", False, _explain(err, _UFFD_ERRORS))
    return Check(
        "userfaultfd features", True, "0x{:x} via {}: {}".format(info.feature_mask, info.via, " ".join(info.features))
    )


@_memo
def check_uffd_feature(name) -> Check:
    """Is feature `name` granted to this process, asked for on its own?

    Supported is not enough: the kernel refuses EVENT_FORK (EPERM) to a
    process without CAP_SYS_PTRACE, so each is really asked for."""
    label = "uffd feature " + name
    errors = []
    for way in ("SYSCALL", "USER_ONLY", "DEV"):
        info, err = _probe(lambda p, way=way: p.probe_uffd_open(getattr(p, way), (name,)))
        if info:
            return Check(label, True, f"granted ({info.via})")
        if isinstance(err, ImportError):
            return Check(label, False, _explain(err, {}))
        errors.append(err)
    supported, _ = _probe(lambda p: p.probe_uffd())
    if supported and name not in supported.features:
        return Check(label, False, "not offered by this kernel")
    if any(e.errno == errno.EPERM for e in errors):
        return Check(label, False, "refused to this process (EVENT_FORK needs CAP_SYS_PTRACE) — run as root")
    return Check(label, False, _explain(errors[0], _UFFD_ERRORS))


@_memo
def check_pagemap_scan() -> Check:
    _, err = _probe(lambda p: p.probe_pagemap_scan())
    if not err:
        return Check("PAGEMAP_SCAN", True, "uffd-wp async write reported as PAGE_IS_WRITTEN")
    return Check(
        "PAGEMAP_SCAN",
        False,
        _explain(
            err,
            {
                errno.ENOTTY: "kernel lacks the PAGEMAP_SCAN ioctl (needs 6.7+)",
                errno.EOPNOTSUPP: "kernel lacks UFFD_FEATURE_WP_ASYNC (needs 6.7+)",
                errno.EIO: "PAGEMAP_SCAN ran but reported the wrong pages",
                errno.EPERM: "userfaultfd not permitted — run as root",
            },
        ),
    )


@_memo
def check_soft_dirty() -> Check:
    _, err = _probe(lambda p: p.probe_soft_dirty())
    if not err:
        return Check("soft-dirty", True, "clear_refs 4 clears and a write sets pagemap bit 55")
    return Check(
        "soft-dirty",
        False,
        _explain(
            err,
            {
                errno.EOPNOTSUPP: "kernel built without CONFIG_MEM_SOFT_DIRTY",
                errno.ENOENT: "no /proc/self/clear_refs (kernel without CONFIG_PROC_PAGE_MONITOR)",
            },
        ),
    )


@_memo
def check_process_vm_readv() -> Check:
    _, err = _probe(lambda p: p.probe_process_vm_readv())
    if not err:
        return Check("process_vm_readv", True, "reads this process's memory")
    return Check(
        "process_vm_readv",
        False,
        _explain(
            err,
            {
                errno.ENOSYS: "kernel built without CONFIG_CROSS_MEMORY_ATTACH",
                errno.EPERM: "denied (a seccomp profile?) — run outside a restricted container",
            },
        ),
    )


@_memo
def check_pidfd_getfd() -> Check:
    _, err = _probe(lambda p: p.probe_pidfd_getfd())
    if not err:
        return Check("pidfd_getfd", True, "duplicates a file descriptor of a process")
    return Check(
        "pidfd_getfd",
        False,
        _explain(
            err,
            {
                errno.ENOSYS: "kernel lacks pidfd_open/pidfd_getfd (needs 5.6+)",
                errno.EPERM: "denied (ptrace access check or seccomp) — run as root",
            },
        ),
    )


@_memo
def check_criu() -> Check:
    path = find_criu()
    if not path and os.environ.get("CRIU"):
        return Check(
            "criu",
            False,
            "$CRIU={} is not an executable (unset it to search PATH) — {}".format(os.environ["CRIU"], MAKE_SETUP),
        )
    if not path:
        return Check("criu", False, "not found on PATH or in {} — {}".format(", ".join(CRIU_FALLBACKS), MAKE_SETUP))
    version = criu_version(path)
    if version is None:
        return Check("criu", False, f"{path} does not report a version — {MAKE_SETUP}")
    if version < MIN_CRIU:
        return Check(
            "criu",
            False,
            f'{path} is {_dotted(version)}, older than {_dotted(MIN_CRIU)} (3.17 fails on kernels >= 6.13 "Unexpected rt vDSO area bounds", '  # noqa: E501
            f"4.1 cannot dump inet sockets on kernels >= 6.16) — {MAKE_SETUP}",
        )
    return Check("criu", True, f"{path}, version {_dotted(version)}")


@_memo
def check_criu_patches() -> Check:
    """CRIU up to 4.2.1 as released takes every page for a stack page as soon
    as a thread's stack pointer is page-aligned at the freeze (is_stack() in
    criu/mem.c): its lazy dump then makes no page lazy. `make setup` builds
    CRIU with the fix and stamps it."""
    path = find_criu()
    version = criu_version(path) if path else None
    if path is None or version is None or version > LAST_UNPATCHED_CRIU:
        return Check("criu patches", True, "none needed" if version else "no CRIU")
    if os.path.exists(os.path.join(os.path.dirname(os.path.realpath(path)), CRIU_PATCH_STAMP)):
        return Check("criu patches", True, "built by make setup with scripts/criu-patches")
    return Check(
        "criu patches",
        False,
        f"{path} is {_dotted(version)} as released: its lazy dump makes no page lazy when a thread's stack pointer is "
        "page-aligned at the freeze, and the switch-over then carries the whole memory while frozen "
        "— make setup builds a patched CRIU",
    )


@_memo
def _criu_help() -> str:
    """`criu --help` of the CRIU we run: the options it has."""
    path = find_criu()
    try:
        return subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30).stdout if path else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _criu_option(option, has, lacks) -> Check:
    """Whether CRIU's --help lists --OPTION (one of scripts/criu-patches):
    `has` says what it does, `lacks` what happens without it."""
    path = find_criu()
    if f"--{option}" in _criu_help():
        return Check(f"criu {option}", True, f"{path}: {has}")
    return Check(f"criu {option}", False, f"{path or 'no CRIU'} lacks --{option}: {lacks} — {MAKE_SETUP_CRIU}")


@_memo
def check_criu_lazy_in_place() -> Check:
    """Whether CRIU has --lazy-pages-in-place (scripts/criu-patches/0002): without
    it the switch-over's dump copies every lazy page into page pipes while the
    tree is frozen (~20 ms per GiB of blackout here)."""
    return _criu_option(
        "lazy-pages-in-place",
        "the dump copies no lazy page while frozen",
        "the switch-over copies the whole memory into page pipes while the tree is frozen, a blackout that grows "
        "with the memory",
    )


@_memo
def check_criu_pre_restore_first() -> Check:
    """Whether CRIU has --pre-restore-first (scripts/criu-patches/0013):
    without it serve holds a container's restore before conmon, and runc's
    and CRIU's start-up is in the blackout (~15-20 ms here)."""
    return _criu_option(
        "pre-restore-first",
        "a container's restore waits in CRIU, runc and CRIU started",
        "a container's restore waits before conmon: runc's and CRIU's start are in the blackout",
    )


@_memo
def check_criu_early_vmas() -> Check:
    """Whether CRIU has --early-vmas (scripts/criu-patches/0008): without it
    the switch-over's dump reads /proc/PID/smaps with the tree frozen, and
    the kernel walks every page for it (~7 ms per GiB here)."""
    return _criu_option(
        "early-vmas",
        "the VMAs are read before the freeze",
        "the switch-over reads the VMAs with the tree frozen, a walk of every page",
    )


def check_criu_hook() -> Check:
    """Whether the switch-over's CRIU action script is the compiled one
    (native/hook/criu_hook.c): hook.py under python -S stands in otherwise,
    ~10 ms later in every blackout."""
    from .criu.command import HOOK_PROGRAM, hook_program  # (command imports this module)

    if hook_program():
        return Check("criu hook", True, f"compiled: {HOOK_PROGRAM}")
    return Check(
        "criu hook",
        False,
        f"{HOOK_PROGRAM} is missing or not built from native/hook/criu_hook.c: hook.py stands in, about 10 ms "
        "later in every blackout — make setup compiles it",
    )


def _run_criu_check(*args):
    """(ok, the last meaningful lines of output) of `criu check ARGS`."""
    path = find_criu()
    if not path:
        return False, "no criu binary — " + MAKE_SETUP
    try:
        proc = subprocess.run([path, "check", *args], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"could not run: {e}"
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines
    return proc.returncode == 0, " | ".join(errors[-3:]) or "exit status %d" % proc.returncode


@_memo
def check_criu_check() -> Check:
    ok, out = _run_criu_check()
    if ok or not find_criu():
        return Check("criu check", ok, out)
    if not check_criu().ok:
        return Check("criu check", False, out + " — " + MAKE_SETUP)
    if not check_root().ok:
        return Check("criu check", False, out + " — run as root")
    return Check("criu check", False, out + " — if CRIU was built for another kernel, " + MAKE_SETUP)


@_memo
def check_criu_uffd() -> Check:
    """CRIU's own view of userfaultfd (its kerndat), which is what lazy restore uses."""
    ok, out = _run_criu_check("--feature", "uffd-noncoop")
    return Check("criu uffd-noncoop", ok, out)


# --- paths -------------------------------------------------------------------


def _path(checks, ok_note="", caveats=()) -> Path:
    failed = [c for c in checks if not c.ok]
    if failed:
        return Path(False, "; ".join(f"{c.name}: {c.detail}" for c in failed))
    notes = [ok_note] + [f"caveat: {c.name}: {c.detail}" for c in caveats if not c.ok]
    return Path(True, "; ".join(n for n in notes if n))


def lazy_restore_path() -> Path:
    """CRIU restores with --lazy-pages and the engine serves the faults."""
    checks = [check_root(), check_capabilities(), check_ptrace(), check_uffd_syscall()]
    checks += [check_uffd_feature(n) for n in LAZY_FEATURES]
    checks += [check_criu(), check_criu_check(), check_criu_uffd()]
    return _path(
        checks,
        "userfaultfd with {}; {}".format("/".join(LAZY_FEATURES), check_criu().detail),
        caveats=[
            check_sys_resource(),
            check_criu_patches(),
            check_criu_lazy_in_place(),
            check_criu_early_vmas(),
            check_criu_hook(),
        ],
    )


def uffd_wp_path() -> Path:
    """Pre-copy rounds find written pages with uffd-wp async + PAGEMAP_SCAN."""
    checks = [check_uffd_feature(n) for n in WP_FEATURES]
    checks += [check_pagemap_scan(), check_pidfd_getfd(), check_process_vm_readv()]
    return _path(checks, "WP_ASYNC + PAGEMAP_SCAN, uffd taken with pidfd_getfd, pages read with process_vm_readv")


def soft_dirty_path() -> Path:
    """Pre-copy rounds find written pages with clear_refs 4 + pagemap bit 55."""
    return _path(
        [check_soft_dirty(), check_process_vm_readv()], "clear_refs + pagemap bit 55, pages read with process_vm_readv"
    )


def page_server_path() -> Path:
    """CRIU's page server, which needs ~4 MiB pipes."""
    return _path([check_criu(), check_pipe_max_size()], "pipes of 4 MiB allowed")


def paths() -> dict:
    return {
        LAZY_RESTORE: lazy_restore_path(),
        UFFD_WP: uffd_wp_path(),
        SOFT_DIRTY: soft_dirty_path(),
        PAGE_SERVER: page_server_path(),
    }


def dirty_tracker() -> str | None:
    """'uffd-wp' (preferred), 'soft-dirty', or None when neither works."""
    if uffd_wp_path().ok:
        return "uffd-wp"
    if soft_dirty_path().ok:
        return "soft-dirty"
    return None


def all_checks() -> list[Check]:
    checks = [
        check_kernel(),
        check_root(),
        check_capabilities(),
        check_sys_resource(),
        check_pipe_max_size(),
        check_ptrace(),
        check_uffd_syscall(),
        check_uffd_dev(),
        check_uffd_features(),
    ]
    checks += [check_uffd_feature(n) for n in LAZY_FEATURES + WP_FEATURES]
    checks += [
        check_pagemap_scan(),
        check_soft_dirty(),
        check_process_vm_readv(),
        check_pidfd_getfd(),
        check_criu(),
        check_criu_patches(),
        check_criu_lazy_in_place(),
        check_criu_early_vmas(),
        check_criu_pre_restore_first(),
        check_criu_hook(),
        check_criu_check(),
        check_criu_uffd(),
    ]
    return checks


def remedies(reasons) -> list[str]:
    """The distinct fixes (the text after ' — ') named in path reasons."""
    fixes: list[str] = []
    for reason in reasons:
        for part in reason.split("; "):
            fix = part.split(" — ", 1)[1] if " — " in part else None
            if not fix or any(f.startswith(fix) for f in fixes):
                continue
            # "run as root (in a container, ...)" supersedes "run as root"
            fixes = [f for f in fixes if not fix.startswith(f)] + [fix]
    return fixes


def problems() -> list[str]:
    """Why the engine cannot run here, with what to do; empty when it can."""
    out = []
    lazy = lazy_restore_path()
    if not lazy.ok:
        out.append(f"{LAZY_RESTORE}: {lazy.reason}")
    if dirty_tracker() is None:
        out.append(f"no dirty tracker: {UFFD_WP}: {uffd_wp_path().reason}; {SOFT_DIRTY}: {soft_dirty_path().reason}")
    return out


# --- for the engine ----------------------------------------------------------


def require_lazy_restore():
    """Raise SetupError unless CRIU lazy restore with our fault handler can run."""
    path = lazy_restore_path()
    if not path.ok:
        raise SetupError("lazy restore cannot run on this machine: " + path.reason)


def require_dirty_tracker() -> str:
    """The dirty tracker to use ('uffd-wp' or 'soft-dirty'); SetupError if none works."""
    tracker = dirty_tracker()
    if tracker is None:
        raise SetupError(
            f"no dirty tracker works on this machine: {UFFD_WP}: {uffd_wp_path().reason}; {SOFT_DIRTY}: {soft_dirty_path().reason}"  # noqa: E501
        )
    return tracker


def require_criu() -> str:
    """Path of a working CRIU >= 4.2; SetupError otherwise."""
    for check in (check_criu(), check_criu_check()):
        if not check.ok:
            raise SetupError(f"{check.name}: {check.detail}")
    path = find_criu()
    assert path is not None  # check_criu() found it
    return path


# --- the command -------------------------------------------------------------


def report() -> dict:
    """Everything `doctor --json` prints."""
    return {
        "checks": [asdict(c) for c in all_checks()],
        "paths": {name: asdict(p) for name, p in paths().items()},
        "tracker": dirty_tracker(),
    }


def _render(rep):
    from rich.console import Console
    from rich.table import Table

    console = Console()
    mark = {True: "[green]ok[/]", False: "[red]FAIL[/]"}
    table = Table(title="hybridmig doctor: checks", title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for c in rep["checks"]:
        table.add_row(mark[c["ok"]], c["name"], c["detail"])
    console.print(table)

    table = Table(title="what can run here", title_justify="left")
    table.add_column("", no_wrap=True)
    table.add_column("path", no_wrap=True)
    table.add_column("why", overflow="fold")
    for name, p in rep["paths"].items():
        table.add_row(mark[p["ok"]], name, p["reason"])
    console.print(table)
    console.print("dirty tracker: [bold]%s[/]" % (rep["tracker"] or "none"))


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.pass_context
def doctor(ctx, as_json):
    """Check that this machine can run hybridmig, and which paths it will take."""
    rep = report()
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        _render(rep)
    trouble = problems()
    if trouble:
        click.echo("hybridmig cannot run on this machine:", err=True)
        for line in trouble:
            click.echo("  - " + line, err=True)
        fixes = remedies(trouble)
        if fixes:
            click.echo("what to do: " + "; ".join(fixes), err=True)
        ctx.exit(1)
