#!/usr/bin/env bash
# Instructions per request, counted by callgrind: a figure that repeats from run to run, unlike
# req/s on a shared machine, so it can tell a 2% change in the gateway's own work from noise.
# (It says nothing about the kernel's share or cache misses; bench/run.sh measures those.)
#
#   bench/instructions.sh [SCENARIO...]     scenarios: hit (a), hit-audit (a with the audit
#                                           file on), patch (e), uncached (d), bare-patch (the
#                                           bare hyper proxy on e); default all. Also, on demand:
#                                           hit-20k and miss-20k (a hit, and a miss that stores,
#                                           with 20,000 query variants of the path stored) and
#                                           miss-1 (a miss that stores, on paths with nothing
#                                           stored): the cost per variant must be flat
#
# The audit writer's thread counts too: with the file on, the SHA-256 chain runs in software
# under valgrind (no SHA extensions), so hit-audit overstates what the chain costs.
#
# Environment: INSTR_SECONDS (measured seconds per scenario, default 10); INSTR_KEEP=DIR keeps
# each scenario's callgrind dump there (for callgrind_annotate).
# Needs valgrind and wrk (installed from Debian's packages if missing); builds release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_PER=${INSTR_SECONDS:-10}
SCENARIOS=("$@")
((${#SCENARIOS[@]})) || SCENARIOS=(hit hit-audit patch uncached bare-patch)

# shellcheck source=bench/lib.sh
source bench/lib.sh

need valgrind=valgrind callgrind_annotate=valgrind wrk=wrk curl=curl

build release
BIN=target/release

WORK=$(mktemp -d /tmp/cloudcasa-instr.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

UPSTREAM=17090 GATEWAY=17080 ADMIN=17081
echo -n "bench-token" >"$WORK/token"
mkdir -p "$WORK/audit" # apart from the watched token directory, as in bench/run.sh
cat >"$WORK/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:$GATEWAY"
worker_threads = 1
[admin]
listen = "127.0.0.1:$ADMIN"
[upstream]
url = "http://127.0.0.1:$UPSTREAM"
[token]
file = "$WORK/token"
[audit]
enabled = false
path = "$WORK/audit/audit.jsonl"
EOF
sed 's/^enabled = false/enabled = true/' "$WORK/gateway.toml" >"$WORK/gateway-audit.toml"

"$BIN/examples/bench_servers" upstream "127.0.0.1:$UPSTREAM" 1 >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)

count() { # NAME PATH SCRIPT COMMAND... (the command listens on $GATEWAY)
  local name=$1 path=$2 script=$3
  shift 3
  valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.out" "$@" >"$WORK/$name.log" 2>&1 &
  local vg=$!
  local url="http://127.0.0.1:$GATEWAY$path"
  # Under valgrind the gateway takes a while to start.
  wait_port "$GATEWAY" 60
  local args=(-t1 -c8)
  [[ -n $script ]] && args+=(-s "$script")
  if [[ -n ${PREFILL:-} ]]; then
    # Store PREFILL variants first: wrk over them until the admin endpoint counts them all.
    VARIANT_FIRST=1 VARIANT_COUNT=$PREFILL wrk -t1 -c8 -d600s -s bench/variants.lua "$url" >/dev/null &
    local filler=$!
    local stored=0
    for _ in $(seq 600); do
      stored=$(curl -s "http://127.0.0.1:$ADMIN/cache" | sed -n 's/.*"entries":\([0-9]*\).*/\1/p')
      ((${stored:-0} >= PREFILL)) && break
      sleep 1
    done
    kill "$filler" 2>/dev/null || true
    wait "$filler" 2>/dev/null || true
    ((${stored:-0} >= PREFILL)) || { say "prefill stopped at ${stored:-0} of $PREFILL"; exit 1; }
  fi
  wrk "${args[@]}" -d2s "$url" >/dev/null
  callgrind_control -z "$vg" >/dev/null 2>&1
  local n
  n=$(wrk "${args[@]}" "-d${SECONDS_PER}s" "$url" | awk '/requests in/ {print $1}')
  callgrind_control -d "$vg" >/dev/null 2>&1
  kill -9 "$vg" 2>/dev/null || true
  wait "$vg" 2>/dev/null || true
  local dump total
  dump=$(ls "$WORK/$name.out".* | tail -1)
  if [[ -n ${INSTR_KEEP:-} ]]; then mkdir -p "$INSTR_KEEP" && cp "$dump" "$INSTR_KEEP/$name.callgrind"; fi
  total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  printf '%-11s %8d requests  %7d instructions/request\n' "$name" "$n" $((total / n))
}

wait_port "$UPSTREAM"
gateway=("$BIN/cloudcasa-gateway" --config "$WORK/gateway.toml")
for s in "${SCENARIOS[@]}"; do
  case $s in
    hit) count hit /api/v1/fresh "" "${gateway[@]}" ;;
    hit-audit) count hit-audit /api/v1/fresh "" "$BIN/cloudcasa-gateway" --config "$WORK/gateway-audit.toml" ;;
    patch) count patch /api/v1/patch bench/patch.lua "${gateway[@]}" ;;
    uncached) count uncached /api/v1/uncached "" "${gateway[@]}" ;;
    bare-patch) count bare-patch /api/v1/patch bench/patch.lua "$BIN/examples/bench_servers" proxy "127.0.0.1:$GATEWAY" 1 "127.0.0.1:$UPSTREAM" ;;
    hit-20k) PREFILL=20000 VARIANT_FIRST=1 VARIANT_COUNT=20000 count hit-20k /api/v1/fresh bench/variants.lua "${gateway[@]}" ;;
    miss-20k) PREFILL=20000 VARIANT_FIRST=20001 VARIANT_COUNT=100000000 count miss-20k /api/v1/fresh bench/variants.lua "${gateway[@]}" ;;
    miss-1) BENCH_ENTRIES=100000000 count miss-1 /api/v1/items bench/distinct.lua "${gateway[@]}" ;;
    *) say "unknown scenario $s (hit, hit-audit, patch, uncached, bare-patch, hit-20k, miss-20k, miss-1)"; exit 2 ;;
  esac
done
