#!/usr/bin/env bash
# Storage under churn (issue 15): how big the sled directory and the process
# get while unique keys keep arriving and expiring, on loopback.
#
#   bench/churn.sh              unique keys at full speed for CHURN_DURATION
#                               (ttl 20s, sync "interval"): a sample every 5 s
#   bench/churn.sh --million    also: store CHURN_MILLION keys (ttl 1h) and
#                               read the RSS and the directory size
#
# Needs wrk and nginx (apt-get install -y wrk nginx), curl, python3. Nothing
# is installed by this script; everything it starts is killed on exit; every
# load run is bounded by a duration. Only 127.0.0.1 is ever contacted.
#
# Environment:
#   CHURN_BIN (target/release/idemproxy, built if absent), CHURN_DURATION (180;
#   0 skips the churn run),
#   CHURN_TTL (20s), CHURN_SWEEP (5s), CHURN_CONNECTIONS (50),
#   CHURN_CACHE (64MiB, store.cache_capacity), CHURN_MILLION (1000000),
#   CHURN_ENV="NAME=VALUE ..." variables for idemproxy only
# Output: the samples and a summary on stdout, also appended as JSON lines to
# bench/results/churn.jsonl (git-ignored).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
MILLION=0
for arg in "$@"; do
    case $arg in
        --million) MILLION=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print } /^set /{ exit }' "$0"; exit 0 ;;
        *) echo "bench/churn.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
DURATION=${CHURN_DURATION:-180}
TTL=${CHURN_TTL:-20s}
SWEEP=${CHURN_SWEEP:-5s}
CONC=${CHURN_CONNECTIONS:-50}
CACHE=${CHURN_CACHE:-64MiB}
MILLION_KEYS=${CHURN_MILLION:-1000000}
BIN=${CHURN_BIN:-$ROOT/target/release/idemproxy}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

