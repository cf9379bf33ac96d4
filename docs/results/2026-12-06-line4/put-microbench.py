import time, sys, os, resource
from hybridmig.bindings.pagestore import PageStore
warm = sys.argv[1] == "warm"
s = PageStore()
frame = os.urandom(1 << 20)
if warm:
    s.warm(64 << 20); time.sleep(0.2)
t = time.perf_counter(); c0 = time.thread_time(); r0 = resource.getrusage(resource.RUSAGE_SELF)
hits = 0
for i in range(2048):
    s.put(1, (1 << 30) + i * (1 << 20), frame)
dt = time.perf_counter() - t; ct = time.thread_time() - c0; r1 = resource.getrusage(resource.RUSAGE_SELF)
pc = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
print(f"{sys.argv[1]}: {2048/1024/dt*1.074:.2f} GB/s wall, putting thread {ct/2:.2f} CPU-s/GiB, process {pc/2:.2f} CPU-s/GiB")
