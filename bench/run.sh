#!/usr/bin/env bash
# The idemproxy benchmark, side by side with nginx, in one run on loopback.
#
#   bench/run.sh                 the full run (about 10 minutes)
#   bench/run.sh --quick         2-second runs and 50k keys: checks the harness
#   bench/run.sh --wait-quiet    after building, waits (at most 40 min) for
#                                the 1-minute load average to drop below 0.7
#   bench/run.sh --only=throughput,hotkey,memory   a subset of the scenarios
#
# Before/after: with BENCH_BEFORE_BIN=PATH (an idemproxy binary built from an
# older commit, e.g. `git worktree add /tmp/before 010fb08` built there), every
# idemproxy scenario runs for both builds in the same run, after the nginx
# baselines, alternating tools; the report puts them side by side.
#
# Needs: oha (`cargo install oha --locked`), wrk and nginx (`apt-get install
# -y wrk nginx`), python3, curl, cargo; tcpdump (optional, root) times the
# hot-key answers as sent. Nothing is installed by this script. Everything it
# starts runs as the current user in a temp dir and is killed on exit; every
# load run is bounded by a duration or a count.
#
# Environment:
#   BENCH_DURATION (10s), BENCH_CONNECTIONS (50), BENCH_HOT_N (1000)
#   BENCH_MEM_KEYS (1000000), BENCH_MEM_TTL (150s; must exceed the storing time)
#   BENCH_SLED_CACHE (64MiB, the default store.cache_capacity)
#   BENCH_IDEMPROXY_ENV="NAME=VALUE ..."  variables for idemproxy only
#                      (e.g. TOKIO_WORKER_THREADS=1, LD_PRELOAD=...)
#   BENCH_IDEMPROXY_BIN=PATH  run that binary instead of building target/release
#   BENCH_BEFORE_BIN=PATH     also run every idemproxy scenario with that binary
#   BENCH_WORKERS_ONE=1       also run pass-through with `server.workers = 1`
#   BENCH_PERF=1       perf-profile the proxy in every load run (flat profiles in
#                      bench/results/perf-*.txt; perf costs CPU: not for figures)
#   BENCH_PERF_ARGS    perf record options (-g; "--call-graph dwarf" with a
#                      build that has line tables); see bench/perf_frames.py
#   BENCH_KEEP=1       keep the temp dir
# The report goes to stdout and to bench/results/ (git-ignored).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")

QUICK=0
WAIT_QUIET=0
ONLY=throughput,hotkey,memory
for arg in "$@"; do
    case $arg in
        --only=*) ONLY=${arg#--only=} ;;
        --quick) QUICK=1 ;;
        --wait-quiet) WAIT_QUIET=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print } /^set /{ exit }' "$0"; exit 0 ;;
        *) echo "bench/run.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

if ((QUICK)); then
    DURATION=${BENCH_DURATION:-2s}
    MEM_KEYS=${BENCH_MEM_KEYS:-50000}
    MEM_TTL=${BENCH_MEM_TTL:-20s}
else
    DURATION=${BENCH_DURATION:-10s}
    MEM_KEYS=${BENCH_MEM_KEYS:-1000000}
    MEM_TTL=${BENCH_MEM_TTL:-150s}
fi
CONC=${BENCH_CONNECTIONS:-50}
HOT_N=${BENCH_HOT_N:-1000}
SWEEP=5s
WARMUP=1s
BODY='{"amount":100,"currency":"EUR"}'

want() { [[ ",$ONLY," == *",$1,"* ]]; }
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- prerequisites -----------------------------------------------------------
if ! command -v oha >/dev/null; then
    echo "bench/run.sh: oha is not installed; run: cargo install oha --locked   (takes a few minutes)" >&2
    exit 1
fi
NGINX=$(command -v nginx || true)
[[ -z $NGINX && -x /usr/sbin/nginx ]] && NGINX=/usr/sbin/nginx
for tool in wrk python3 curl cargo; do
    command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install -y wrk nginx curl python3)"
