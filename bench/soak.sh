#!/usr/bin/env bash
# Soak test: one release gateway (audit on, to a file) in front of the mock upstream, held for a
# while under a moderate mixed load, sampled as it goes: does its memory level off, do its file
# descriptors and connections come back, do its limits (idle_timeout, body_timeout,
# max_connections) hold without errors elsewhere?
#
#   bash bench/soak.sh
#
# Load, all of it bounded and paced (bench/soak.lua waits between a connection's requests):
#   - wrk, SOAK_CONNECTIONS connections each: fresh hits (/api/v1/fresh), misses (distinct items,
#     bench/distinct.lua, never repeating: the cache fills to cache.max_size and then evicts),
#     writes (PATCH, bench/patch.lua);
#   - bench/soak_clients.py: SOAK_IDLE keep-alive connections that make one request and then
#     wait for the gateway to close them (idle_timeout, 60 s) and reconnect, and SOAK_SLOW
#     clients that trickle a POST body and then stall until the gateway answers 408
#     (body_timeout, 30 s), and reconnect.
# Every SOAK_INTERVAL seconds: RSS, CPU, open fds, and the gateway's own /metrics.
#
# Environment: SOAK_DURATION (seconds, default 300), SOAK_INTERVAL (default 5), SOAK_IDLE
# (default 2000), SOAK_SLOW (default 20), SOAK_CONNECTIONS (wrk connections per stream, default
# 8), SOAK_DELAY_MS (pause between a wrk connection's requests, default 10), SOAK_CACHE_SIZE
# (cache.max_size, default 64MiB: small enough to fill early, so that the rest of the run shows
# whether memory levels off), SOAK_STREAMS (the wrk streams, default "hits misses writes"),
# SOAK_SKIP_BUILD=1 (use the release binaries as they are).
# Writes bench/results/soak.md (table and summary, also printed) and bench/results/soak.png.
# Exits non-zero if anything failed to start or the gateway died.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${SOAK_DURATION:-300}
INTERVAL=${SOAK_INTERVAL:-5}
IDLE=${SOAK_IDLE:-2000}
SLOW=${SOAK_SLOW:-20}
CONNECTIONS=${SOAK_CONNECTIONS:-8}
DELAY_MS=${SOAK_DELAY_MS:-10}
CACHE_SIZE=${SOAK_CACHE_SIZE:-64MiB}
STREAMS=${SOAK_STREAMS:-hits misses writes}

# shellcheck source=bench/lib.sh
source bench/lib.sh

for v in DURATION INTERVAL IDLE SLOW CONNECTIONS DELAY_MS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { say "SOAK_$v must be a whole number, not '${!v}'"; exit 2; }
done
((DURATION >= INTERVAL && INTERVAL >= 1 && CONNECTIONS >= 1)) || {
  say "need SOAK_DURATION >= SOAK_INTERVAL >= 1 and SOAK_CONNECTIONS >= 1"
  exit 2
}

need wrk=wrk taskset=util-linux curl=curl gnuplot=gnuplot-nox getconf=libc-bin

if [[ ${SOAK_SKIP_BUILD:-0} == 1 ]]; then
  say "SOAK_SKIP_BUILD=1: using the release binaries as they are"
else
  build release
fi
BIN=target/release
for f in "$BIN/cloudcasa-gateway" "$BIN/examples/bench_servers"; do
  [[ -x $f ]] || { say "missing $f (build it, or drop SOAK_SKIP_BUILD)"; exit 1; }
done

# Every idle connection is a descriptor here and one in the gateway (which inherits the limit).
WANT_FDS=$((IDLE + SLOW + 3 * CONNECTIONS + 1024))
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= WANT_FDS)) || { say "ulimit -n is $(ulimit -n), need $WANT_FDS"; exit 1; }

CORES=$(nproc)
SERVER_CORE=0
LOAD_CORE=$((CORES > 1 ? 1 : 0))
((CORES > 1)) || say "warning: one core only; the gateway and the load share it"

# bench/run.sh uses 18080-18086, 18090 and 19080-19084; bench/fleet.sh uses these ports too,
# so the two run one at a time (both check).
UPSTREAM=18190 GATEWAY=18180 ADMIN=18181
ports_free $UPSTREAM $GATEWAY $ADMIN

WORK=$(mktemp -d /tmp/cloudcasa-soak.XXXXXX)
PIDS=()
# stop PID [SECONDS]: TERM, up to SECONDS (default 5) for it to go, then KILL.
stop() {
  kill "$1" 2>/dev/null || return 0
  local _
  for _ in $(seq 1 $((${2:-5} * 10))); do
    kill -0 "$1" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -9 "$1" 2>/dev/null || true
}
cleanup() {
  local i
  # Newest first: load and clients before the gateway, the gateway before the upstream. The
  # gateway drains for up to server.drain_timeout (20 s).
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}" 25; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() { # NAME COMMAND...
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=($!)
  echo $! >"$WORK/$name.pid"
}
failed_to_start() { # NAME
  say "$1 failed to start; its log:"
  tail -n 20 "$WORK/$1.log" >&2 || true
  exit 1
}

