#!/usr/bin/env bash
# The Redis backend next to sled, on loopback, in one run (issue 6):
#
#   bench/redis.sh            10 s per scenario (about 3 minutes)
#   bench/redis.sh --quick    2 s per scenario
#
# Starts a static nginx upstream (bench/nginx-upstream.conf.in), a
# redis-server (no persistence), and idemproxy (release build) as: one proxy
# on sled (sync = "interval"), one proxy on Redis, and three proxies on the
# same Redis. wrk (bench/unique_key.lua) drives keyless pass-through, unique
# keys (a fresh Idempotency-Key per request) and replay (one key); with three
# replicas, three wrk processes run at once, one per replica, and their rates
# are added. Every figure is also given as a ratio to idemproxy pass-through
# measured in the same run. Redis round trips per keyed request come from
# INFO commandstats (client commands; scripts count once).
#
# CPU µs per request is the proxy process's CPU time (utime + stime from
# /proc) during a one-proxy scenario divided by the requests it served.
#
# The peer: with PEER_BIN=/path/to/idempotent-proxy-server (ldclabs/
# idempotent-proxy, built separately, outside this repository: see
# BENCHMARKS.md), the same unique-key and replay scenarios also run against
# it, on the same Redis and the same upstream, loopback only. This script
# never fetches nor builds it.
#
# Needs: wrk, nginx, redis-server and redis-cli (Debian packages), cargo.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
DURATION=10s
[[ ${1:-} == --quick ]] && DURATION=2s
CONC=${BENCH_CONNECTIONS:-48}

for tool in wrk nginx redis-server redis-cli python3; do
    command -v "$tool" >/dev/null || { echo "bench/redis.sh: $tool is missing (apt-get install -y wrk nginx redis-server redis-tools)" >&2; exit 1; }
