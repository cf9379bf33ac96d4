"""The heap keeps what a decoded lz4 frame frees (hybridmig/heap.py): a
process that went through the `hybridmig` entry point decodes frames in
its main thread without faulting fresh memory for each, and one that did
not (the glibc default) does, so the test can tell them apart."""

import json
import subprocess
import sys

# In a fresh interpreter: optionally the entry point first (`hybridmig
# --help`, which exits through click), then FRAMES lz4 PAGES frames of
# 256 compressible pages decoded in the main thread, as serve's session
# does; prints the minor faults per frame.
SCRIPT = """
import os, resource, sys
from hybridmig import wire
if sys.argv[1] == "entry":
    from hybridmig.cli import main
    sys.argv[1:] = ["--help"]
    try:
        main()
    except SystemExit:
        pass
pages = b"".join(os.urandom(512) * 8 for _ in range(256))
body, packed = wire.encode_pages(1, [(1 << 30, 256, bytes(32))], pages)
assert packed
wire.decode_pages(body)  # (the first frame grows the heap)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    _, _, data = wire.decode_pages(body)
    assert data == pages
    del data
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200))
"""


def faults_per_frame(mode):
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + SCRIPT, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_entry_point_keeps_a_frames_memory():
    # a 1 MiB frame is 256 pages: glibc's default trims and faults it back
    # (twice: python-lz4's buffer and the bytes it returns)
    assert faults_per_frame("plain") > 256
    assert faults_per_frame("entry") < 8