log() { printf '[churn %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
for tool in wrk curl python3 "$NGINX"; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
if [[ ! -x $BIN ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/idemproxy-churn.XXXXXX")
BG=()
cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${BG[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
    local i
    for i in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    die "nothing listens on 127.0.0.1:$1"
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
metric() { curl -fsS "http://$1/metrics" | awk -v m="$2" '$1 == m { v = $2 } END { printf "%d\n", v + 0 }'; }
secs() { python3 -c "import sys; v = sys.argv[1]; print(int(float(v[:-1]) * {'s': 1, 'm': 60, 'h': 3600}[v[-1]]))" "$1"; }

# The static upstream (the same nginx as bench/run.sh).
UP_PORT=$(free_port)
USER_LINE=
((EUID == 0)) && USER_LINE="user root;"
sed -e "s|@USER@|$USER_LINE|" -e "s|@DIR@|$WORK|g" -e "s|@PORT@|$UP_PORT|" \
    "$HERE/nginx-upstream.conf.in" >"$WORK/upstream.conf"
"$NGINX" -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream-error.log" 2>>"$WORK/upstream-error.log" &
BG+=($!)
wait_port "$UP_PORT"

PID=
ADDR=
ADMIN=
start() { # name ttl
    sed -e "s|@UPSTREAM_PORT@|$UP_PORT|" -e "s|@DATA@|$WORK/data-$1|" -e "s|@SYNC@|interval|" \
        -e "s|@TTL@|$2|" -e "s|@SWEEP@|$SWEEP|" -e "s|@CACHE@|$CACHE|" \
        "$HERE/idemproxy.toml.in" >"$WORK/$1.toml"
    # shellcheck disable=SC2086
    env IDEMPROXY_LOG=warn ${CHURN_ENV:-} "$BIN" run --config "$WORK/$1.toml" >"$WORK/$1.out" 2>"$WORK/$1.err" &
    PID=$!
    BG+=("$PID")
    local line= i
    for i in $(seq 100); do
        line=$(grep -m1 -o 'listening on [^ ]* admin [^ "]*' "$WORK/$1.out" || true)
        [[ -z $line ]] && line=$(python3 -c 'import json,sys
for l in open(sys.argv[1]):
    try: v = json.loads(l)
    except ValueError: continue
    if v.get("event") == "listening": print("listening on", v["main"], "admin", v["admin"]); break' "$WORK/$1.out" 2>/dev/null || true)
        [[ -n $line ]] && break
        kill -0 "$PID" 2>/dev/null || die "idemproxy exited: $(cat "$WORK/$1.err")"
        sleep 0.1
    done
    [[ -n $line ]] || die "idemproxy did not start"
    read -r _ _ ADDR _ ADMIN <<<"$line"
    [[ $ADDR == 127.0.0.1:* ]] || die "idemproxy listens on $ADDR, not loopback"
}

RESULTS=$HERE/results/churn.jsonl
mkdir -p "$HERE/results"
export BENCH_RUN="c$(date +%s)"

# --- churn -------------------------------------------------------------------
if ((DURATION > 0)); then
start churn "$TTL"
ttl_s=$(secs "$TTL")
log "churn: unique keys for ${DURATION}s through $ADDR (ttl $TTL, sweep $SWEEP, cache $CACHE), load $(cut -d' ' -f1-3 /proc/loadavg)"
wrk -t2 -c "$CONC" -d "${DURATION}s" -s "$HERE/unique_key.lua" "http://$ADDR/api/churn" >"$WORK/wrk-churn.out" 2>&1 &
WRK=$!
BG+=("$WRK")
t0=$(date +%s)
prev=0
printf '%6s %9s %7s %9s %9s %10s %8s\n' t_s stored keys/s live_keys dir_MiB B/live_key RSS_MiB
: >"$WORK/samples"
while kill -0 "$WRK" 2>/dev/null; do
    sleep 5
    t=$(($(date +%s) - t0))
    stored=$(metric "$ADMIN" 'idemproxy_requests_total{outcome="stored"}')
    rate=$(((stored - prev) / 5))
    prev=$stored
    # Live keys: those stored during the last ttl (the rest is expired garbage).
    echo "$t $stored" >>"$WORK/stored"
    live=$(awk -v t="$t" -v ttl="$ttl_s" -v now="$stored" '$1 <= t - ttl { old = $2 } END { print now - old }' "$WORK/stored")
    du=$(du -sb "$WORK/data-churn" | cut -f1)
    rss=$(rss_kib "$PID")
    per=$((live > 0 ? du / live : 0))
    awk -v t="$t" -v s="$stored" -v r="$rate" -v l="$live" -v d="$du" -v p="$per" -v m="$rss" \
        'BEGIN { printf "%6d %9d %7d %9d %9.1f %10d %8.1f\n", t, s, r, l, d / 1048576, p, m / 1024 }'
    echo "$t $stored $rate $live $du $rss" >>"$WORK/samples"
done
wait "$WRK" || true
python3 - "$WORK/samples" "$ttl_s" "$(hwm_kib "$PID")" "$RESULTS" "$TTL" "$SWEEP" "$CACHE" "$BIN" <<'EOF'
import json, sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1])]
ttl, hwm = int(sys.argv[2]), int(sys.argv[3])
# Steady state: the samples of the last 60 s.
last = [r for r in rows if r[0] >= rows[-1][0] - 60]
per = [r[4] / r[3] for r in last if r[3]]
steady = sum(per) / len(per)
# Reached: the first sample from which bytes per live key stays within 10 % of steady.
reached = None
for i, r in enumerate(rows):
    if r[0] >= ttl and all(s[3] and abs(s[4] / s[3] - steady) <= 0.1 * steady for s in rows[i:]):
        reached = r[0]
        break
out = {
    "kind": "churn", "binary": sys.argv[8], "ttl": sys.argv[5], "sweep": sys.argv[6], "cache": sys.argv[7],
    "keys_per_s": round(sum(r[2] for r in last) / len(last)),
    "live_keys": round(sum(r[3] for r in last) / len(last)),
    "dir_mib_steady": round(sum(r[4] for r in last) / len(last) / 2**20, 1),
    "dir_mib_max": round(max(r[4] for r in rows) / 2**20, 1),
    "bytes_per_live_key": round(steady),
    "steady_reached_s": reached,
    "rss_mib_steady": round(sum(r[5] for r in last) / len(last) / 1024, 1),
    "rss_mib_peak": round(hwm / 1024, 1),
}
print("summary", json.dumps(out))
open(sys.argv[4], "a").write(json.dumps(out) + "\n")
EOF
grep -E 'Requests/sec|Non-2xx|Socket errors' "$WORK/wrk-churn.out" >&2 || true
kill -TERM "$PID" && wait "$PID" 2>/dev/null || true
fi

# --- a million stored keys ------------------------------------------------------
if ((MILLION)); then
    start million 1h
    log "million: storing $MILLION_KEYS keys (ttl 1h) through $ADDR"
    wrk -t2 -c "$CONC" -d 1800s -s "$HERE/unique_key.lua" "http://$ADDR/api/million" >"$WORK/wrk-million.out" 2>&1 &
    WRK=$!
    BG+=("$WRK")
    t0=$(date +%s)
    stored=0
    while ((stored < MILLION_KEYS)) && kill -0 "$WRK" 2>/dev/null; do
        sleep 2
        stored=$(metric "$ADMIN" 'idemproxy_requests_total{outcome="stored"}')
    done
    kill -INT "$WRK" 2>/dev/null || true
    wait "$WRK" 2>/dev/null || true
    secs_taken=$(($(date +%s) - t0))
    sleep 3
    stored=$(metric "$ADMIN" 'idemproxy_requests_total{outcome="stored"}')
    rss=$(rss_kib "$PID")
    du=$(du -sb "$WORK/data-million" | cut -f1)
    line=$(awk -v b="$BIN" -v s="$stored" -v t="$secs_taken" -v r="$rss" -v h="$(hwm_kib "$PID")" -v d="$du" -v c="$CACHE" \
        'BEGIN { printf "{\"kind\": \"million\", \"binary\": \"%s\", \"stored\": %d, \"seconds\": %d, \"rss_mib\": %.1f, \"rss_mib_peak\": %.1f, \"dir_mib\": %.1f, \"cache\": \"%s\"}", b, s, t, r / 1024, h / 1024, d / 1048576, c }')
    echo "summary $line"
    echo "$line" >>"$RESULTS"
fi
