#!/usr/bin/env bash
# What the audit trail costs in CPU time: the gateway with its audit file against the gateway
# without it, fresh 1 KiB hits, each on core 0 with one worker thread (as in bench/run.sh's (g)).
# Beside req/s it prints the CPU time per request (the process's utime + stime from
# /proc/PID/stat, divided by the requests wrk counted) and the audit writer thread's time per
# record (/proc/PID/task/TID/stat). CPU time per request moves less than req/s on a shared VM,
# and the writer's share tells the cost that is not on the request's thread.
#
#   bench/audit-cpu.sh           six rounds of 10 s, release build
#   bench/audit-cpu.sh --smoke   one round of 1 s, debug build: checks the script works
#
# Environment: AUDIT_CPU_ROUNDS (default 6), AUDIT_CPU_DURATION (seconds, default 10),
# AUDIT_CPU_DIR (where the audit file goes, default a new directory under /tmp),
# AUDIT_CPU_KEEP=1 keeps one growing audit file instead of rotating it before each round
# (bench/run.sh rotates too; see the comment above its rotate()).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh

ROUNDS=${AUDIT_CPU_ROUNDS:-6}
DURATION=${AUDIT_CPU_DURATION:-10}
KEEP=${AUDIT_CPU_KEEP:-0}
PROFILE=release
if [[ ${1:-} == --smoke ]]; then
  ROUNDS=1 DURATION=1 PROFILE=debug
fi
need wrk=wrk taskset=util-linux
build "$PROFILE"
BIN=target/$PROFILE
LOAD_CORE=$(($(nproc) > 1 ? 1 : 0))

WORK=$(mktemp -d /tmp/cloudcasa-audit-cpu.XXXXXX)
AUDIT_DIR=${AUDIT_CPU_DIR:-$WORK/audit}
mkdir -p "$AUDIT_DIR"
PIDS=()
cleanup() {
  stop_started
  rm -rf "$WORK"
  rm -f "$AUDIT_DIR"/audit-cpu-*.jsonl
}
trap cleanup EXIT

# Ports of their own: bench/run.sh uses 18080-18090, bench/fleet.sh and bench/soak.sh 18180-18190.
UPSTREAM=18290 OFF=18280 ON=18282 OFF_ADMIN=19280 ON_ADMIN=19282
ports_free $UPSTREAM $OFF $ON $OFF_ADMIN $ON_ADMIN
AUDIT_FILE=$AUDIT_DIR/audit-cpu-$ON.jsonl
rm -f "$AUDIT_FILE"
echo -n "bench-token" >"$WORK/token"
config() { # PORT ADMIN_PORT AUDIT(true|false)
  gateway_toml "$1" "$2" "$UPSTREAM" "$WORK/token" "$3" "$AUDIT_DIR/audit-cpu-$1.jsonl" 512MiB
}
config $OFF $OFF_ADMIN false >"$WORK/off.toml"
config $ON $ON_ADMIN true >"$WORK/on.toml"
taskset -c "$LOAD_CORE" "$BIN/examples/bench_servers" upstream "127.0.0.1:$UPSTREAM" 1 >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
RUST_LOG=warn taskset -c 0 "$BIN/cloudcasa-gateway" --config "$WORK/off.toml" >"$WORK/off.log" 2>&1 &
PIDS+=($!)
OFF_PID=$!
RUST_LOG=warn taskset -c 0 "$BIN/cloudcasa-gateway" --config "$WORK/on.toml" >"$WORK/on.log" 2>&1 &
PIDS+=($!)
ON_PID=$!
for p in $UPSTREAM $OFF $ON; do wait_port $p; done
kill -0 $OFF_PID $ON_PID

URL_PATH=/api/v1/fresh
wrk_run() { taskset -c "$LOAD_CORE" wrk -t1 -c64 "-d${1}s" "http://127.0.0.1:$2$URL_PATH"; }
for p in $OFF $ON; do wrk_run 3 $p >/dev/null; done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
writer_ticks() { # PID: the audit writer thread's ticks, 0 when it has none
  local t
  for t in /proc/"$1"/task/*; do
    if [[ $(cat "$t/comm") == audit-writer ]]; then
      awk '{print $14 + $15}' "$t/stat"
      return
    fi
  done
  echo 0
}
measure() { # PORT PID -> "req/s requests cpu_ticks writer_ticks"
  local c0 w0 out rps requests
  c0=$(ticks "$2")
  w0=$(writer_ticks "$2")
  out=$(wrk_run "$DURATION" "$1")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  if [[ -z $rps || ${requests:-0} -eq 0 ]] || grep -qE 'Non-2xx|Socket errors' <<<"$out" \
    || ! kill -0 "$2" 2>/dev/null; then
    say "the measurement on port $1 failed:"
    echo "$out" >&2
    exit 1
  fi
  echo "$rps $requests $(($(ticks "$2") - c0)) $(($(writer_ticks "$2") - w0))"
}

: >"$WORK/rounds"
say "$ROUNDS rounds of ${DURATION}s, audit off and on in alternation (the order reversed every other round)"
for round in $(seq 1 "$ROUNDS"); do
  ((KEEP)) || reopen_log "$AUDIT_FILE" "$ON_PID" HUP
  if ((round % 2)); then
    off=$(measure $OFF $OFF_PID)
    on=$(measure $ON $ON_PID)
  else
    on=$(measure $ON $ON_PID)
    off=$(measure $OFF $OFF_PID)
  fi
  echo "$round $off $on $(stat -c %s "$AUDIT_FILE")" >>"$WORK/rounds"
done
python3 - "$WORK/rounds" <<'EOF'
import os, statistics, sys
tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
print("| round | off req/s | off CPU µs/req | on req/s | on CPU µs/req | writer µs/record | on/off req/s | off/on CPU | audit file MiB |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
rps, cpu = [], []
for line in open(sys.argv[1]):
    r, orps, on_n, ocpu, _, arps, an, acpu, awr, size = line.split()
    orps, arps = float(orps), float(arps)
    if int(acpu) == 0 or int(ocpu) == 0:
        sys.exit(f"round {r}: no CPU time counted for a gateway (clock ticks too coarse for the duration?)")
    ocpu_us, acpu_us = int(ocpu) * tick_us / int(on_n), int(acpu) * tick_us / int(an)
    wr_us = int(awr) * tick_us / int(an)
    rps.append(arps / orps); cpu.append(ocpu_us / acpu_us)
    print(f"| {r} | {orps:,.0f} | {ocpu_us:.2f} | {arps:,.0f} | {acpu_us:.2f} | {wr_us:.2f} | {arps/orps:.2f} | {ocpu_us/acpu_us:.2f} | {int(size) >> 20} |")
if rps:
    print(f"\nmedian of the rounds: on/off req/s {statistics.median(rps):.2f}, off/on CPU per request {statistics.median(cpu):.2f}")
EOF
