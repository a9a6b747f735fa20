#!/usr/bin/env bash
# The benchmark: cloudcasa-gateway against nginx (the equivalent caching proxy, bench/nginx.conf)
# and a bare hyper server (the ceiling for a cache hit), on one machine, in one run, measured in
# alternation (A B, B A, A B, ...) with the same connections, duration and payload.
#
#   bench/run.sh            full run (about 15 minutes after the release build)
#   bench/run.sh --smoke    a few seconds per scenario, debug build: checks the script works
#
# Environment: BENCH_DURATION (seconds per measurement, default 10), BENCH_CONNECTIONS
# (default 64), BENCH_ROUNDS (default 2), BENCH_AUDIT_ROUNDS (rounds of the audit scenarios g, h
# and i, default 6), BENCH_ENTRIES (memory run, default 100000; 0 skips it), BENCH_SCENARIOS
# (default "abcdefghi").
# Writes the table to stdout and to bench/results/latest.md (smoke: bench/results/smoke.md).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
ROUNDS=${BENCH_ROUNDS:-2}
# The audit scenarios get more rounds: (g)'s target is a ratio within 10% of 1, and one 10 s
# measurement on a shared VM moves by up to 15%; their rounds' spread is printed beside the means.
AUDIT_ROUNDS=${BENCH_AUDIT_ROUNDS:-6}
ENTRIES=${BENCH_ENTRIES:-100000}
SCENARIOS=${BENCH_SCENARIOS:-abcdefghi}
WARMUP=3
PROFILE=release
if ((SMOKE)); then
  DURATION=1 ROUNDS=1 AUDIT_ROUNDS=2 ENTRIES=2000 WARMUP=1 PROFILE=debug
fi

# shellcheck source=bench/lib.sh
source bench/lib.sh

# --- what the benchmark needs --------------------------------------------------------------
need wrk=wrk nginx=nginx-light taskset=util-linux curl=curl

build "$PROFILE"
BIN=target/$PROFILE

# --- cores: servers on one, the load generator (and the upstream) on the other ---------------
CORES=$(nproc)
SERVER_CORE=0
LOAD_CORE=$((CORES > 1 ? 1 : 0))
((CORES > 1)) || say "warning: one core only; servers and load generator share it"

WORK=$(mktemp -d /tmp/cloudcasa-bench.XXXXXX)
RAW=$WORK/raw
mkdir -p "$RAW"
PIDS=()
cleanup() {
  stop_started
  rm -rf "$WORK"
}
trap cleanup EXIT

UPSTREAM=18090 GATEWAY=18080 GATEWAY_AUDIT=18082 NGINX=18081 CEILING=18083 MEMORY=18084
BARE_PROXY=18085 NGINX_LOG=18086
ports_free $UPSTREAM $GATEWAY $GATEWAY_AUDIT $NGINX $CEILING $MEMORY $BARE_PROXY $NGINX_LOG \
  19080 19082 19084

echo -n "bench-token" >"$WORK/token"
# The audit files live apart from the token: the gateway watches the token's directory, and an
# audit file written there would wake its watcher on every batch (as it would in production).
mkdir -p "$WORK/audit"
gateway_config() { # PORT ADMIN_PORT AUDIT(on|off) CACHE_SIZE
  gateway_toml "$1" "$2" "$UPSTREAM" "$WORK/token" "$([[ $3 == on ]] && echo true || echo false)" \
    "$WORK/audit/audit-$1.jsonl" "$4"
}

start() { # NAME COMMAND...
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$WORK/$name.pid"
}

say "starting the upstream, the gateways, nginx and the ceiling"
start upstream taskset -c "$LOAD_CORE" "$BIN/examples/bench_servers" upstream "127.0.0.1:$UPSTREAM" 1
gateway_config $GATEWAY 19080 off 512MiB >"$WORK/gateway.toml"
gateway_config $GATEWAY_AUDIT 19082 on 512MiB >"$WORK/gateway-audit.toml"
RUST_LOG=warn start gateway taskset -c "$SERVER_CORE" "$BIN/cloudcasa-gateway" --config "$WORK/gateway.toml"
RUST_LOG=warn start gateway-audit taskset -c "$SERVER_CORE" "$BIN/cloudcasa-gateway" --config "$WORK/gateway-audit.toml"
mkdir -p "$WORK/nginx-cache"
sed "s#@DIR@#$WORK#g; s#@PORT@#$NGINX#; s#@LOGPORT@#$NGINX_LOG#; s#@UPSTREAM@#$UPSTREAM#" bench/nginx.conf >"$WORK/nginx.conf"
start nginx taskset -c "$SERVER_CORE" nginx -c "$WORK/nginx.conf" -e "$WORK/nginx-error.log"
start ceiling taskset -c "$SERVER_CORE" "$BIN/examples/bench_servers" ceiling "127.0.0.1:$CEILING" 1
start bare-proxy taskset -c "$SERVER_CORE" "$BIN/examples/bench_servers" proxy "127.0.0.1:$BARE_PROXY" 1 \
  "127.0.0.1:$UPSTREAM"