echo -n "bench-token" >"$WORK/token"
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
[cache]
max_size = "$CACHE_SIZE"
[audit]
enabled = true
path = "$WORK/audit.jsonl"
EOF

say "starting the upstream and the gateway"
start upstream taskset -c "$LOAD_CORE" "$BIN/examples/bench_servers" upstream "127.0.0.1:$UPSTREAM" 1
RUST_LOG=warn start gateway taskset -c "$SERVER_CORE" "$BIN/cloudcasa-gateway" --config "$WORK/gateway.toml"
GW_PID=$(cat "$WORK/gateway.pid")
(wait_port $UPSTREAM) || failed_to_start upstream
(wait_port $GATEWAY) || failed_to_start gateway
curl -sf --max-time 5 "http://127.0.0.1:$ADMIN/readyz" >/dev/null || failed_to_start gateway
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$GATEWAY/api/v1/fresh")
[[ $code == 200 ]] || { say "GET /api/v1/fresh through the gateway: $code, not 200"; failed_to_start gateway; }

# --- sampling -------------------------------------------------------------------------------
HZ=$(getconf CLK_TCK)
SAMPLES="$WORK/samples.tsv"
printf 'elapsed_s\trss_mib\tcpu_pct\tfds\tconns_open\trefused\trequests\tr4xx\tr5xx\terrors\tcache_mib\tcache_entries\tidle_held\tslow_open\n' >"$SAMPLES"
ticks() { sed 's/.*) //' "/proc/$GW_PID/stat" | awk '{print $12 + $13}'; } # utime + stime
now() { date +%s.%N; }
scrape() { # -> conns_open refused requests r4xx r5xx errors cache_mib cache_entries (tab-separated)
  { curl -s --max-time 3 "http://127.0.0.1:$ADMIN/metrics" || true; } | awk '
    /^cloudcasa_gateway_connections_open\{listener="proxy"\}/ { open = $NF }
    /^cloudcasa_gateway_connections_refused_total\{listener="proxy"\}/ { refused = $NF }
    /^cloudcasa_gateway_requests_total\{/ {
      req += $NF
      if ($0 ~ /status_class="4xx"/) r4 += $NF
      if ($0 ~ /status_class="5xx"/) r5 += $NF
    }
    /^cloudcasa_gateway_gateway_errors_total\{/ {
      if (match($0, /kind="[^"]*"/) && $NF + 0 > 0)
        errs = errs (errs == "" ? "" : ",") substr($0, RSTART + 6, RLENGTH - 7) "=" $NF
    }
    /^cloudcasa_gateway_cache_weighted_bytes / { cache = $NF }
    /^cloudcasa_gateway_cache_entries / { entries = $NF }
    END {
      printf "%d\t%d\t%d\t%d\t%d\t%s\t%.1f\t%d\n", open, refused, req, r4, r5,
        (errs == "" ? "-" : errs), cache / 1048576, entries
    }'
}
client_counts() { # -> idle_held slow_open
  python3 - "$WORK/clients.json" <<'EOF' 2>/dev/null || printf '0\t0\n'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"{d['idle_held']}\t{d['slow_open']}")
EOF
}

# sample ELAPSED: one row of $SAMPLES, CPU over the time since the previous sample.
sample() {
  local t cur rss cpu fds line
  t=$(now)
  cur=$(ticks)
  rss=$(awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$GW_PID/status")
  cpu=$(awk -v a="$prev_ticks" -v b="$cur" -v hz="$HZ" -v t1="$prev_t" -v t2="$t" \
    'BEGIN { printf "%.1f", (t2 > t1 ? 100 * (b - a) / hz / (t2 - t1) : 0) }')
  [[ $1 == 0 ]] && cpu=0.0
  fds=$(find "/proc/$GW_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  line=$(printf '%s\t%s\t%s\t%s\t%s\t%s' "$1" "$rss" "$cpu" "$fds" "$(scrape)" "$(client_counts)")
  echo "$line" >>"$SAMPLES"
  printf '  %4ss  rss %6s MiB  cpu %5s%%  fds %5s  open %5s  requests %9s  errors %s\n' \
    "$1" "$rss" "$cpu" "$fds" "$(cut -f5 <<<"$line")" "$(cut -f7 <<<"$line")" \
    "$(cut -f10 <<<"$line")" >&2
  prev_t=$t prev_ticks=$cur
}
prev_t=$(now)
prev_ticks=$(ticks)
sample 0 # the idle gateway, before the load (its CPU column: 0)

T0=$(now)
say "soaking for ${DURATION}s: wrk ${CONNECTIONS} connections each for $STREAMS, paced ${DELAY_MS} ms, $IDLE idle, $SLOW slow clients"
wrk_stream() { # NAME PATH SCRIPT
  SOAK_SCRIPT=$3 SOAK_DELAY_MS=$DELAY_MS BENCH_ENTRIES=1000000000 \
    start "wrk-$1" timeout $((DURATION + 60)) taskset -c "$LOAD_CORE" \
    wrk -t1 "-c$CONNECTIONS" "-d${DURATION}s" --timeout 5s --latency -s bench/soak.lua \
    "http://127.0.0.1:$GATEWAY$2"
}
for stream in $STREAMS; do
  case $stream in
    hits) wrk_stream hits /api/v1/fresh "" ;;
    misses) wrk_stream misses / bench/distinct.lua ;;
    writes) wrk_stream writes /api/v1/patch bench/patch.lua ;;
    *) say "SOAK_STREAMS: unknown stream '$stream' (hits, misses, writes)"; exit 2 ;;
  esac
