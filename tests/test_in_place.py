"""The switch-over with CRIU's --lazy-pages-in-place (scripts/criu-patches/0002):
CRIU's dump records every page of the tree in its pagemap, lazy, but copies
none of them while the tree is frozen, whatever the size; the restored tree
still has every page (memwork checks each one), and `run --json` splits
CRIU's freeze-to-dumped time into its phases.

CRIU's own numbers are read from its stats-dump (run --work-dir keeps the
images): pages_lazy, the pages recorded lazy in the pagemap; pages_written,
those copied into the images; page_pipes, the pipes the parasite vmsplices
pages into (one per MiB of lazy memory without the option).

Run with the patched CRIU (CRIU=path, or after make setup); with a CRIU
built by make setup without the patch these tests fail.
"""

import pytest

from hybridmig import doctor
from test_migrate import assert_migrated, env  # noqa: F401  (env: the fixture)

MIB = 1 << 20
PAGE = 4096
SIZES = (256, 1024)  # MiB


def dump_stats(work):
    import pycriu  # here, not above: make test-unit collects this module without pycriu

    with open(work / "images" / "stats-dump", "rb") as f:
        return pycriu.images.load(f)["entries"][0]["dump"]


def pagemap_pages(work):
    """Pages CRIU's pagemap images list (every entry after each file's header)."""
    import pycriu

    total = 0
    for path in (work / "images").glob("pagemap-*.img"):
        with open(path, "rb") as f:
            total += sum(e["nr_pages"] for e in pycriu.images.load(f)["entries"][1:])
    return total


def anon_pages(pids):
    """The tree's anonymous pages, in RAM or swapped: what a dump must keep."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if " " not in line.split(":", 1)[0])
        total += sum(int(fields[k].split()[0]) for k in ("Anonymous", "Swap")) * 1024 // PAGE
    return total


@pytest.fixture
def in_place_criu():
    check = doctor.check_criu_lazy_in_place()
    if not check.ok and not doctor.check_criu_patches().reason.startswith("built by make setup"):
        pytest.skip(check.reason)  # a CRIU from elsewhere; one make setup built must have it


@pytest.mark.timeout(600)
def test_switch_over_copies_no_page_at_two_sizes(env, in_place_criu):  # noqa: F811
    seen = {}
    for size in SIZES:
        wl = env.workload(size, threads=1, rate=2000)
        serve = env.serve()
        work = env.new_dir("work") / "run"
        had = anon_pages(wl.pids())  # memwork rewrites its pages, it adds none: what the dump will find
        rc, rep, err = env.run(wl.host_pid, "--work-dir", str(work))
        new = assert_migrated(env, wl, rc, rep, err, serve, size)
        new.stop()
        assert rep["criu_lazy_pages_in_place"] is True, rep
        stats = dump_stats(work)
        pages = size * MIB // PAGE
        # every page of memwork's region is in the pagemap, lazy (plus its stacks, heap, libc's data)
        assert pages <= stats["pages_lazy"] <= pages + 4096, stats
        # the pagemap CRIU wrote lists them all: every page the tree had. A few hundred more: the
        # vDSO's (dumped whole), and the uffd-wp markers our tracker leaves on empty PTEs
        # (UFFD_FEATURE_WP_UNPOPULATED), which PAGEMAP_SCAN reports as swapped pages; a plain dump of
        # memwork lists its anonymous pages + 3
        listed = pagemap_pages(work)
        assert listed == stats["pages_lazy"] + stats["pages_written"], (listed, stats)
        assert had <= listed <= had + 1024, (listed, had)
        print(size, "MiB: pagemap", listed, "pages, the tree had", had)
        # ... and none was copied: no page pipe for them; the few pages written are the
        # ones that are never lazy (the stack pages under a thread's sp, file-backed data)
        assert stats["pages_written"] < 64, stats
        assert stats["page_pipes"] <= 2, stats
        phases = rep["criu_dump_phases_ms"]
        assert {"seize", "network_lock", "vmas", "parasite", "pagemap", "page_pipes", "images"} <= set(phases)
        assert all(v >= 0 for v in phases.values()), phases  # hooks_and_rest too: CRIU's span is inside ours
        assert abs(sum(phases.values()) - rep["breakdown"]["freeze_to_dumped_ms"]) < 1, (phases, rep["breakdown"])
        seen[size] = (stats, phases)
        print(size, "MiB: stats", stats, "phases", phases)
    small, large = (seen[s][0] for s in SIZES)
    assert large["pages_lazy"] - small["pages_lazy"] >= (SIZES[1] - SIZES[0]) * MIB // PAGE
    assert large["page_pipes"] == small["page_pipes"], (small, large)


@pytest.mark.timeout(300)
def test_without_the_option_every_page_goes_through_a_pipe(env, in_place_criu):  # noqa: F811
    """The same switch-over with --criu-opt=--no-lazy-pages-in-place: CRIU's
    own behaviour, a page pipe per MiB (what the test above tells apart)."""
    size = SIZES[0]
    wl = env.workload(size, threads=1, rate=2000)
    serve = env.serve()
    work = env.new_dir("work") / "run"
    rc, rep, err = env.run(wl.host_pid, "--work-dir", str(work), "--criu-opt=--no-lazy-pages-in-place")
    assert_migrated(env, wl, rc, rep, err, serve, size)
    assert rep["criu_lazy_pages_in_place"] is False, rep
    stats = dump_stats(work)
    assert stats["pages_lazy"] >= size * MIB // PAGE, stats
    assert stats["page_pipes"] >= size // 4, stats  # pipes of at most fs.pipe-max-size (1-4 MiB here)
    assert rep["criu_dump_phases_ms"]["page_pipes"] > 0, rep


def test_dump_phases_of_a_log(tmp_path):
    """dump_phases() from a -v3 log: each phase runs until the next one's mark."""
    from hybridmig.criu.command import dump_phases

    log = tmp_path / "dump.log"
    log.write_text(
        "\n".join(
            [
                "(00.000100) Dumping processes (pid: 1 comm: memwork)",
                "(00.009000) irmap: Searching irmap cache in work dir",
                "(00.009500) Preparing image inventory (version 1)",
                "(00.011000) net: Lock network",
                "(00.011500) 	type proc source proc",
                "(00.013000) Dumping task (pid: 1 comm: memwork)",
                "(00.013100) Collecting mappings (pid: 1)",
                "pie: 1: a line of the parasite's",
                "(00.020000) Collected, longest area occupies 1 pages",
                "(00.021000) Dumping pages (type: 59 pid: 1)",
                "(00.022000) Pagemap generated: 2 pages (1 lazy) 0 holes",
                "(00.030000) Pagemap generated: 9 pages (9 lazy) 0 holes",
                "(00.031000) ----------------------------------------",
                "(00.034000) Dumping core (pid: 1)",
                "(00.040000) Writing image inventory (version 1)",
            ]
        )
        + "\n"
    )
    got = dump_phases(log)
    want = {
        "seize": 2.0,
        "network_lock": 0.5,
        "namespaces": 1.5,
        "task": 0.1,
        "vmas": 6.9,
        "parasite": 1.0,
        "pagemap": 9.0,
        "page_pipes": 4.0,
        "images": 6.0,
    }
    assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-6 for k in want), got
    log.write_text("(00.010000) Dumping processes (pid: 1 comm: memwork)\n")  # never reached post-dump
    assert dump_phases(log) == {}
