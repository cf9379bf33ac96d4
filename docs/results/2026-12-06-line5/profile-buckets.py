"""perf samples of run and serve per symbol bucket, as CPU-s per GiB."""
import re, subprocess, sys, collections
data, hz, gib = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
window = sys.argv[4] if len(sys.argv) > 4 else None
cmd = ["perf", "report", "-i", data, "--no-children", "--sort", "pid,dso,sym", "-F", "sample,pid,dso,sym", "--stdio"]
if window:
    cmd += ["--time", window]
out = subprocess.run(cmd, capture_output=True, text=True).stdout
rows = []
for line in out.splitlines():
    m = re.match(r"\s*(\d+)\s+(\d+):(\S+)\s+(\S+)\s+\[(.)\]\s+(.*)", line)
    if m:
        rows.append((int(m[1]), int(m[2]), m[3], m[4], m[6].strip()))
by_pid = collections.defaultdict(list)
for r in rows:
    by_pid[r[1]].append(r)
def role(rs):
    syms = {r[4] for r in rs}
    if "hm_read_pages" in syms or any("process_vm" in s for s in syms): return "source (run)"
    if any(s.startswith("hm_store_put") for s in syms): return "destination (serve)"
    if sum(r[0] for r in rs) > 50: return "other: " + rs[0][2]
    return None
BUCKETS = [
    ("read pages (process_vm_readv, GUP)", ("process_vm", "follow_page", "get_user_pages", "try_grab", "unpin_user", "gup_", "hm_read_pages", "copy_page_to_iter", "_copy_to_iter@src")),
    ("tracker (pagemap scan, write-protect)", ("pagemap", "change_pte", "change_prot", "uffd", "prot_commit", "ptep_modify", "flush_tlb", "mwriteprotect")),
    ("socket send copy", ("_copy_from_iter", "copy_from_user_iter")),
    ("socket recv copy", ("_copy_to_iter", "copy_to_user", "simple_copy_to_iter", "skb_copy_datagram")),
    ("TCP/IP stack, veth, skb", ("tcp_", "ip_", "skb", "__dev", "veth", "netif", "net_rx", "__netif", "napi", "sock_", "__sys_sendmsg", "__sys_recv", "inet_", "kfree_skb", "__alloc_skb", "dev_", "__tcp", "nf_", "ipv4", "sk_", "release_sock", "lock_sock", "do_softirq", "__local_bh", "page_frag", "__napi", "raw_", "ktime", "eth_", "gro")),
    ("AES-GCM / GMAC", ("aes", "gcm", "ghash", "gmac", "ossl_", "EVP_")),
    ("lz4", ("LZ4",)),
    ("store copy (memmove)", ("memmove", "memcpy", "hm_store")),
    ("page faults, zeroing, allocation", ("clear_page", "handle_mm_fault", "do_anonymous", "alloc_pages", "folio", "__mem_cgroup", "rmqueue", "get_page_from_freelist", "lru", "madvise", "populate", "do_user_addr_fault", "exc_page_fault", "asm_exc_page_fault", "__pte", "pte_", "free_", "__free", "zap", "release_pages", "mas_", "vma", "charge", "memcg", "page_counter", "__list", "free_pcppages")),
    ("python", ("Py", "_Py", "frame", "tuple", "dict", "list_", "long_", "unicode", "object_", "lookdict", "gc_", "method_", "slot_", "cfunction", "vectorcall", "PyEval", "func_", "initialize_locals")),
    ("syscall entry, scheduling, locks", ("entry_", "syscall", "schedule", "__schedule", "futex", "pthread", "finish_task", "switch", "mutex", "spin", "__x64", "do_syscall", "rcu", "select_task", "enqueue", "dequeue", "update_", "try_to_wake", "psi", "_raw", "irq", "native_")),
]
for pid, rs in by_pid.items():
    who = role(rs)
    if not who: continue
    total = sum(r[0] for r in rs)
    b = collections.Counter()
    for n, _, comm, dso, sym in rs:
        for name, keys in BUCKETS:
            if any(k.lower() in sym.lower() for k in keys):
                b[name] += n; break
        else:
            b["other"] += n
    print(f"{who} pid {pid}: {total/hz/gib:.2f} CPU-s/GiB ({total} samples)")
    for name, n in b.most_common():
        print(f"   {name:42s} {n/hz/gib:5.2f}")
    top = collections.Counter()
    for n, _, comm, dso, sym in rs:
        top[sym] += n
    print("   top:", ", ".join(f"{s} {n/hz/gib:.3f}" for s, n in top.most_common(12)))
