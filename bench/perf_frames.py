#!/usr/bin/env python3
"""Inclusive cost of named frames in a perf profile.

Reads `perf script` output (recorded with call graphs, e.g. `--call-graph
dwarf` on a build with line tables) and prints, for each group of frames,
the share of samples whose stack contains any of them. Unlike perf's own
reports this survives inlining and tokio's deep poll stacks: a sample counts
once per group, whatever the depth.

usage: perf script -i perf.data | perf_frames.py [--comm idemproxy]
"""

import re
import sys

GROUPS = [
    ("sled: records get (claim/finish read)", [r"sled::tree::Tree::get\b", r"sled::tree::Tree::get_inner"]),
    ("sled: records compare_and_swap", [r"sled::tree::Tree::compare_and_swap"]),
    ("sled: expiry index insert (SledStore::index)", [r"SledStore::index", r"sled::tree::Tree::insert\b"]),
    ("sled: background threads (flusher, epoch GC)", [r"sled::threadpool", r"sled::flusher"]),
    ("sled: epoch garbage collection", [r"crossbeam_epoch"]),
    ("store: record encode/decode (postcard)", [r"Record::encode", r"Record::decode", r"postcard::"]),
    ("store: group commit wait/flush", [r"GroupCommit", r"commit::"]),
    ("engine: fingerprint + key (sha2)", [r"key::fingerprint", r"sha2::", r"key::log_hash"]),
    ("engine: read request body", [r"idempotency::read_body", r"Limited"]),
    ("engine: flights join/finish", [r"flight::"]),
    ("engine: replay response build", [r"replay::Replay", r"Replay::"]),
    ("engine: spawning the leader task", [r"TaskTracker::spawn", r"task::spawn::spawn"]),
    ("upstream client (hyper-util legacy Client)", [r"hyper_util::client::legacy"]),
    ("server connection (hyper h1 server dispatch)", [r"hyper::proto::h1::dispatch::Dispatcher<.*Server", r"dispatch::Server"]),
    ("metrics (prometheus-client)", [r"prometheus_client", r"metrics::Metrics"]),
    ("tracing (span enter/exit, events)", [r"tracing_core::", r"tracing::span::", r"tracing_subscriber::"]),
    ("timers (tokio time)", [r"tokio::runtime::time", r"tokio::time::"]),
    ("syscall: writev/sendmsg (socket writes)", [r"__GI___writev", r"\bwritev\b", r"__send\b", r"sendmsg"]),
    ("syscall: read/recv (socket reads)", [r"__GI___libc_read\b", r"\brecv\b", r"__libc_recv", r"recvfrom"]),
    ("syscall: epoll_wait", [r"epoll_wait"]),
    ("syscall: futex (thread park/unpark)", [r"futex"]),
    ("syscall: fsync/fdatasync", [r"fsync", r"fdatasync"]),
    ("malloc/free", [r"\bmalloc\b", r"_int_malloc", r"_int_free", r"\bcfree\b", r"\bfree\b", r"realloc",
                      r"malloc_consolidate"]),
]


def main():
    comm = None
    if len(sys.argv) > 2 and sys.argv[1] == "--comm":
        comm = sys.argv[2]
    compiled = [(name, re.compile("|".join(pats))) for name, pats in GROUPS]
    counts = [0] * len(compiled)
    total = 0
    stack = []
    header = None

    def flush():
        nonlocal total
        if header is None or (comm and not header.startswith(comm)):
            return
        total += 1
        text = "\n".join(stack)
        for i, (_, rx) in enumerate(compiled):
            if rx.search(text):
                counts[i] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            header, stack = None, []
        elif line[0] not in " \t":
            header = line.strip()
        else:
            stack.append(line.strip())
    flush()
    print(f"{total} samples" + (f" of {comm}*" if comm else ""))
    for (name, _), n in zip(compiled, counts):
        if total:
            print(f"{100 * n / total:6.1f}%  {name}")


if __name__ == "__main__":
    main()
