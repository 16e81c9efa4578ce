#!/usr/bin/env python3
"""Turns the results.jsonl of bench/run.sh into the Markdown report: per load
tool, a table of every scenario for each build (before/after), with rps, p50,
p99, ratios to nginx measured in the same run and CPU per request; the
hot-key and memory figures; and the targets of issue 15.

usage: report.py RESULTS.jsonl CLK_TCK
"""

import json
import re
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
CLK_TCK = int(sys.argv[2])
meta = {r["key"]: r["value"] for r in rows if r["kind"] == "meta"}
loads = {}

SCENARIOS = [
    ("pass", "pass-through (GET, no key)"),
    ("replay_sled", "replay, sled (one key, all hits)"),
    ("replay_memory", "replay, memory store"),
    ("unique_interval", "unique keys, sled sync = interval"),
    ("unique_always", "unique keys, sled sync = always"),
]
BUILDS = ["before", "after", "one"]
BUILD_LABEL = {"before": "before", "after": "after", "one": "after, workers = 1"}


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


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def baseline(tool):
    """nginx as reverse proxy: the mean of the runs at the start and the end."""
    runs = [loads[n] for n in (f"{tool}_nginx", f"{tool}_nginx_end") if n in loads]
    if not runs:
        return None
    return {k: mean([r[k] for r in runs]) for k in ("rps", "p50", "p99", "proxy_us")}


def row(label, build, d, base, pass_rps=None):
    ratio = d["rps"] / base["rps"] if base else None
    p99r = d["p99"] / base["p99"] if base and base["p99"] else None
    cpur = d["proxy_us"] / base["proxy_us"] if base and d["proxy_us"] is not None and base["proxy_us"] else None
    pr = d["rps"] / pass_rps if pass_rps else None
    print(
        f"| {label} | {build} | {d['rps']:.0f} | {d['p50']:.2f} | {d['p99']:.2f} | {fmt(ratio)}× | {fmt(p99r)}× "
        f"| {fmt(pr) + '×' if pr else '–'} | {fmt(d['proxy_us'], '{:.1f}')} | {fmt(cpur) + '×' if cpur else '–'} "
        f"| {fmt(d['upstream_us'], '{:.1f}')} | {fmt(d['other_us'], '{:.1f}')} | {d['bad'] or 0} |"
    )


print("## Results\n")
print(f"- machine: {meta.get('nproc')} cores ({meta.get('cpu')}), {meta.get('mem')}, Linux {meta.get('kernel')}")
print(f"- idemproxy after: {meta.get('commit')} (release build)"
      + (f"; before: {meta['before']}" if "before" in meta else ""))
print(f"- tools: {meta.get('versions')}")
print(f"- settings: {meta.get('settings')}")
print(f"- load average (1, 5, 15 min) at start: {' '.join(meta.get('load_start', '').split()[:3])}; "
      f"at end: {' '.join(meta.get('load_end', '').split()[:3])}")
print()
for tool in ("oha", "wrk"):
    base = baseline(tool)
    if base is None:
        continue
    print(f"### {tool}\n")
    print("| scenario | build | rps | p50 ms | p99 ms | rps × nginx | p99 × nginx | rps × own pass-through "
          "| proxy CPU µs/req | CPU × nginx | upstream CPU µs/req | other CPU µs/req | non-2xx / errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, label in ((f"{tool}_direct", "direct upstream (no proxy)"), (f"{tool}_direct_end", "direct upstream (end)"),
                        (f"{tool}_nginx", "nginx reverse proxy"), (f"{tool}_nginx_end", "nginx reverse proxy (end)")):
        if name in loads:
            row(label, "–", loads[name], base)
    for key, label in SCENARIOS:
        for b in BUILDS:
            d = loads.get(f"{tool}_{b}_{key}")
            if d is None:
                continue
            own = loads.get(f"{tool}_{b}_pass")
            row(label, BUILD_LABEL[b], d, base, own["rps"] if own and key.startswith("unique") else None)
    print()

hots = {r.get("build", "after"): r for r in rows if r["kind"] == "hot"}
for b, hot in hots.items():
    h = json.loads(hot["out"])
    lag = h.get("follower_lag_ms", {})
    print(f"### Hot key ({BUILD_LABEL.get(b, b)})\n")
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
hot = hots.get("after")

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

# --- targets (issue 15), for the "after" build ------------------------------------------------------


def verdict(ok):
    return "**met**" if ok else "**not met**"


print("### Targets (issue 15), after\n")
print("| target | measured | verdict |")
print("|---|---|---|")
for tool in ("oha", "wrk"):
    base = baseline(tool)
    a = loads.get(f"{tool}_after_pass")
    if base is None or a is None:
        continue
    print(f"| pass-through ≥ 1.0× nginx rps ({tool}) | {a['rps'] / base['rps']:.2f}× | {verdict(a['rps'] >= base['rps'])} |")
    print(f"| pass-through p99 ≤ nginx p99 ({tool}) | {a['p99']:.2f} ms vs {base['p99']:.2f} ms "
          f"| {verdict(a['p99'] <= base['p99'])} |")
    print(f"| pass-through proxy CPU/request ≤ nginx's ({tool}) | {a['proxy_us']:.1f} µs vs {base['proxy_us']:.1f} µs "
          f"| {verdict(a['proxy_us'] <= base['proxy_us'])} |")
    for key in ("replay_sled", "replay_memory"):
        r = loads.get(f"{tool}_after_{key}")
        if r:
            x = r["rps"] / base["rps"]
            print(f"| {key.replace('_', ' ')} ≥ 1.7× nginx rps ({tool}) | {x:.2f}× | {verdict(x >= 1.7)} |")
            print(f"| {key.replace('_', ' ')} CPU ≤ 20 µs/request ({tool}) | {r['proxy_us']:.1f} µs "
                  f"| {verdict(r['proxy_us'] <= 20)} |")
    for key, want in (("unique_interval", 0.8), ("unique_always", 0.5)):
        r = loads.get(f"{tool}_after_{key}")
        if r:
            x = r["rps"] / a["rps"]
            print(f"| {key.replace('_', ' ')} ≥ {want}× pass-through ({tool}) | {x:.2f}× | {verdict(x >= want)} |")
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
    rss1 = int(mem["rss_stored"]) / 1024
    print(f"| RSS ≤ 256 MiB with 1M stored keys | {rss1:.1f} MiB with {mem['stored']} keys "
          f"| {verdict(rss1 <= 256) if full else 'n/a (not 1M keys)'} |")
