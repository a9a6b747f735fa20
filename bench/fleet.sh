#!/usr/bin/env bash
# Fleet mode measured: two gateway replicas sharing one redis-server, beside one replica alone,
# in one run on one machine.
#
#   bench/fleet.sh            release build, 10 s per measurement
#   bench/fleet.sh --smoke    debug build, 1 s: checks the script works, measures nothing
#
# (1) a fresh hit from the local tier: replica A (fleet) against the lone replica, same path;
# (2) a hit from Redis: replica B holds almost nothing in memory (cache.max_size 64 KiB), so
#     reads of 20,000 items that A filled are answered from Redis; beside the lone replica
#     fetching the same items from the upstream (misses);
# (3) invalidation propagation: PATCHes through A for a few seconds; B's
#     fleet_invalidation_delay_seconds histogram gives the delay from publishing to applying.
# Environment: BENCH_DURATION (default 10), BENCH_CONNECTIONS (default 64).
# Writes bench/results/fleet.md (smoke: bench/results/fleet-smoke.md).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
DURATION=${BENCH_DURATION:-10}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
ITEMS=20000
PROFILE=release
((SMOKE)) && DURATION=1 ITEMS=2000 PROFILE=debug

# shellcheck source=bench/lib.sh
source bench/lib.sh
need wrk=wrk taskset=util-linux curl=curl redis-server=redis-server

build "$PROFILE"
BIN=target/$PROFILE

CORES=$(nproc)
SERVER_CORE=0
LOAD_CORE=$((CORES > 1 ? 1 : 0))

WORK=$(mktemp -d /tmp/cloudcasa-fleet.XXXXXX)
PIDS=()
cleanup() {
  stop_started
  rm -rf "$WORK"
}
trap cleanup EXIT
start() { # NAME COMMAND...
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
}

UPSTREAM=18190 REDIS=18379 A=18180 B=18181 ALONE=18182
# bench/soak.sh uses some of the same ports: one of them at a time.
ports_free $UPSTREAM $REDIS $A $B $ALONE 19180 19181 19182
echo -n "bench-token" >"$WORK/token"
config() { # PORT ADMIN_PORT FLEET(yes|no) CACHE_SIZE
  gateway_toml "$1" "$2" "$UPSTREAM" "$WORK/token" false "$WORK/audit-$1.jsonl" "$4"
  printf 'max_object_size = "16KiB"\nmax_inflight = "1MiB"\n'
  if [[ $3 == yes ]]; then
    printf '[fleet]\nredis_url = "redis://127.0.0.1:%s/0"\nreplica = "r%s"\n' "$REDIS" "$1"
  fi
}

say "starting redis-server, the upstream and three gateways"
start redis taskset -c "$LOAD_CORE" redis-server --bind 127.0.0.1 --port $REDIS --save "" \
  --appendonly no --dir "$WORK"
start upstream taskset -c "$LOAD_CORE" "$BIN/examples/bench_servers" upstream "127.0.0.1:$UPSTREAM" 1
config $A 19180 yes 256MiB >"$WORK/a.toml"
config $B 19181 yes 64KiB >"$WORK/b.toml"
config $ALONE 19182 no 256MiB >"$WORK/alone.toml"
for g in a b alone; do
  RUST_LOG=warn start "$g" taskset -c "$SERVER_CORE" "$BIN/cloudcasa-gateway" --config "$WORK/$g.toml"
done
for p in $REDIS $UPSTREAM $A $B $ALONE; do wait_port $p; done
metric() { # ADMIN_PORT SERIES
  curl -s "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s {print $2}'
}
for admin in 19180 19181; do
  for _ in $(seq 1 100); do
    [[ $(metric $admin cloudcasa_gateway_fleet_link_up) == 1 ]] && break
    sleep 0.1
  done
  [[ $(metric $admin cloudcasa_gateway_fleet_link_up) == 1 ]] || { say "replica $admin never joined"; exit 1; }
done

load() { # DURATION URL [SCRIPT] -> requests/s, p99 (ms), requests
  local args=(-t1 "-c$CONNECTIONS" "-d${1}s" --latency --timeout 5s)
  [[ -n ${3:-} ]] && args+=(-s "$3")
  taskset -c "$LOAD_CORE" wrk "${args[@]}" "$2" | awk '
    /Requests\/sec/ {rps = $2}
    / requests in / {total = $1}
    /^ +99%/ {p = $2; if (p ~ /us$/) {sub(/us/, "", p); p /= 1000} else if (p ~ /ms$/) {sub(/ms/, "", p)} else if (p ~ /s$/) {sub(/s/, "", p); p *= 1000}; p99 = p}
    END {printf "%.0f %.2f %d\n", rps, p99, total}'
}

