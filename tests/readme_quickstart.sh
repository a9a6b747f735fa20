#!/usr/bin/env bash
# Runs the README's shell blocks marked `<!-- readme-run: NAME -->` as written, with bash, against
# the real binaries (cargo run), and checks what they print. Run by .ci/run from the checkout's
# root after `cargo build --locked --all-targets`; needs the ports the README names (8080, 8090,
# 9901) free. Every wait is bounded; everything started here is stopped on exit.
#
#   demo          `cargo run --example demo` until it prints its commands; two of them are run
#   terminal-1/2  in the background: the mock CloudCasa, then the gateway
#   terminal-3    in the foreground; its output must show 200, 428, 200 and ready, and the
#                 rotated token must be in use within a few seconds
#   overlay       the shared gateway's overlay, made outside the checkout (HOME is a scratch
#                 directory); no tracked file may change, and it must render with the Secrets'
#                 new content (when kubectl is present)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

scratch=$(mktemp -d)
pgids=()
cleanup() {
  # Each background block runs in its own session (setsid), so its process group holds cargo
  # and what cargo started; only those groups are signalled.
  for pgid in "${pgids[@]}"; do
    kill -TERM -- "-$pgid" 2>/dev/null || true
  done
  for pgid in "${pgids[@]}"; do
    for _ in $(seq 50); do
      kill -0 -- "-$pgid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  done
  rm -rf "$scratch"
}
trap cleanup EXIT

fail() {
  echo "README quickstart: $*" >&2
  for log in "$scratch"/*.log; do
    [ -e "$log" ] && { echo "--- $log" >&2; tail -n 40 "$log" >&2; }
  done
  exit 1
}

# The body of the shell block that follows `<!-- readme-run: $1 -->` in README.md.
block() {
  local text
  text=$(awk -v name="$1" '
    $0 == "<!-- readme-run: " name " -->" { found = 1; next }
    found && /^```sh$/ { inside = 1; next }
    inside && /^```$/ { exit }
    inside { print }
  ' README.md)
  [ -n "$text" ] || fail "no block marked readme-run: $1 in README.md"
  printf '%s\n' "$text"
}

# Waits up to $2 seconds for the command $1 (a string for bash) to succeed.
wait_for() {
  local what=$1 seconds=$2
  for _ in $(seq $((seconds * 10))); do
    if bash -c "$what" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  fail "timed out after ${seconds}s waiting for: $what"
}

# Starts a block in the background, in its own session; its output goes to $scratch/NAME.log.
start() {
  local name=$1
  block "$name" >"$scratch/$name.sh"
  setsid bash "$scratch/$name.sh" >"$scratch/$name.log" 2>&1 &
  pgids+=("$!")
}

# Stops the most recently started block and waits (bounded) for its group to be gone.
stop_last() {
  local pgid=${pgids[-1]}
  kill -TERM -- "-$pgid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 -- "-$pgid" 2>/dev/null || { unset 'pgids[-1]'; return 0; }
    sleep 0.1
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
  unset 'pgids[-1]'
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 8080 8090 9901; do
  port_free "$port" || fail "port $port is in use: the README's commands need it"
done

# --- the demo: started as written; the first two curl commands it prints are run as printed ---
start demo
# cargo run may still have to build the example: bounded, but generously.
wait_for "grep -q '^curl -i http://127.0.0.1:8080/api/v1/usergroups/' '$scratch/demo.log'" 300
mapfile -t printed < <(grep '^curl -i http://127.0.0.1:8080/api/v1/usergroups' "$scratch/demo.log" | head -n 2)
[ "${#printed[@]}" -eq 2 ] || fail "the demo printed no curl commands"
for command in "${printed[@]}"; do
  out=$(bash -c "$command")
  grep -q '^HTTP/1.1 200' <<<"$out" || fail "the demo's '$command' answered: $out"
  echo "ok: demo: $command"
done
stop_last
for port in 8080 8090 9901; do wait_for "! (exec 3<>/dev/tcp/127.0.0.1/$port)" 30; done

# --- terminals 1 and 2 in the background, terminal 3 in the foreground ---
start terminal-1
wait_for "(exec 3<>/dev/tcp/127.0.0.1/8090)" 300
start terminal-2
wait_for "curl -sf http://127.0.0.1:9901/readyz" 300
block terminal-3 >"$scratch/terminal-3.sh"
out=$(bash -e -o pipefail "$scratch/terminal-3.sh" 2>"$scratch/terminal-3.log") \
  || fail "terminal 3 failed: $out"
# JSON bodies end without a newline, so a status line can follow one on the same line.
statuses=$(grep -o 'HTTP/1\.1 [0-9][0-9][0-9]' <<<"$out" | awk '{print $2}' | tr '\n' ' ')
[ "$statuses" = "200 200 428 200 " ] || fail "terminal 3's statuses: '$statuses'; output: $out"
grep -q 'ready$' <<<"$out" || fail "no readiness in: $out"
echo "ok: terminal 3: statuses $statuses and ready"
# The rotation: tenant b has no usergroups, so the list turns empty once token-b is in use.
wait_for "curl -s http://127.0.0.1:8080/api/v1/usergroups | python3 -c 'import json, sys; sys.exit(len(json.load(sys.stdin)[\"_items\"]))'" 10
echo "ok: the rotated token is in use"
stop_last
stop_last
rm -f /tmp/cloudcasa-token

# --- the shared gateway's overlay, outside the checkout ---
before=$(git status --porcelain)
home="$scratch/home"
mkdir -p "$home"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=cloudcasa-gateway \
  -keyout "$scratch/tls.key" -out "$scratch/tls.crt" 2>/dev/null
token="readme-test-token-$RANDOM"
block overlay >"$scratch/overlay.sh"
HOME="$home" PATH="$repo/target/debug:$PATH" CLOUDCASA_API_TOKEN="$token" \
  TLS_CRT="$scratch/tls.crt" TLS_KEY="$scratch/tls.key" CLIENT_CA="$scratch/tls.crt" \
  GATEWAY_CA="$scratch/tls.crt" bash -e -o pipefail "$scratch/overlay.sh" >"$scratch/overlay.log" 2>&1 \
  || fail "the overlay block failed"
after=$(git status --porcelain)
[ "$before" = "$after" ] || fail "the overlay block changed the checkout: $(diff <(echo "$before") <(echo "$after"))"
overlay="$home/cloudcasa-gateway-overlay"
grep -q '^backup-bot = "sha256:' "$overlay/api-keys.toml" || fail "no hashed key in $overlay/api-keys.toml"
echo "ok: the overlay block wrote $overlay and changed no tracked file"
if command -v kubectl >/dev/null 2>&1; then
  rendered=$(kubectl kustomize "$overlay") || fail "kubectl kustomize $overlay failed"
  # kustomize folds long base64 values into `key: |` blocks: compare without whitespace.
  flat=$(tr -d ' \n' <<<"$rendered")
  has() { grep -qF -e "$1:$2" -e "$1:|$2" <<<"$flat"; }
  has token "$(printf '%s' "$token" | base64 -w0)" \
    || fail "the rendered overlay does not carry the new token"
  has tls.crt "$(base64 -w0 <"$scratch/tls.crt")" \
    || fail "the rendered overlay does not carry the new certificate"
  echo "ok: the overlay renders with the new token and certificate"
else
  echo "note: kubectl not found; the overlay was not rendered"
fi
echo "README quickstart: all blocks ran as written"
