"""`hybridmig doctor` and the kernel probes, against what this machine offers.

Expectations come from sources independent of the probes where there are
some: os.uname() for the kernel, `criu --version` for CRIU, /proc/config.gz
for what the kernel was built with. On the reference machine (6.18, root,
no CONFIG_MEM_SOFT_DIRTY) that means WP_ASYNC granted, PAGEMAP_SCAN
working, soft-dirty unavailable, the uffd-wp tracker, and exit status 0.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest

from hybridmig import doctor
from hybridmig.bindings import probe
from hybridmig.errors import NativeError, SetupError

HYBRIDMIG = os.path.join(os.path.dirname(sys.executable), "hybridmig")


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: CRIU and the full userfaultfd syscall are root-only")


def _kernel_config() -> dict:
    """CONFIG_* -> value of the running kernel, from /proc/config.gz."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            lines = f.read().splitlines()
    except OSError:
        pytest.skip("no /proc/config.gz: cannot tell independently what the kernel was built with")
    return dict(line.split("=", 1) for line in lines if line.startswith("CONFIG_") and "=" in line)


def _built_with(*options) -> bool:
    config = _kernel_config()
    return all(config.get(o) == "y" for o in options)


def _wp_async_expected() -> bool:
    return doctor.kernel_version() >= (6, 7) and _built_with("CONFIG_USERFAULTFD", "CONFIG_HAVE_ARCH_USERFAULTFD_WP")


def _doctor(*args, **kw):
    return subprocess.run([HYBRIDMIG, "doctor", *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def run():
    """(the finished `hybridmig doctor --json`, its parsed output)."""
    proc = _doctor("--json")
    return proc, json.loads(proc.stdout)


@pytest.fixture(scope="module")
def checks(run):
    return {c["name"]: c for c in run[1]["checks"]}


# --- the command -------------------------------------------------------------


def test_json_shape(run):
    _, rep = run
    assert set(rep) == {"checks", "paths", "tracker"}
    for c in rep["checks"]:
        assert set(c) == {"name", "ok", "detail"}
        assert isinstance(c["ok"], bool) and c["detail"]
    assert len({c["name"] for c in rep["checks"]}) == len(rep["checks"])
    assert set(rep["paths"]) >= {doctor.LAZY_RESTORE, doctor.UFFD_WP, doctor.SOFT_DIRTY}
    for p in rep["paths"].values():
        assert set(p) == {"ok", "reason"} and isinstance(p["ok"], bool)
    assert rep["tracker"] in (None, "uffd-wp", "soft-dirty")


def test_kernel_matches_uname(checks):
    assert checks["kernel"]["ok"]
    assert checks["kernel"]["detail"].startswith(os.uname().release + " ")


def test_criu_matches_criu_version(checks):
    criu = shutil.which("criu") or next((p for p in doctor.CRIU_FALLBACKS if os.access(p, os.X_OK)), None)
    if not criu or os.environ.get("CRIU"):
        pytest.skip("no criu binary (or $CRIU overrides it)")
    out = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=30).stdout
    version = next(line.split()[1] for line in out.splitlines() if line.startswith("Version:"))
    assert checks["criu"]["detail"] == f"{criu}, version {version}"
    assert checks["criu"]["ok"] == (tuple(int(x) for x in version.split(".")[:2]) >= (4, 2))


def test_wp_async_granted(checks):
    expected = _wp_async_expected()
    assert checks["uffd feature WP_ASYNC"]["ok"] == expected
    assert checks["uffd feature WP_UNPOPULATED"]["ok"] == expected
    assert ("WP_ASYNC" in checks["userfaultfd features"]["detail"].split()) == expected


def test_pagemap_scan_works(checks):
    expected = _wp_async_expected() and _built_with("CONFIG_PROC_PAGE_MONITOR")
    assert checks["PAGEMAP_SCAN"]["ok"] == expected, checks["PAGEMAP_SCAN"]["detail"]


def test_soft_dirty_matches_config(checks):
    expected = _built_with("CONFIG_MEM_SOFT_DIRTY")
    assert checks["soft-dirty"]["ok"] == expected, checks["soft-dirty"]["detail"]
    if not expected:
        assert "CONFIG_MEM_SOFT_DIRTY" in checks["soft-dirty"]["detail"]


def test_tracker_prefers_uffd_wp(run):
    _, rep = run
    if rep["paths"][doctor.UFFD_WP]["ok"]:
        assert rep["tracker"] == "uffd-wp"
    elif rep["paths"][doctor.SOFT_DIRTY]["ok"]:
        assert rep["tracker"] == "soft-dirty"
    else:
        assert rep["tracker"] is None


@pytest.mark.root
def test_exits_zero_here(run):
    _need_root()
    proc, rep = run
    assert proc.returncode == 0, proc.stderr
    assert rep["paths"][doctor.LAZY_RESTORE]["ok"], rep["paths"][doctor.LAZY_RESTORE]["reason"]
    assert rep["tracker"] == ("uffd-wp" if _wp_async_expected() else "soft-dirty")


@pytest.mark.root
def test_human_output():
    _need_root()
    proc = _doctor()
    assert proc.returncode == 0, proc.stderr
    assert "PAGEMAP_SCAN" in proc.stdout and "dirty tracker:" in proc.stdout


@pytest.mark.root
def test_non_root_is_told_to_run_as_root():
    _need_root()
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root")
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            HYBRIDMIG,
            "doctor",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
    )
    if "Permission denied" in proc.stderr:
        pytest.skip("user nobody cannot read the virtualenv")
    assert proc.returncode != 0
    assert "what to do: run as root" in proc.stderr
    rep = json.loads(proc.stdout)
    assert not rep["paths"][doctor.LAZY_RESTORE]["ok"]