export BENCH_ENTRIES=$ITEMS
# mean ROUNDS URL_A SCRIPT_A URL_B SCRIPT_B -> "rpsA p99A rpsB p99B totalA": alternated A B A B.
mean() {
  local rounds=$1 ra pa rb pb ta sum_ra=0 sum_pa=0 sum_rb=0 sum_pb=0 sum_ta=0
  for _ in $(seq 1 "$rounds"); do
    read -r ra pa ta < <(load "$DURATION" "$2" "$3")
    read -r rb pb _ < <(load "$DURATION" "$4" "$5")
    sum_ra=$((sum_ra + ra)) sum_rb=$((sum_rb + rb)) sum_ta=$((sum_ta + ta))
    sum_pa=$(python3 -c "print($sum_pa + $pa)") sum_pb=$(python3 -c "print($sum_pb + $pb)")
  done
  python3 -c "print(round($sum_ra / $rounds), '%.2f' % ($sum_pa / $rounds), round($sum_rb / $rounds), '%.2f' % ($sum_pb / $rounds), $sum_ta)"
}
ROUNDS=2
((SMOKE)) && ROUNDS=1

say "(1) fresh hits from memory"
load 2 "http://127.0.0.1:$A/api/v1/fresh" >/dev/null
load 2 "http://127.0.0.1:$ALONE/api/v1/fresh" >/dev/null
read -r hit_fleet hit_fleet_p99 hit_alone hit_alone_p99 _ < <(mean $ROUNDS \
  "http://127.0.0.1:$A/api/v1/fresh" "" "http://127.0.0.1:$ALONE/api/v1/fresh" "")

say "(2) hits from Redis: A fills $ITEMS items, B (64 KiB of memory) reads them"
for _ in $(seq 1 30); do
  load 2 "http://127.0.0.1:$A/" bench/distinct.lua >/dev/null
  stored=$(redis-cli -p $REDIS --scan --pattern 'ccg:*:e:*' | wc -l)
  ((stored >= ITEMS)) && break
done
lookups_before=$(metric 19181 'cloudcasa_gateway_fleet_shared_lookups_total{result="hit"}')
read -r shared shared_p99 miss_alone miss_alone_p99 shared_total < <(mean $ROUNDS \
  "http://127.0.0.1:$B/" bench/distinct.lua "http://127.0.0.1:$ALONE/api/v1/uncached" "")
lookups_after=$(metric 19181 'cloudcasa_gateway_fleet_shared_lookups_total{result="hit"}')

say "(3) invalidation propagation: PATCHes through A, measured at B"
load "$DURATION" "http://127.0.0.1:$A/api/v1/patch" bench/patch.lua >/dev/null
histogram=$(curl -s http://127.0.0.1:19181/metrics | grep '^cloudcasa_gateway_fleet_invalidation_delay_seconds_bucket')


mkdir -p bench/results
OUT=bench/results/fleet.md
((SMOKE)) && OUT=bench/results/fleet-smoke.md
python3 - "$hit_fleet" "$hit_fleet_p99" "$hit_alone" "$hit_alone_p99" "$shared" "$shared_p99" \
  "$shared_total" "${lookups_before:-0}" "${lookups_after:-0}" "$miss_alone" "$miss_alone_p99" "$histogram" \
  "$(nproc)" "$PROFILE" "$DURATION" "$CONNECTIONS" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "$(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')" <<'EOF' | tee "$OUT"
import re, sys
(hit_f, hit_f99, hit_a, hit_a99, shared, shared99, shared_total, lk0, lk1, miss_a, miss_a99, hist,
 cores, profile, duration, conns, commit, redis) = sys.argv[1:]
buckets = []
for line in hist.splitlines():
    m = re.search(r'le="([^"]+)"[^}]*\} (\S+)', line)
    if m:
        buckets.append((float("inf") if m[1] == "+Inf" else float(m[1]), float(m[2])))
total = buckets[-1][1] if buckets else 0
def quantile(q):
    if not total:
        return "n/a"
    for le, n in buckets:
        if n >= q * total:
            return "≤ %g ms" % (le * 1000) if le != float("inf") else "> 1 s"
shared_hits = float(lk1) - float(lk0)
served = float(shared_total)
share = min(100, 100 * shared_hits / served) if served else 0
print(f"### Fleet mode ({profile}, {cores} cores, redis-server {redis}, commit {commit})\n")
print(f"wrk -t1 -c{conns}, {duration} s per measurement, two rounds in alternation (means); each gateway with one worker thread on one core, "
      "wrk, the upstream and redis-server on the other.\n")
print("| scenario | two replicas + Redis | one replica alone | ratio |")
print("|---|---|---|---|")
print(f"| (1) fresh hit from memory, req/s (p99) | {hit_f} ({hit_f99} ms) | {hit_a} ({hit_a99} ms) | {float(hit_f) / float(hit_a):.2f} |")
print(f"| (2) hit from Redis vs fetch from the upstream, req/s (p99) | {shared} ({shared99} ms) | {miss_a} ({miss_a99} ms) | {float(shared) / float(miss_a):.2f} |")
print(f"\n(2): B answered {shared_hits:.0f} reads from Redis while wrk counted {served:.0f} completed ({share:.0f}%; "
      "the rest from B's 64 KiB of memory; the requests in flight when wrk stops are answered but not counted by wrk, "
      "so the first figure can exceed the second by up to the connections per round).\n")
print(f"(3) invalidation propagation, {total:.0f} invalidations published by A and applied by B "
      f"(fleet_invalidation_delay_seconds): p50 {quantile(0.5)}, p99 {quantile(0.99)}.")
EOF
say "written to $OUT"