done
[[ -n $NGINX ]] || die "nginx is not installed (apt-get install -y nginx)"

# --- processes: everything started here is killed on exit --------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/idemproxy-bench.XXXXXX")
BG_PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${BG_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
    local port=$1 i
    for i in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$port after 10 s"
}

# template IN OUT NAME=VALUE...: replaces @NAME@ with VALUE.
template() {
    python3 - "$@" <<'PY'
import sys
text = open(sys.argv[1]).read()
for kv in sys.argv[3:]:
    k, v = kv.split("=", 1)
    text = text.replace(f"@{k}@", v)
open(sys.argv[2], "w").write(text)
PY
}

children() { # direct children of a pid
    awk -v p="$1" '{ f = FILENAME; sub(/.*\) /, ""); if ($2 == p) { split(f, a, "/"); print a[3] } }' \
        /proc/[0-9]*/stat 2>/dev/null || true
}

ticks() { # utime + stime of the given pids, in clock ticks
    local total=0 p t
    for p in "$@"; do
        t=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || echo 0)
        total=$((total + t))
    done
    echo "$total"
}

busy_ticks() { # all CPUs: everything but idle and iowait, in clock ticks
    awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }

metric() { # metric ADMIN_ADDR NAME_WITH_LABELS -> value (0 if absent)
    curl -fsS "http://$1/metrics" | awk -v m="$2" '$1 == m { v = $2 } END { print v + 0 }'
}

start_nginx() { # name conf port
    "$NGINX" -p "$WORK" -c "$2" -e "$WORK/$1-error.log" 2>>"$WORK/$1-error.log" &
    BG_PIDS+=($!)
    wait_port "$3"
}

IDEM_PID=
IDEM_ADDR=
IDEM_ADMIN=
start_idemproxy() { # name conf [binary]
    local out="$WORK/$1.out" i line
    # shellcheck disable=SC2086
    env IDEMPROXY_LOG=warn ${BENCH_IDEMPROXY_ENV:-} "${3:-$IDEMPROXY_BIN}" run --config "$2" \
        >"$out" 2>"$WORK/$1.err" &
    IDEM_PID=$!
    BG_PIDS+=("$IDEM_PID")
    for i in $(seq 100); do
        line=$(grep -m1 '^idemproxy listening on ' "$out" || true)
        [[ -n $line ]] && break
        kill -0 "$IDEM_PID" 2>/dev/null || die "idemproxy $1 exited: $(cat "$WORK/$1.err")"
        sleep 0.1
    done
    [[ -n $line ]] || die "idemproxy $1 did not start within 10 s"
    read -r _ _ _ IDEM_ADDR _ IDEM_ADMIN <<<"$line"
}