for p in $UPSTREAM $GATEWAY $GATEWAY_AUDIT $NGINX $NGINX_LOG $CEILING $BARE_PROXY; do wait_port $p; done

port_of() {
  case $1 in
    gateway) echo $GATEWAY ;; gateway-audit) echo $GATEWAY_AUDIT ;;
    nginx) echo $NGINX ;; nginx-log) echo $NGINX_LOG ;; ceiling) echo $CEILING ;;
    bare-proxy) echo $BARE_PROXY ;;
  esac
}

load() { # DURATION CONNECTIONS URL [SCRIPT] -> wrk output
  local args=(-t1 "-c$2" "-d${1}s" --latency --timeout 5s)
  [[ -n ${4:-} ]] && args+=(-s "$4")
  taskset -c "$LOAD_CORE" wrk "${args[@]}" "$3"
}

# The files that grow during a measurement are rotated before each one, as logrotate would: the
# file is removed and the server told to reopen it (the gateway on SIGHUP, nginx on SIGUSR1).
# Without it, the audit file reached gigabytes over the rounds, and on these VMs memory new to the
# guest costs far more than memory it had used before. The guest keeps 1 GiB of freed pages and
# hands the rest back to the host, which faults each page in again on its next use. Writing 1 GiB
# to tmpfs took 1.1 s while the guest's freed pages lasted and then 4.2 s for every further GiB.
# So a server writing its log paid about 4 µs per KiB once the file passed about 1 GiB. That
# charged (g) most, because the gateway without its audit writes nothing. Rotated each round,
# a file stays a few hundred MiB, and its pages are reused from the previous round's.
rotate() { # SERVER: its log file removed and reopened (bench/lib.sh reopen_log); others have none
  case $1 in
    gateway-audit) reopen_log "$WORK/audit/audit-$GATEWAY_AUDIT.jsonl" "$(cat "$WORK/gateway-audit.pid")" HUP ;;
    nginx-log) reopen_log "$WORK/nginx-access.json" "$(cat "$WORK/nginx.pid")" USR1 ;;
  esac
}