# --- the engine's entry points -----------------------------------------------


@pytest.mark.root
def test_require_functions_here():
    _need_root()
    doctor.require_lazy_restore()
    assert doctor.require_dirty_tracker() == ("uffd-wp" if _wp_async_expected() else "soft-dirty")
    assert doctor.require_criu() == doctor.find_criu()


def test_require_criu_explains(monkeypatch):
    monkeypatch.setenv("CRIU", "/nonexistent/criu")
    doctor.refresh()
    try:
        with pytest.raises(SetupError, match="make setup"):
            doctor.require_criu()
        with pytest.raises(SetupError, match="lazy restore cannot run"):
            doctor.require_lazy_restore()
    finally:
        monkeypatch.delenv("CRIU")
        doctor.refresh()


def test_criu_without_the_patches_is_a_caveat(monkeypatch, tmp_path):
    """A CRIU <= 4.2.1 that make setup did not build (no stamp next to it)
    is named with what it does wrong and the fix; lazy restore still runs."""
    criu = doctor.find_criu()
    if not criu or doctor.criu_version(criu) is None or doctor.criu_version(criu) > doctor.LAST_UNPATCHED_CRIU:
        pytest.skip("needs a CRIU <= {}".format(".".join(map(str, doctor.LAST_UNPATCHED_CRIU))))
    released = tmp_path / "criu"
    shutil.copy(os.path.realpath(criu), released)
    monkeypatch.setenv("CRIU", str(released))
    doctor.refresh()
    try:
        check = doctor.check_criu_patches()
        assert not check.ok and "makes no page lazy" in check.detail and "make setup" in check.detail
        if os.geteuid() == 0:
            lazy = doctor.lazy_restore_path()
            assert lazy.ok and "caveat: criu patches" in lazy.reason, lazy.reason
        (tmp_path / doctor.CRIU_PATCH_STAMP).write_text("stamp\n")
        doctor.refresh()
        assert doctor.check_criu_patches().ok
    finally:
        monkeypatch.delenv("CRIU")
        doctor.refresh()