done
NGINX=$(command -v nginx)
WORK=$(mktemp -d /tmp/idemproxy-redis-bench.XXXXXX)
PIDS=()
cleanup() {
    local rc=$?
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT INT TERM
log() { printf '[redis-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
    log "nothing listens on $1"; exit 1
}

log "building idemproxy (release)"
(cd "$ROOT" && cargo build --release --quiet --bin idemproxy)
BIN=$ROOT/target/release/idemproxy

UP_PORT=$(free_port)
user_line=""; [[ $(id -u) == 0 ]] && user_line="user root;"
sed -e "s|@USER@|$user_line|" -e "s|@DIR@|$WORK|g" -e "s|@PORT@|$UP_PORT|g" "$HERE/nginx-upstream.conf.in" >"$WORK/upstream.conf"
"$NGINX" -p "$WORK" -c "$WORK/upstream.conf" -e "$WORK/upstream-error.log" 2>>"$WORK/upstream-error.log" &
PIDS+=($!)
wait_port "$UP_PORT"

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$REDIS_PORT"

# start_proxy NAME STORE_TOML -> sets ADDR
start_proxy() {
    cat >"$WORK/$1.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "2s"
[upstream]
url = "http://127.0.0.1:$UP_PORT"
[store]
$2
[idempotency]
tenant = { from = "none" }
[[routes]]
path = "/api/*"
methods = ["POST"]
TOML
    IDEMPROXY_LOG=warn "$BIN" run --config "$WORK/$1.toml" >"$WORK/$1.out" 2>"$WORK/$1.err" &
    PIDS+=($!)
    PID=$!
    local line=""
    for _ in $(seq 100); do
        line=$(grep -m1 '^idemproxy listening on ' "$WORK/$1.out" || true)
        [[ -n $line ]] && break
        sleep 0.1
    done
    [[ -n $line ]] || { log "$1 did not start: $(cat "$WORK/$1.err")"; exit 1; }
    read -r _ _ _ ADDR _ _ <<<"$line"
}

# wrk_rate MODE CONNECTIONS ADDR... -> prints "rps p99_ms" (rates added over
# addresses); PATH_ON (default /api/orders) is the path wrk requests.
wrk_rate() {
    local mode=$1 conns=$2; shift 2
    local i=0 outs=()
    for addr in "$@"; do
        BENCH_RUN="$RANDOM$RANDOM$i" WRK_MODE=$mode WRK_KEY=replay-key \
            wrk -t1 -c"$conns" -d"$DURATION" -s "$HERE/unique_key.lua" "http://$addr${PATH_ON:-/api/orders}" >"$WORK/wrk-$i.out" 2>&1 &
        outs+=("$WORK/wrk-$i.out:$!")
        i=$((i + 1))
    done
    local total=0 p99=0
    for o in "${outs[@]}"; do
        wait "${o##*:}"
        local j; j=$(grep -m1 '^WRK_JSON ' "${o%%:*}" | cut -d' ' -f2-)
        read -r rps p <<<"$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["requests"]/(d["duration_us"]/1e6), d["p99_us"]/1000)' "$j")"
        total=$(python3 -c "print($total + $rps)")
        p99=$(python3 -c "print(max($p99, $p))")
    done
    printf '%.0f %.2f\n' "$total" "$p99"
}

# calls CMD... -> how many times clients (and scripts) ran these commands
calls() {
    local stats total=0 n c
    stats=$(redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r')
    for c in "$@"; do
        n=$(awk -F'[=,:]' -v c="cmdstat_$c" '$1 == c { print $3 }' <<<"$stats")
        total=$((total + ${n:-0}))
    done
    echo "$total"
}
# cpu_ticks PID -> utime + stime of the process, in clock ticks
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

ROWS=()
row() { ROWS+=("| $1 | $2 | $3 | $4 | $5 | $6 |"); }

start_proxy sled "backend = \"sled\"
path = \"$WORK/sled\"
sync = \"interval\""
SLED=$ADDR
SLED_PID=$PID
start_proxy redis1 "backend = \"redis\"
url = \"redis://127.0.0.1:$REDIS_PORT/0\""
R1=$ADDR
R1_PID=$PID
start_proxy redis2 "backend = \"redis\"
url = \"redis://127.0.0.1:$REDIS_PORT/0\""
R2=$ADDR
start_proxy redis3 "backend = \"redis\"
url = \"redis://127.0.0.1:$REDIS_PORT/0\""
R3=$ADDR

# Prime the replay key on each store (one execution, then replays).
for a in "$SLED" "$R1"; do curl -s -o /dev/null -X POST -H 'Idempotency-Key: replay-key' -H 'Content-Type: application/json' -d '{"amount":100,"currency":"EUR"}' "http://$a/api/orders"; done

PEER=""
if [[ -n ${PEER_BIN:-} ]]; then
    # The peer reads its settings from .env in its working directory:
    # loopback only, our Redis, our upstream, logs at warn. It keeps a
    # response for REQUEST_TIMEOUT (its default, 10 s, would expire the
    # replay key mid-run).
    PEER_PORT=$(free_port)
    mkdir -p "$WORK/peer"
    cat >"$WORK/peer/.env" <<ENV
SERVER_ADDR=127.0.0.1:$PEER_PORT
REDIS_URL=redis://127.0.0.1:$REDIS_PORT
URL_UP=http://127.0.0.1:$UP_PORT/api/orders
LOG_LEVEL=warn
REQUEST_TIMEOUT=600000
ENV
    (cd "$WORK/peer" && exec "$PEER_BIN" >"$WORK/peer.out" 2>&1) &
    PIDS+=($!)
    PEER_PID=$!
    wait_port "$PEER_PORT"
    PEER=127.0.0.1:$PEER_PORT
    curl -s -o /dev/null -X POST -H 'Idempotency-Key: replay-key' -H 'Content-Type: application/json' -d '{"amount":100,"currency":"EUR"}' "http://$PEER/URL_UP"
fi

log "pass-through (one proxy)"
read -r PT PT99 <<<"$(wrk_rate plain "$CONC" "$SLED")"
row "idemproxy pass-through" "$PT" "$PT99" "1.00×" "" ""
ratio() { python3 -c "print(f'{$1 / $PT:.2f}×')"; }

# scenario LABEL MODE CONNECTIONS PID|- CMDS ADDR...: one table row with the
# CPU µs per request of process PID (one proxy only) and the Redis round
# trips per request (calls of the commands CMDS, comma-separated, over the
# requests); sets RPS, CPU and RT.
scenario() {
    local label=$1 mode=$2 conns=$3 pid=$4 cmds=$5 before after t0 t1 v p reqs
    shift 5
    log "$label"
    before=$(calls ${cmds//,/ })
    [[ $pid != - ]] && t0=$(cpu_ticks "$pid")
    read -r v p <<<"$(wrk_rate "$mode" "$conns" "$@")"
    [[ $pid != - ]] && t1=$(cpu_ticks "$pid")
    after=$(calls ${cmds//,/ })
    reqs=$(python3 -c "print(max(round($v * float('${DURATION%s}')), 1))")
    RT=$(python3 -c "print(f'{($after - $before) / $reqs:.2f}')")
    CPU=""
    [[ $pid != - ]] && CPU=$(python3 -c "print(f'{($t1 - $t0) / $TICK * 1e6 / $reqs:.0f}')")
    RPS=$v
    row "$label" "$v" "$p" "$(ratio "$v")" "$CPU" "$([[ $cmds == - ]] || echo "$RT")"
}

scenario "unique keys, sled sync=interval, 1 proxy" unique "$CONC" "$SLED_PID" - "$SLED"
scenario "unique keys, Redis, 1 proxy" unique "$CONC" "$R1_PID" evalsha "$R1"
UNIQUE=$RPS UNIQUE_CPU=$CPU
scenario "unique keys, Redis, 3 proxies (sum)" unique $((CONC / 3)) - evalsha "$R1" "$R2" "$R3"
if [[ -n $PEER ]]; then
    PATH_ON=/URL_UP scenario "unique keys, peer (idempotent-proxy) on the same Redis" unique "$CONC" "$PEER_PID" set,get,del "$PEER"
    PEER_UNIQUE=$RPS PEER_UNIQUE_CPU=$CPU
fi
scenario "replay, sled, 1 proxy" replay "$CONC" "$SLED_PID" - "$SLED"
scenario "replay, Redis, 1 proxy" replay "$CONC" "$R1_PID" evalsha "$R1"
REPLAY=$RPS REPLAY_CPU=$CPU
scenario "replay, Redis, 3 proxies (sum)" replay $((CONC / 3)) - evalsha "$R1" "$R2" "$R3"
if [[ -n $PEER ]]; then
    curl -s -o /dev/null -X POST -H 'Idempotency-Key: replay-key' -H 'Content-Type: application/json' -d '{"amount":100,"currency":"EUR"}' "http://$PEER/URL_UP"
    PATH_ON=/URL_UP scenario "replay, peer (idempotent-proxy) on the same Redis" replay "$CONC" "$PEER_PID" set,get,del "$PEER"
    PEER_REPLAY=$RPS PEER_REPLAY_CPU=$CPU
fi

echo "## Redis backend next to sled ($(date -u +%F), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), wrk -c$CONC -d$DURATION)"
echo
echo "| scenario | rps | p99 ms | vs idemproxy pass-through | proxy CPU µs/request | Redis round trips/request |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "Round trips: calls of EVALSHA (idemproxy) or SET+GET+DEL (the peer) from INFO commandstats over wrk's completed requests (approximate)."
if [[ -n $PEER ]]; then
    echo
    python3 - "$UNIQUE" "$PEER_UNIQUE" "$REPLAY" "$PEER_REPLAY" "$UNIQUE_CPU" "$PEER_UNIQUE_CPU" "$REPLAY_CPU" "$PEER_REPLAY_CPU" <<'PY'
import sys
u, pu, r, pr, uc, puc, rc, prc = map(float, sys.argv[1:])
print(f"idemproxy / peer on the same Redis: unique keys {u / pu:.2f}× the rate at {uc / puc:.2f}× the CPU per request; replay {r / pr:.2f}× the rate at {rc / prc:.2f}× the CPU per request.")
PY
fi