# scenario path connections script servers...
# Rounds alternate the order (A B, B A, A B, ...), so that a drift in the machine's speed over a
# scenario does not favour the server measured first.
scenario() {
  local name=$1 path=$2 conns=$3 script=$4 rounds=$ROUNDS
  shift 4
  [[ $SCENARIOS == *"$name"* ]] || return 0
  [[ ghi == *"$name"* ]] && rounds=$AUDIT_ROUNDS
  say "scenario ($name) $path, $conns connections, $rounds rounds: ${*}"
  for server in "$@"; do
    load "$WARMUP" "$conns" "http://127.0.0.1:$(port_of "$server")$path" "$script" >/dev/null
  done
  local servers=("$@") reversed=() i
  for ((i = $# - 1; i >= 0; i--)); do reversed+=("${servers[i]}"); done
  for round in $(seq 1 "$rounds"); do
    local order=("${servers[@]}")
    ((round % 2)) || order=("${reversed[@]}")
    for server in "${order[@]}"; do
      rotate "$server"
      load "$DURATION" "$conns" "http://127.0.0.1:$(port_of "$server")$path" "$script" \
        >"$RAW/$name.$server.$round.wrk"
    done
  done
}

scenario a /api/v1/fresh "$CONNECTIONS" "" gateway nginx ceiling
scenario b /api/v1/collection "$CONNECTIONS" "" gateway nginx ceiling
scenario c /api/v1/revalidate "$CONNECTIONS" "" gateway nginx
# (d), (e): the bare hyper proxy is measured too, to tell the gateway's own cost from hyper's.
scenario d /api/v1/uncached "$CONNECTIONS" "" gateway nginx bare-proxy
scenario e /api/v1/patch "$CONNECTIONS" bench/patch.lua gateway nginx bare-proxy
scenario f /api/v1/fresh 256 "" gateway nginx ceiling
scenario g /api/v1/fresh "$CONNECTIONS" "" gateway-audit gateway
# (h), (i): the same work on both sides: the gateway with its audit file, nginx with a JSON
# access log (buffered); nginx without one and the bare proxy beside them.
scenario h /api/v1/fresh "$CONNECTIONS" "" gateway-audit nginx-log nginx
scenario i /api/v1/patch "$CONNECTIONS" bench/patch.lua gateway-audit nginx-log bare-proxy

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$(cat "$WORK/$1.pid")/status"; }
{
  echo "**Gateway RSS after the scenarios:** $(($(rss_kib gateway) / 1024)) MiB (audit off), $(($(rss_kib gateway-audit) / 1024)) MiB (audit on); nginx worker and master are separate processes and not compared."
} >"$RAW/1-rss.txt"

if ((ENTRIES > 0)); then
say "memory run: $ENTRIES distinct 1 KiB entries"
export BENCH_ENTRIES=$ENTRIES
gateway_config $MEMORY 19084 off 1GiB >"$WORK/gateway-memory.toml"
RUST_LOG=warn start gateway-memory taskset -c "$SERVER_CORE" "$BIN/cloudcasa-gateway" --config "$WORK/gateway-memory.toml"
wait_port $MEMORY
before=$(rss_kib gateway-memory)
report() { curl -s http://127.0.0.1:19084/cache; }
for _ in $(seq 1 30); do
  load 5 "$CONNECTIONS" "http://127.0.0.1:$MEMORY/" bench/distinct.lua >/dev/null
  entries=$(report | python3 -c 'import json,sys; print(json.load(sys.stdin)["entries"])')
  ((entries >= ENTRIES)) && break
done
after=$(rss_kib gateway-memory)
python3 - "$before" "$after" "$(report)" "$ENTRIES" >"$RAW/2-memory.txt" <<'EOF'
import json, sys
before, after, report, wanted = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
weighted = report["weighted_bytes"] / 1024 / 1024
rss = after / 1024
limit = 1.5 * weighted + 30
verdict = "met" if rss <= limit else "missed"
print(f"**Memory:** {report['entries']} entries stored (asked for {wanted}); cache weighted size "
      f"{weighted:.1f} MiB; RSS {before / 1024:.1f} MiB empty, {rss:.1f} MiB full; "
      f"limit 1.5 × weighted + 30 MiB = {limit:.1f} MiB: {verdict}.")
EOF
fi

{
  echo "**Machine:** $(nproc) cores ($(lscpu | sed -n 's/^Model name:\s*//p' | head -1)), $(uname -sr);"
  echo "servers pinned to core $SERVER_CORE, wrk and the upstream to core $LOAD_CORE; gateway with 1 worker thread, nginx $(nginx -v 2>&1 | sed 's#.*/##') with 1 worker;"
  echo "ceiling: a bare hyper server answering from memory (a, b, f); bare-proxy: a bare hyper proxy, hyper-util's pooled client and the token header and nothing else (d, e; no target, it shows what hyper itself costs);"
  echo "wrk -t1 -c$CONNECTIONS (f: -c256), ${DURATION}s per measurement after ${WARMUP}s warm-up, $ROUNDS rounds (g, h, i: $AUDIT_ROUNDS) in alternation, the order reversed every other round; means of the rounds; the audit files and nginx's access log rotated before each measurement."
  echo "Run: $(date -u +%Y-%m-%dT%H:%MZ), profile $PROFILE, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src bench Cargo.toml 2>/dev/null || echo " with uncommitted changes")."
} >"$RAW/0-machine.txt"

mkdir -p bench/results
OUT=bench/results/latest.md
((SMOKE)) && OUT=bench/results/smoke.md
python3 bench/report.py "$RAW" $( ((SMOKE)) && echo --smoke) | tee "$OUT"
rm -rf bench/results/raw && cp -r "$RAW" bench/results/raw
say "written to $OUT (wrk's own output in bench/results/raw/)"
