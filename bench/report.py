#!/usr/bin/env python3
"""Turns the results.jsonl of bench/run.sh into the Markdown report: the
table of every scenario (rps, p50, p99, ratios measured in the same run, CPU
per request), the hot-key and memory figures, and the targets of issue 4.

usage: report.py RESULTS.jsonl CLK_TCK
"""

import json
import re
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
CLK_TCK = int(sys.argv[2])
meta = {r["key"]: r["value"] for r in rows if r["kind"] == "meta"}
loads = {}

LABELS = {
    "direct": "direct upstream (no proxy)",
    "nginx": "nginx pass-through",
    "idemproxy": "idemproxy pass-through",
    "replay": "idemproxy replay (one key, all hits)",
    "unique_interval": "idemproxy unique keys, sync = interval (derived keys)",
    "unique_always": "idemproxy unique keys, sync = always (derived keys)",
    "wrk_direct": "direct upstream (no proxy)",
    "wrk_nginx": "nginx pass-through",
    "wrk_replay": "idemproxy replay (one key, all hits)",
    "wrk_idemproxy": "idemproxy pass-through",
    "wrk_unique_interval": "idemproxy unique keys, sync = interval (Idempotency-Key header)",
    "wrk_unique_always": "idemproxy unique keys, sync = always (Idempotency-Key header)",
    "memory_store": "idemproxy storing the memory scenario's keys (sync = interval)",
}


def parse_load(r):
    out = r["out"]
    if r["tool"] == "oha":
        j = json.loads(out)
        codes = {str(k): v for k, v in (j.get("statusCodeDistribution") or {}).items()}
        ok = sum(v for k, v in codes.items() if k.startswith("2"))
        errors = {k: v for k, v in (j.get("errorDistribution") or {}).items() if "deadline" not in k}
        return {
            "requests": sum(codes.values()),
            "ok": ok,
            "rps": j["summary"]["requestsPerSec"],
            "p50": j["latencyPercentiles"]["p50"] * 1000,
            "p99": j["latencyPercentiles"]["p99"] * 1000,
            "bad": sum(codes.values()) - ok + sum(errors.values()),
            "bad_detail": {**{k: v for k, v in codes.items() if not k.startswith("2")}, **errors},
        }
    m = re.search(r"^WRK_JSON (.*)$", out, re.M)
    j = json.loads(m.group(1))
    return {
        "requests": j["requests"],
        "ok": j["requests"] - j["non2xx"],
        "rps": j["requests"] / (j["duration_us"] / 1e6),
        "p50": j["p50_us"] / 1000,
        "p99": j["p99_us"] / 1000,
        "bad": j["non2xx"] + j["errors"],
        "bad_detail": {"non-2xx": j["non2xx"], "socket errors": j["errors"]},
    }


loads = {}
for r in rows:
    if r["kind"] == "load":
        d = parse_load(r)
        n = max(d["requests"], 1)
        d["proxy_us"] = int(r["proxy_ticks"]) / CLK_TCK * 1e6 / n if r["has_proxy"] == "1" else None
        d["upstream_us"] = int(r["upstream_ticks"]) / CLK_TCK * 1e6 / n
        machine = int(r.get("machine_ticks", 0)) / CLK_TCK * 1e6 / n
        d["other_us"] = machine - (d["proxy_us"] or 0) - d["upstream_us"]
        d["tool"] = r["tool"]
        loads[r["name"]] = d


def fmt(v, spec="{:.2f}"):
    return "–" if v is None else spec.format(v)


def base_of(name):
    return "wrk_nginx" if name.startswith("wrk_") else "nginx"


def pass_of(name):
    return "wrk_idemproxy" if name.startswith("wrk_") else "idemproxy"