done
start clients taskset -c "$LOAD_CORE" python3 bench/soak_clients.py --port "$GATEWAY" \
  --idle "$IDLE" --slow "$SLOW" --duration "$DURATION" --stats "$WORK/clients.json"

GATEWAY_DIED=0
for i in $(seq 1 $((DURATION / INTERVAL))); do
  pause=$(awk -v t0="$T0" -v i="$i" -v d="$INTERVAL" -v now="$(now)" \
    'BEGIN { p = t0 + i * d - now; print (p > 0 ? p : 0) }')
  sleep "$pause"
  if ! kill -0 "$GW_PID" 2>/dev/null; then
    say "the gateway died after about $((i * INTERVAL)) s; its log:"
    tail -n 30 "$WORK/gateway.log" >&2 || true
    GATEWAY_DIED=1
    break
  fi
  sample "$(awk -v a="$T0" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }')"
done

# --- the end: wrk's own counts, the clients' statistics -------------------------------------
if ((GATEWAY_DIED == 0)); then
  for name in clients $STREAMS; do # each stops by itself; bounded anyway
    pid=$(cat "$WORK/$name.pid" 2>/dev/null || cat "$WORK/wrk-$name.pid")
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
fi
WRK_OK=1 WRK_LOGS=()
for name in $STREAMS; do
  WRK_LOGS+=("$WORK/wrk-$name.log")
  grep -q 'requests in' "$WORK/wrk-$name.log" || WRK_OK=0
done
AUDIT_MIB=$(du -m "$WORK/audit.jsonl" 2>/dev/null | cut -f1)

mkdir -p bench/results
{
  echo "# Soak: $(date -u +%Y-%m-%dT%H:%MZ), ${DURATION}s"
  echo
  echo "Gateway $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo " (uncommitted changes in src/)"), release, 1 worker thread pinned to core $SERVER_CORE; audit on (to a file); cache.max_size $CACHE_SIZE; other limits default."
  echo "Load on core $LOAD_CORE with the upstream: wrk -c$CONNECTIONS paced ${DELAY_MS} ms per stream ($STREAMS; hits: /api/v1/fresh, misses: distinct /api/v1/items/N, writes: PATCH /api/v1/patch); $IDLE idle keep-alive connections; $SLOW slow-body POSTs (1 byte / 5 s for 8 bytes, then a stall). $(nproc) cores, $(uname -sr)."
  echo
  python3 bench/soak_report.py --samples "$SAMPLES" --clients "$WORK/clients.json" \
    --wrk "${WRK_LOGS[@]}" \
    --audit-mib "${AUDIT_MIB:-0}" --plot-data "$WORK/plot.dat" \
    $( ((GATEWAY_DIED)) && echo --gateway-died)
} | tee bench/results/soak.md

if [[ -s $WORK/plot.dat ]]; then
  gnuplot <<EOF || say "gnuplot failed; no plot"
set terminal pngcairo size 1100,900 font ",10"
set output "bench/results/soak.png"
set datafile separator "\t"
set termoption noenhanced
set multiplot layout 3,1 title "cloudcasa-gateway soak, ${DURATION}s ($(date -u +%Y-%m-%d))"
set grid
set key top left opaque box
set offsets 0, 0, graph 0.25, 0
set xrange [0:*]
set lmargin 10
set rmargin 10
set ylabel "MiB"
set yrange [0:*]
plot "$WORK/plot.dat" using 1:2 with linespoints pt 7 ps 0.4 lw 2 title "gateway RSS", \
     "" using 1:11 with lines lw 1 dt 2 title "cache weighted size"
set ylabel "CPU %"
plot "$WORK/plot.dat" using 1:3 with linespoints pt 7 ps 0.4 lw 2 lc rgb "#d62728" title "gateway CPU (1 core = 100)"
set ylabel "connections / fds"
set xlabel "elapsed (s)"
plot "$WORK/plot.dat" using 1:5 with linespoints pt 7 ps 0.4 lw 2 lc rgb "#2ca02c" title "connections_open (proxy)", \
     "" using 1:4 with lines lw 1 dt 2 lc rgb "#9467bd" title "open fds"
unset multiplot
EOF
  [[ -s bench/results/soak.png ]] && say "written: bench/results/soak.md, bench/results/soak.png"
fi

((GATEWAY_DIED == 0)) || exit 1
((WRK_OK)) || { say "a wrk stream did not run to the end (see above)"; exit 1; }
exit 0
