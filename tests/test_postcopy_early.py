"""Post-copy that switches over early (--postcopy-after below 1), end to
end: real CRIU, real userfaultfd, memwork checking every page, two network
namespaces.

`--postcopy-after 0` sends no round: the tree is frozen as soon as CRIU is
ready, the copy resumes on the destination with none of its memory there,
and every page is pushed from the frozen source or faulted in (QEMU's pure
post-copy). `--postcopy-after 0.5` stops round 0 half way: the owed set is
what round 0 did not reach plus what was written after it was sent."""

import pytest

from migrate_util import state
from test_migrate import assert_intact, assert_migrated
from test_migrate import env as env  # noqa: F401 -- the fixture
from test_postcopy import (
    cut_link,
    fork_and_churn_during_postcopy,
    link_cut_for_good,
    postcopy_running,
    source_killed_during_postcopy,
)

MIB = 1 << 20
PAGE = 4096
pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.slow]


def assert_early(rep, share, size_mb, procs=1):
    """Round 0 sent at most `share` of the memory (no page at 0), and the
    rest came after the resume, pushed or faulted in."""
    r0, pc = rep["rounds"][0], rep["postcopy"]
    assert rep["switchover"] == "postcopy" and "round 0" in rep["stop_reason"], rep["stop_reason"]
    memory = procs * size_mb * MIB // PAGE
    if share == 0:
        assert r0["pages_sent"] == 0, r0
    else:  # (round 0 also reads the tree's other mappings: a few hundred pages)
        assert 0 < r0["pages_sent"] <= share * memory + 4096, r0
    assert pc["pages_pushed"] + pc["pages_fetched"] >= (1 - share) * memory, pc
    print("round 0: %d pages; post-copy: %s" % (r0["pages_sent"], pc))


@pytest.mark.timeout(300)
def test_postcopy_now_with_fork_and_churn_during_it(env):
    """No round at all, over a slow link: while the copy still lacks most
    of its pages it forks a child that checks the inherited snapshot
    (fork-verify) and churns its mappings (mmap, munmap, mremap, madvise)
    and checks them: all verified, then the whole memory."""
    wl = env.workload(96, rate=20000, procs=2)
    rep = fork_and_churn_during_postcopy(env, wl, "--postcopy-after", "0", "--bandwidth-limit", "15M")
    assert_early(rep, 0, 96, procs=2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("share", ["0", "0.5"])
def test_early_postcopy_migrates_every_page(env, share):
    """Post-copy with no round, and after half of round 0: every page
    verified; a page round 0 sent and the tree wrote again is not used."""
    wl = env.workload(64, rate=5000, threads=2)
    serve = env.serve()
    rc, rep, err = env.run(
        wl.host_pid, "--switchover", "postcopy", "--postcopy-after", share, "--bandwidth-limit", "40M"
    )
    assert_migrated(env, wl, rc, rep, err, serve, 64, postcopy=True, round0=float(share))
    assert_early(rep, float(share), 64)
    assert len(rep["rounds"]) == 3, rep["rounds"]  # round 0 (a part or none), round 1's scan, the post-copy


@pytest.mark.timeout(300)
def test_link_cut_during_postcopy_now_that_heals_completes(env):
    """No round, the link down for 8 s while the copy lacks most pages:
    its faults wait, the connection carries on, every page verified."""
    wl = env.workload(64, rate=20000)
    serve, run, restored = postcopy_running(
        env, wl, "--postcopy-after", "0", "--bandwidth-limit", "4M", "--timeout", "60"
    )
    cut_link(env, run, restored, 8)
    rc, rep, err = run.wait(180)
    assert_migrated(env, wl, rc, rep, err, serve, 64, postcopy=True, round0=0)
    assert_early(rep, 0, 64)
    assert rep["postcopy"]["post_resume_s"] > 8, rep["postcopy"]


@pytest.mark.timeout(300)
def test_link_cut_for_good_during_postcopy_now_leaves_the_source_intact(env):
    """No round, the link down for good: the destination ends its copy
    (which held none of the memory but what it was sent), the source stays
    frozen in its criu dump, whole; resumed here and verified."""
    link_cut_for_good(env, "--postcopy-after", "0")


@pytest.mark.timeout(300)
def test_source_killed_during_postcopy_now_loses_the_process(env):
    """The unrecoverable case, with no round: the frozen source is killed
    while it holds the only copy of most pages. run reports them lost; the
    destination ends its copy rather than run on memory it lacks."""
    source_killed_during_postcopy(env, "--postcopy-after", "0")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args, says",
    [
        (("--switchover", "precopy", "--postcopy-after", "0.5"), "needs --switchover postcopy"),
        (("--switchover", "postcopy", "--postcopy-after", "1.5"), "a share of round 0 from 0 to 1"),
        (("--switchover", "postcopy", "--postcopy-after", "nan"), "a share of round 0 from 0 to 1"),
    ],
)
def test_postcopy_after_below_one_round_refused_where_it_means_nothing(env, args, says):
    """A share of round 0 without post-copy, or a fraction of a later
    round: a clear error, the source untouched and running."""
    wl = env.workload(16, rate=500)
    env.serve()
    rc, rep, err = env.run(wl.host_pid, *args)
    assert rc != 0, (rc, rep)
    assert says in err or (rep and says in rep.get("error", "")), (err, rep)
    assert state(wl.host_pid) not in ("t", "T", "Z")
    assert_intact(wl.verify(), 1)