def test_capabilities_parse():
    caps = doctor.capabilities()
    assert set(caps) == set(doctor.CAPS)
    if os.geteuid() != 0:
        assert not caps["CAP_SYS_ADMIN"]


def test_kernel_version_parse():
    assert doctor.kernel_version("6.18.44-fc-v657") == (6, 18, 44)
    assert doctor.kernel_version("6.1.0-13-amd64") == (6, 1, 0)
    assert doctor.kernel_version("5.15") == (5, 15, 0)


# --- the probe wrappers ------------------------------------------------------


def test_feature_table():
    bits = list(probe.FEATURES.values())
    assert bits == [1 << i for i in range(len(bits))]  # uapi bit order, no gaps
    assert probe.FEATURES["WP_ASYNC"] == 1 << 15 and probe.FEATURES["EVENT_UNMAP"] == 1 << 6
    assert probe.decode_features(0) == []
    assert probe.decode_features((1 << 15) | (1 << 40)) == ["WP_ASYNC", "bit40"]
    assert probe.encode_features(["EVENT_FORK", "MOVE"]) == (1 << 1) | (1 << 16)
    assert probe.decode_ioctls((1 << 0x3F) | 3) == ["REGISTER", "UNREGISTER", "API"]


def test_probe_uffd():
    info = probe.probe_uffd()
    assert info.features == probe.decode_features(info.feature_mask)
    assert {"REGISTER", "UNREGISTER", "API"} <= set(info.ioctls)
    assert info.via in probe.WAYS.values()
    assert ("WP_ASYNC" in info.features) == _wp_async_expected()
    # user-mode-only is always allowed, and offers the same features
    assert probe.probe_uffd_open(probe.USER_ONLY).feature_mask == info.feature_mask


@pytest.mark.root
def test_probe_uffd_open_grants():
    _need_root()  # EVENT_FORK needs CAP_SYS_PTRACE
    for way in (probe.SYSCALL, probe.DEV):
        info = probe.probe_uffd_open(way, doctor.LAZY_FEATURES)
        assert info.via == probe.WAYS[way]
    if _wp_async_expected():
        probe.probe_uffd_open(probe.SYSCALL, ["WP_ASYNC"])


def test_probe_uffd_open_refuses():
    with pytest.raises(ValueError):
        probe.probe_uffd_open(7)
    with pytest.raises(KeyError):
        probe.probe_uffd_open(probe.USER_ONLY, ["NO_SUCH_FEATURE"])
    # a feature this kernel lacks is refused with EINVAL (none lacks one on 6.8+)
    missing = [name for name in probe.FEATURES if name not in probe.probe_uffd().features]
    if missing:
        with pytest.raises(NativeError) as e:
            probe.probe_uffd_open(probe.USER_ONLY, missing[:1])
        assert e.value.errno == errno.EINVAL


def test_probe_results_match_config():
    if _wp_async_expected() and _built_with("CONFIG_PROC_PAGE_MONITOR"):
        assert probe.probe_pagemap_scan() is None
    if _built_with("CONFIG_MEM_SOFT_DIRTY"):
        assert probe.probe_soft_dirty() is None
    else:
        with pytest.raises(NativeError) as e:
            probe.probe_soft_dirty()
        assert e.value.errno == errno.EOPNOTSUPP
        assert "hm_probe_soft_dirty" in str(e.value)
    if _built_with("CONFIG_CROSS_MEMORY_ATTACH"):
        assert probe.probe_process_vm_readv() is None
    assert probe.probe_pidfd_getfd() is None


def test_probes_leave_nothing_behind():
    def footprint():
        with open("/proc/self/maps") as f:
            return len(os.listdir("/proc/self/fd")), len(f.read().splitlines())

    before = footprint()
    for _ in range(50):
        probe.probe_uffd()
        for call in (
            probe.probe_pagemap_scan,
            probe.probe_soft_dirty,
            probe.probe_process_vm_readv,
            probe.probe_pidfd_getfd,
        ):
            try:
                call()
            except NativeError:
                pass
    assert footprint() == before
