import mmap, time, sys, resource, os
MADV_POPULATE_WRITE = 23
MADV_HUGEPAGE = 14
size = int(sys.argv[1]) << 20
huge = sys.argv[2] == "huge"
m = mmap.mmap(-1, size + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
al = (base + (2 << 20) - 1) & ~((2 << 20) - 1)
if huge:
    assert libc.madvise(ctypes.c_void_p(al), ctypes.c_size_t(size), MADV_HUGEPAGE) == 0
r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
for off in range(0, size, 2 << 20):
    rc = libc.madvise(ctypes.c_void_p(al + off), ctypes.c_size_t(2 << 20), MADV_POPULATE_WRITE)
    assert rc == 0, ctypes.get_errno()
dt = time.perf_counter() - t; r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
ahp = [l for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0].split()[1]
print(f"{sys.argv[2]} {size>>20} MiB: {size/dt/1e6:.0f} MB/s wall, {cpu/(size/(1<<30)):.2f} CPU-s/GiB, AnonHuge {int(ahp)>>10} MiB")