stop_pid() {
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# idemproxy_conf NAME UPSTREAM_PORT SYNC TTL [SERVER_EXTRA] -> path of the config
# SYNC "memory" selects the memory store instead of sled.
idemproxy_conf() {
    local conf="$WORK/$1.toml" store
    if [[ $3 == memory ]]; then
        store=$'backend = "memory"\nsweep_interval = "'"$SWEEP"'"'
    else
        store=$'backend = "sled"\npath = "'"$WORK/data-$1"$'"\nsync = "'"$3"$'"\nsweep_interval = "'"$SWEEP"$'"\ncache_capacity = "'"${BENCH_SLED_CACHE:-64MiB}"'"'
    fi
    template "$HERE/idemproxy.toml.in" "$conf" UPSTREAM_PORT="$2" STORE="$store" TTL="$4" SERVER_EXTRA="${5:-}"
    echo "$conf"
}

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
# jline NAME=VALUE... NAME@FILE...: appends one JSON object to the results
# (NAME@FILE takes the file's content as the value).
jline() {
    python3 -c '
import json, re, sys
out = {}
for a in sys.argv[1:]:
    k, sep, v = re.match(r"([a-z_0-9]+)([=@])(.*)", a, re.S).groups()
    out[k] = open(v).read() if sep == "@" else v
print(json.dumps(out))' "$@" >>"$RESULTS"
}

# measure NAME TOOL "PROXY PIDS" "UPSTREAM PIDS" CMD...: runs CMD once, with
# the CPU time of the proxy and upstream processes read before and after.
measure() {
    local name=$1 tool=$2 proxy_pids=$3 up_pids=$4
    shift 4
    local out="$WORK/run-$name.out" p0 u0 p1 u1 m0 m1
    log "$name: $*"
    # shellcheck disable=SC2086
    p0=$(ticks $proxy_pids)
    # shellcheck disable=SC2086
    u0=$(ticks $up_pids)
    m0=$(busy_ticks)
    local perf_pid=
    if [[ ${BENCH_PERF:-0} == 1 && -n $proxy_pids ]]; then
        # shellcheck disable=SC2086
        perf record -q -e cpu-clock -F 999 ${BENCH_PERF_ARGS:--g} -o "$WORK/perf-$name.data" -p "${proxy_pids// /,}" \
            >/dev/null 2>&1 &
        perf_pid=$!
    fi
    "$@" >"$out" 2>"$WORK/run-$name.err" || die "$name failed: $(tail -5 "$WORK/run-$name.err")"
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        mkdir -p "$HERE/results"
        {
            perf report -i "$WORK/perf-$name.data" --no-children --sort dso --stdio -g none 2>/dev/null
            perf report -i "$WORK/perf-$name.data" --no-children --sort dso,symbol --stdio -g none \
                --percent-limit 0.4 2>/dev/null
        } | grep -v '^#' | grep -v '^$' | cut -c1-200 >"$HERE/results/perf-$name.txt" || true
    fi
    # shellcheck disable=SC2086
    p1=$(ticks $proxy_pids)
    # shellcheck disable=SC2086
    u1=$(ticks $up_pids)
    m1=$(busy_ticks)
    jline kind=load name="$name" tool="$tool" out@"$out" proxy_ticks=$((p1 - p0)) upstream_ticks=$((u1 - u0)) \
        machine_ticks=$((m1 - m0)) has_proxy="$([[ -n $proxy_pids ]] && echo 1 || echo 0)"
}

# oha --rand-regex-url treats the whole URL as a pattern with '.' literal (do
# not escape it: "\." makes a different host). Every pattern is checked
# before use: the generated URLs must stay on the loopback target.
rand_url() { # rand_url PATTERN -> PATTERN, or dies
    local base=${1%%/api/*} u
    while read -r u; do
        [[ $u == "$base"/api/* && $base == http://127.0.0.1:* ]] || die "--rand-regex-url pattern $1 generates $u"
    done < <(oha --rand-regex-url --dump-urls 3 "$1")
    echo "$1"
}

OHA=(oha --no-tui --output-format json -c "$CONC")
WRK=(wrk -t2 -c "$CONC" -d "$DURATION" -s "$HERE/unique_key.lua")
export BENCH_RUN="r$(date +%s)"

# --- build -----------------------------------------------------------------------
IDEMPROXY_BIN=${BENCH_IDEMPROXY_BIN:-$ROOT/target/release/idemproxy}
if [[ -z ${BENCH_IDEMPROXY_BIN:-} ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet)
fi

# --- wait for a quiet machine --------------------------------------------------
if ((WAIT_QUIET)); then
    for i in $(seq 80); do
        load=$(cut -d' ' -f1 /proc/loadavg)
        if awk -v l="$load" 'BEGIN { exit !(l < 0.7) }'; then break; fi
        log "load average $load >= 0.7; waiting (check $i of 80, every 30 s)"
        sleep 30
    done
fi

jline kind=meta key=load_start value="$(cat /proc/loadavg)"
jline kind=meta key=commit value="$(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' + uncommitted changes in src')"
jline kind=meta key=nproc value="$(nproc)"
jline kind=meta key=cpu value="$(lscpu | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }')"
jline kind=meta key=mem value="$(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
jline kind=meta key=kernel value="$(uname -r)"
jline kind=meta key=versions value="$("$NGINX" -v 2>&1 | sed 's/.*: //'), $(oha --version), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2), $(rustc --version | cut -d' ' -f1-2)"
jline kind=meta key=settings value="duration $DURATION, $CONC connections, warm-up $WARMUP per target, sled cache_capacity ${BENCH_SLED_CACHE:-64MiB}${BENCH_IDEMPROXY_ENV:+, idemproxy environment: $BENCH_IDEMPROXY_ENV}"

# --- the fast upstream and nginx in front of it ----------------------------------------
USER_LINE=
((EUID == 0)) && USER_LINE="user root;"
UP_PORT=$(free_port)
NGX_PORT=$(free_port)
template "$HERE/nginx-upstream.conf.in" "$WORK/upstream.conf" USER="$USER_LINE" DIR="$WORK" PORT="$UP_PORT"
template "$HERE/nginx-proxy.conf.in" "$WORK/proxy.conf" USER="$USER_LINE" DIR="$WORK" PORT="$NGX_PORT" UPSTREAM_PORT="$UP_PORT"
start_nginx upstream "$WORK/upstream.conf" "$UP_PORT"
UP_MASTER=${BG_PIDS[-1]}
start_nginx proxy "$WORK/proxy.conf" "$NGX_PORT"
NGX_MASTER=${BG_PIDS[-1]}
UP_PIDS="$UP_MASTER $(children "$UP_MASTER" | tr '\n' ' ')"
NGX_PIDS="$NGX_MASTER $(children "$NGX_MASTER" | tr '\n' ' ')"
log "upstream nginx on :$UP_PORT (pids $UP_PIDS), proxy nginx on :$NGX_PORT (pids $NGX_PIDS)"

if want throughput; then
WRK_PLAIN=(env WRK_MODE=plain "${WRK[@]}")

# nginx baselines, once per tool at the start and once at the end (the report
# uses their mean, and shows both so that drift is visible).
nginx_baselines() { # suffix
    measure "oha_direct$1" oha "" "$UP_PIDS" "${OHA[@]}" -z "$DURATION" "http://127.0.0.1:$UP_PORT/item"
    measure "oha_nginx$1" oha "$NGX_PIDS" "$UP_PIDS" "${OHA[@]}" -z "$DURATION" "http://127.0.0.1:$NGX_PORT/item"
    measure "wrk_direct$1" wrk "" "$UP_PIDS" "${WRK_PLAIN[@]}" "http://127.0.0.1:$UP_PORT/item"
    measure "wrk_nginx$1" wrk "$NGX_PIDS" "$UP_PIDS" "${WRK_PLAIN[@]}" "http://127.0.0.1:$NGX_PORT/item"
}
for url in "http://127.0.0.1:$UP_PORT/item" "http://127.0.0.1:$NGX_PORT/item"; do
    "${OHA[@]}" -z "$WARMUP" "$url" >/dev/null
done
nginx_baselines ""

# idemproxy_scenarios BUILD BINARY: every idemproxy row for one build.
idemproxy_scenarios() {
    local b=$1 bin=$2 url replay_key warm_re unique_re
    # sled, sync = interval: pass-through, replay, unique keys
    start_idemproxy "$b-interval" "$(idemproxy_conf "$b-interval" "$UP_PORT" interval 24h)" "$bin"
    log "$b: idemproxy (sled, interval) on $IDEM_ADDR, pid $IDEM_PID"
    url="http://$IDEM_ADDR"
    "${OHA[@]}" -z "$WARMUP" "$url/api/item" >/dev/null
    measure "oha_${b}_pass" oha "$IDEM_PID" "$UP_PIDS" "${OHA[@]}" -z "$DURATION" "$url/api/item"
    measure "wrk_${b}_pass" wrk "$IDEM_PID" "$UP_PIDS" "${WRK_PLAIN[@]}" "$url/api/item"
    replay_key="replay-$b-$BENCH_RUN"
    curl -fsS -o /dev/null -X POST -H "Idempotency-Key: $replay_key" -d "$BODY" "$url/api/charge"
    measure "oha_${b}_replay_sled" oha "$IDEM_PID" "$UP_PIDS" "${OHA[@]}" -z "$DURATION" -m POST \
        -H "Idempotency-Key: $replay_key" -d "$BODY" "$url/api/charge"
    measure "wrk_${b}_replay_sled" wrk "$IDEM_PID" "$UP_PIDS" env WRK_MODE=replay WRK_KEY="$replay_key" \
        "${WRK[@]}" "$url/api/charge"
    warm_re=$(rand_url "$url/api/warm/[a-z0-9]{24}")
    unique_re=$(rand_url "$url/api/u/[a-z0-9]{24}")
    "${OHA[@]}" -z "$WARMUP" -m POST -d "$BODY" --rand-regex-url "$warm_re" >/dev/null
    measure "oha_${b}_unique_interval" oha "$IDEM_PID" "$UP_PIDS" "${OHA[@]}" -z "$DURATION" -m POST -d "$BODY" \
        --rand-regex-url "$unique_re"
    measure "wrk_${b}_unique_interval" wrk "$IDEM_PID" "$UP_PIDS" "${WRK[@]}" "$url/api/w"
    stop_pid "$IDEM_PID"

    # sled, sync = always (group commit): unique keys
    start_idemproxy "$b-always" "$(idemproxy_conf "$b-always" "$UP_PORT" always 24h)" "$bin"
    log "$b: idemproxy (sled, always) on $IDEM_ADDR, pid $IDEM_PID"
    url="http://$IDEM_ADDR"
    warm_re=$(rand_url "$url/api/warm/[a-z0-9]{24}")
    unique_re=$(rand_url "$url/api/u/[a-z0-9]{24}")
    "${OHA[@]}" -z "$WARMUP" -m POST -d "$BODY" --rand-regex-url "$warm_re" >/dev/null
    measure "oha_${b}_unique_always" oha "$IDEM_PID" "$UP_PIDS" "${OHA[@]}" -z "$DURATION" -m POST -d "$BODY" \
        --rand-regex-url "$unique_re"
    measure "wrk_${b}_unique_always" wrk "$IDEM_PID" "$UP_PIDS" "${WRK[@]}" "$url/api/w"
    stop_pid "$IDEM_PID"

    # memory store: replay
    start_idemproxy "$b-memory" "$(idemproxy_conf "$b-memory" "$UP_PORT" memory 24h)" "$bin"
    log "$b: idemproxy (memory) on $IDEM_ADDR, pid $IDEM_PID"
    url="http://$IDEM_ADDR"
    replay_key="replay-$b-mem-$BENCH_RUN"
    curl -fsS -o /dev/null -X POST -H "Idempotency-Key: $replay_key" -d "$BODY" "$url/api/charge"
    "${OHA[@]}" -z "$WARMUP" -m POST -H "Idempotency-Key: $replay_key" -d "$BODY" "$url/api/charge" >/dev/null
    measure "oha_${b}_replay_memory" oha "$IDEM_PID" "$UP_PIDS" "${OHA[@]}" -z "$DURATION" -m POST \
        -H "Idempotency-Key: $replay_key" -d "$BODY" "$url/api/charge"
    measure "wrk_${b}_replay_memory" wrk "$IDEM_PID" "$UP_PIDS" env WRK_MODE=replay WRK_KEY="$replay_key" \
        "${WRK[@]}" "$url/api/charge"
    stop_pid "$IDEM_PID"
}

if [[ -n ${BENCH_BEFORE_BIN:-} ]]; then
    [[ -x $BENCH_BEFORE_BIN ]] || die "BENCH_BEFORE_BIN=$BENCH_BEFORE_BIN is not executable"
    jline kind=meta key=before value="$("$BENCH_BEFORE_BIN" --version) at $BENCH_BEFORE_BIN"
    idemproxy_scenarios before "$BENCH_BEFORE_BIN"
fi
idemproxy_scenarios after "$IDEMPROXY_BIN"

if [[ ${BENCH_WORKERS_ONE:-0} == 1 ]]; then
    start_idemproxy one "$(idemproxy_conf one "$UP_PORT" interval 24h 'workers = 1')"
    url="http://$IDEM_ADDR"
    "${OHA[@]}" -z "$WARMUP" "$url/api/item" >/dev/null
    measure oha_one_pass oha "$IDEM_PID" "$UP_PIDS" "${OHA[@]}" -z "$DURATION" "$url/api/item"
    measure wrk_one_pass wrk "$IDEM_PID" "$UP_PIDS" "${WRK_PLAIN[@]}" "$url/api/item"
    stop_pid "$IDEM_PID"
fi

nginx_baselines "_end"
fi

if want hotkey; then
# --- hot key: HOT_N concurrent requests, one fresh key, a 200 ms upstream ---------------------
SLOW_PORT=$(free_port)
python3 "$HERE/slow_upstream.py" "$SLOW_PORT" "$WORK/slow-upstream.log" 0.2 >"$WORK/slow-upstream.out" 2>&1 &
SLOW_PID=$!
BG_PIDS+=("$SLOW_PID")
wait_port "$SLOW_PORT"

hot_key() { # BUILD BINARY
    local b=$1 bin=$2 hp0 hp1 tcpdump_pid=
    : >"$WORK/slow-upstream.log"
    start_idemproxy "hot-$b" "$(idemproxy_conf "hot-$b" "$SLOW_PORT" always 24h)" "$bin"
    log "hot key ($b): $HOT_N requests on one key through idemproxy $IDEM_ADDR to a 200 ms upstream"
    # The client's clock says when it read each answer; a capture (if tcpdump
    # may run here) says when the proxy sent it, independently of the client.
    echo '{}' >"$WORK/hot-capture-$b.json"
    if command -v tcpdump >/dev/null; then
        tcpdump -i lo -n -s 512 -U -w "$WORK/hot-$b.pcap" "tcp src port ${IDEM_ADDR##*:}" 2>"$WORK/tcpdump-$b.err" &
        tcpdump_pid=$!
        BG_PIDS+=("$tcpdump_pid")
        for _ in $(seq 50); do grep -q listening "$WORK/tcpdump-$b.err" && break; sleep 0.1; done
        grep -q listening "$WORK/tcpdump-$b.err" || { log "tcpdump cannot capture here; client-side figures only"; tcpdump_pid=; }
    fi
    hp0=$(ticks "$IDEM_PID")
    python3 "$HERE/hotkey.py" 127.0.0.1 "${IDEM_ADDR##*:}" "$HOT_N" "hot-$b-$BENCH_RUN" /api/hot >"$WORK/hotkey-$b.json"
    hp1=$(ticks "$IDEM_PID")
    if [[ -n $tcpdump_pid ]]; then
        sleep 0.5
        stop_pid "$tcpdump_pid"
        python3 "$HERE/pcap_lag.py" "$WORK/hot-$b.pcap" >"$WORK/hot-capture-$b.json"
    fi
    jline kind=hot build="$b" out@"$WORK/hotkey-$b.json" capture@"$WORK/hot-capture-$b.json" proxy_ticks=$((hp1 - hp0)) \
        upstream_executions="$(wc -l <"$WORK/slow-upstream.log")" \
        stored="$(metric "$IDEM_ADMIN" 'idemproxy_requests_total{outcome="stored"}')" \
        coalesced="$(metric "$IDEM_ADMIN" 'idemproxy_requests_total{outcome="coalesced"}')" \
        replayed="$(metric "$IDEM_ADMIN" 'idemproxy_requests_total{outcome="replayed"}')" \
        conflict="$(metric "$IDEM_ADMIN" 'idemproxy_requests_total{outcome="conflict"}')"
    stop_pid "$IDEM_PID"
}
[[ -n ${BENCH_BEFORE_BIN:-} ]] && hot_key before "$BENCH_BEFORE_BIN"
hot_key after "$IDEMPROXY_BIN"
stop_pid "$SLOW_PID"

fi

if want memory; then
# --- memory: MEM_KEYS stored responses, then expiry -----------------------------------------------
start_idemproxy mem "$(idemproxy_conf mem "$UP_PORT" interval "$MEM_TTL")"
sleep 1
rss0=$(rss_kib "$IDEM_PID")
log "memory: storing $MEM_KEYS keys (ttl $MEM_TTL, sweep every $SWEEP) through $IDEM_ADDR; RSS $rss0 KiB"
MEM_RE=$(rand_url "http://$IDEM_ADDR/api/m/[a-z0-9]{24}")
t_store=$(date +%s)
measure memory_store oha "$IDEM_PID" "$UP_PIDS" "${OHA[@]}" -n "$MEM_KEYS" -m POST -d "$BODY" \
    --rand-regex-url "$MEM_RE"
store_secs=$(($(date +%s) - t_store))
sleep 1
rss1=$(rss_kib "$IDEM_PID")
stored=$(metric "$IDEM_ADMIN" 'idemproxy_requests_total{outcome="stored"}')
expired_early=$(metric "$IDEM_ADMIN" 'idemproxy_store_expired_records_total')
disk1=$(du -sk "$WORK/data-mem" | cut -f1)
((stored * 10 >= MEM_KEYS * 9)) || log "warning: only $stored of $MEM_KEYS requests were stored"
log "memory: stored $stored in ${store_secs}s, RSS $rss1 KiB, swept so far $expired_early; waiting for expiry"
ttl_s=$(python3 -c "import sys; v = sys.argv[1]; print(int(float(v[:-1]) * {'s': 1, 'm': 60, 'h': 3600}[v[-1]]))" "$MEM_TTL")
limit=$((ttl_s + 600))
waited=0
swept=$expired_early
while ((swept < stored && waited < limit)); do
    sleep 5
    waited=$((waited + 5))
    swept=$(metric "$IDEM_ADMIN" 'idemproxy_store_expired_records_total')
done
sleep 2 # one more sweep interval to let the allocator settle
rss2=$(rss_kib "$IDEM_PID")
disk2=$(du -sk "$WORK/data-mem" | cut -f1)
jline kind=mem keys="$MEM_KEYS" stored="$stored" store_secs="$store_secs" ttl="$MEM_TTL" rss_before="$rss0" \
    rss_stored="$rss1" rss_expired="$rss2" hwm="$(hwm_kib "$IDEM_PID")" swept="$swept" swept_before_end="$expired_early" \
    waited_after_store="$waited" disk_stored_kib="$disk1" disk_expired_kib="$disk2"
stop_pid "$IDEM_PID"

fi

jline kind=meta key=load_end value="$(cat /proc/loadavg)"

# --- report --------------------------------------------------------------------------------
mkdir -p "$HERE/results"
stamp=$(date +%Y%m%d-%H%M%S)
cp "$RESULTS" "$HERE/results/$stamp.jsonl"
python3 "$HERE/report.py" "$RESULTS" "$(getconf CLK_TCK)" | tee "$HERE/results/$stamp.md"
log "report saved as bench/results/$stamp.md"