print("## Results\n")
print(f"- machine: {meta.get('nproc')} cores ({meta.get('cpu')}), {meta.get('mem')}, Linux {meta.get('kernel')}")
print(f"- idemproxy: {meta.get('commit')} (release build); tools: {meta.get('versions')}")
print(f"- settings: {meta.get('settings')}")
print(f"- load average (1, 5, 15 min) at start: {' '.join(meta.get('load_start', '').split()[:3])}; "
      f"at end: {' '.join(meta.get('load_end', '').split()[:3])}")
print()
print("| scenario | tool | requests | rps | p50 ms | p99 ms | rps vs nginx | p99 vs nginx | rps vs idemproxy pass-through "
      "| proxy CPU µs/req | upstream CPU µs/req | other CPU µs/req | non-2xx / errors |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, d in loads.items():
    if name == "memory_store":
        continue
    b = loads.get(base_of(name))
    p = loads.get(pass_of(name))
    ratio = d["rps"] / b["rps"] if b else None
    p99r = d["p99"] / b["p99"] if b and b["p99"] else None
    pr = d["rps"] / p["rps"] if p and "unique" in name else None
    print(
        f"| {LABELS.get(name, name)} | {d['tool']} | {d['requests']} | {d['rps']:.0f} | {d['p50']:.2f} | {d['p99']:.2f} "
        f"| {fmt(ratio)}× | {fmt(p99r)}× | {fmt(pr) + '×' if pr else '–'} | {fmt(d['proxy_us'], '{:.1f}')} "
        f"| {fmt(d['upstream_us'], '{:.1f}')} | {fmt(d['other_us'], '{:.1f}')} | {d['bad'] or 0} |"
    )
print()

hot = next((r for r in rows if r["kind"] == "hot"), None)
if hot:
    h = json.loads(hot["out"])
    lag = h.get("follower_lag_ms", {})
    print("### Hot key\n")
    print(f"- {h['requests']} concurrent requests, one fresh key, 200 ms upstream: answered {h['answered']}, "
          f"statuses {h['statuses']}")
    print(f"- upstream executions: **{hot['upstream_executions']}**; proxy outcomes: stored {hot['stored']}, "
          f"coalesced {hot['coalesced']}, replayed {hot['replayed']}, conflict {hot['conflict']}")
    print(f"- distinct response bodies: {h['distinct_bodies']}; answers marked as the original "
          f"(`Idempotent-Replayed: false`): {h['leaders']}")
    print(f"- requests written in {h['send_ms']} ms; leader answered after {h.get('leader_ms')} ms; "
          f"all answered after {h.get('all_answered_ms')} ms")
    if lag:
        print(f"- follower answer time past the leader's: min {lag['min']} ms, p50 {lag['p50']} ms, "
              f"p99 {lag['p99']} ms, max {lag['max']} ms")
    cap = json.loads(hot.get("capture") or "{}")
    if cap.get("lag_ms"):
        c = cap["lag_ms"]
        print(f"- the same, as sent by the proxy (packet capture, {cap['answers_seen']} answers seen): "
              f"min {c['min']} ms, p50 {c['p50']} ms, p99 {c['p99']} ms, max {c['max']} ms")
    print(f"- proxy CPU for the burst: {int(hot['proxy_ticks']) / CLK_TCK * 1e6 / h['requests']:.1f} µs/request")
    print()

mem = next((r for r in rows if r["kind"] == "mem"), None)
if mem:
    mib = lambda k: int(k) / 1024  # noqa: E731
    ms = loads.get("memory_store")
    print("### Memory\n")
    print(f"- {mem['keys']} POSTs with unique derived keys, ~200-byte responses, ttl {mem['ttl']}: "
          f"stored {mem['stored']} in {mem['store_secs']} s"
          + (f" ({ms['rps']:.0f} rps, p99 {ms['p99']:.2f} ms, proxy CPU {ms['proxy_us']:.1f} µs/req)" if ms else ""))
    print(f"- RSS before: **{mib(mem['rss_before']):.1f} MiB**; after storing: **{mib(mem['rss_stored']):.1f} MiB**; "
          f"after expiry: **{mib(mem['rss_expired']):.1f} MiB** (peak {mib(mem['hwm']):.1f} MiB)")
    print(f"- swept by the sweeper: {mem['swept']} (of which {mem['swept_before_end']} before storing ended); "
          f"waited {mem['waited_after_store']} s after storing")
    print(f"- sled directory: {mib(mem['disk_stored_kib']):.1f} MiB after storing, "
          f"{mib(mem['disk_expired_kib']):.1f} MiB after expiry")
    print()

# --- targets (issue 4) ------------------------------------------------------------------------------


def verdict(ok):
    return "**met**" if ok else "**not met**"


print("### Targets (issue 4)\n")
print("| target | measured | verdict |")
print("|---|---|---|")
for tool, n, i in (("oha", "nginx", "idemproxy"), ("wrk", "wrk_nginx", "wrk_idemproxy")):
    if n in loads and i in loads:
        a, b = loads[i], loads[n]
        print(f"| pass-through ≥ 1.0× nginx rps ({tool}) | {a['rps'] / b['rps']:.2f}× | {verdict(a['rps'] >= b['rps'])} |")
        print(f"| pass-through p99 ≤ nginx p99 ({tool}) | {a['p99']:.2f} ms vs {b['p99']:.2f} ms "
              f"| {verdict(a['p99'] <= b['p99'])} |")
for name in ("replay", "wrk_replay"):
    if name in loads and base_of(name) in loads:
        r = loads[name]["rps"] / loads[base_of(name)]["rps"]
        print(f"| replay ≥ 1.5× nginx pass-through rps ({loads[name]['tool']}) | {r:.2f}× | {verdict(r >= 1.5)} |")
for name, want in (("unique_interval", 0.8), ("unique_always", 0.5), ("wrk_unique_interval", 0.8),
                   ("wrk_unique_always", 0.5)):
    p = pass_of(name)
    if name in loads and p in loads:
        r = loads[name]["rps"] / loads[p]["rps"]
        print(f"| {LABELS[name].replace('idemproxy ', '')} ≥ {want}× idemproxy pass-through ({loads[name]['tool']}) "
              f"| {r:.2f}× | {verdict(r >= want)} |")
if hot:
    h = json.loads(hot["out"])
    one = hot["upstream_executions"] == "1" and h["distinct_bodies"] == 1 and h["leaders"] == 1
    print(f"| hot key: one upstream execution, identical bodies | {hot['upstream_executions']} execution(s), "
          f"{h['distinct_bodies']} distinct body(ies) | {verdict(one)} |")
    lag = h.get("follower_lag_ms")
    cap = json.loads(hot.get("capture") or "{}").get("lag_ms")
    if cap:
        print(f"| hot key: followers answered within 5 ms of the leader (as sent, packet capture) "
              f"| max {cap['max']} ms (p99 {cap['p99']} ms) | {verdict(cap['max'] <= 5)} |")
    if lag:
        print(f"| hot key: followers answered within 5 ms of the leader (as read by the client) "
              f"| max {lag['max']} ms (p99 {lag['p99']} ms) | {verdict(lag['max'] <= 5)} |")
if mem:
    full = int(mem["keys"]) >= 1_000_000
    rss1, rss0, rss2 = int(mem["rss_stored"]) / 1024, int(mem["rss_before"]) / 1024, int(mem["rss_expired"]) / 1024
    print(f"| RSS ≤ 256 MiB with 1M stored keys | {rss1:.1f} MiB with {mem['stored']} keys "
          f"| {verdict(rss1 <= 256) if full else 'n/a (not 1M keys)'} |")
    near = rss2 <= rss0 + 32
    print(f"| RSS back near baseline after expiry (≤ baseline + 32 MiB) | {rss2:.1f} MiB vs {rss0:.1f} MiB "
          f"| {verdict(near and int(mem['swept']) >= int(mem['stored']))} |")
