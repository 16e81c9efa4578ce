#!/usr/bin/env bash
# Instructions per request, counted by valgrind's callgrind: reproducible on
# a noisy machine (unlike time), and available where the VM exposes no
# hardware counters to perf.
#
#   bench/cost.sh [BINARY...]     default: target/release/idemproxy
#
# For each binary and scenario (pass-through, replay from sled, replay from
# the memory store, unique keys with sled sync = interval), idemproxy runs
# under callgrind in front of an nginx upstream; bench/cost_client.py sends
# warm-up requests on one kept-alive connection, the counters are zeroed,
# then N more requests are sent and the counters dumped: Ir / N is the cost
# of one request, all threads together, connection setup and startup
# excluded (the upstream is another process, not counted). For where the time
# goes, use bench/run.sh with BENCH_PERF=1. Loopback only; everything started
# here is killed on exit.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
N=${COST_REQUESTS:-2000}
BINS=("$@")
((${#BINS[@]})) || BINS=("$ROOT/target/release/idemproxy")
for tool in valgrind callgrind_control callgrind_annotate nginx python3; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || { echo "cost.sh: $tool is missing" >&2; exit 1; }
done
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/idemproxy-cost.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
UP_PORT=$(free_port)
USER_LINE=
((EUID == 0)) && USER_LINE="user root;"
python3 - "$HERE/nginx-upstream.conf.in" "$WORK/up.conf" <<PY
import sys
t = open(sys.argv[1]).read()
for k, v in {"USER": "$USER_LINE", "DIR": "$WORK", "PORT": "$UP_PORT"}.items():
    t = t.replace(f"@{k}@", v)
open(sys.argv[2], "w").write(t)
PY
"$NGINX" -p "$WORK" -c "$WORK/up.conf" -e "$WORK/up-error.log" 2>>"$WORK/up-error.log" &
PIDS+=($!)
sleep 0.5

conf() { # NAME STORE_BLOCK
    cat >"$WORK/$1.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "1s"
[upstream]
url = "http://127.0.0.1:$UP_PORT"
[store]
$2
[idempotency]
tenant = { from = "none" }
[[routes]]
path = "/api/*"
methods = ["POST"]
derive_key = true
TOML
    echo "$WORK/$1.toml"
}

printf '| binary | scenario | instructions per request |\n|---|---|---:|\n'
for i in "${!BINS[@]}"; do
    bin=${BINS[$i]}
    for scenario in pass replay_sled replay_memory unique_interval; do
        case $scenario in
            replay_memory) store=$'backend = "memory"' ;;
            *) store=$'backend = "sled"\npath = "'"$WORK/data-$scenario-$$-$RANDOM"$'"\nsync = "interval"' ;;
        esac
        name="bin$i-$scenario"
        out="$WORK/$name.out"
        IDEMPROXY_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$WORK/cg-$name.%p" \
            "$bin" run --config "$(conf "$name" "$store")" >"$out" 2>"$WORK/$name.err" &
        vpid=$!
        PIDS+=("$vpid")
        for _ in $(seq 600); do grep -q 'listening on' "$out" 2>/dev/null && break; sleep 0.2; done
        addr=$(awk '/listening on/ { print $4 }' "$out")
        [[ -n $addr ]] || { echo "cost.sh: $bin did not start: $(cat "$WORK/$name.err")" >&2; exit 1; }
        python3 "$HERE/cost_client.py" "$addr" "$scenario" 200 >/dev/null
        callgrind_control -z "$vpid" >/dev/null 2>&1
        python3 "$HERE/cost_client.py" "$addr" "$scenario" "$N" >/dev/null
        callgrind_control -d "$vpid" >/dev/null 2>&1
        dump=$(ls -t "$WORK"/cg-"$name".* | head -1)
        ir=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }')
        printf '| %s | %s | %d |\n' "$bin" "$scenario" "$((ir / N))"
        kill -TERM "$vpid" 2>/dev/null || true
        wait "$vpid" 2>/dev/null || true
    done
done
