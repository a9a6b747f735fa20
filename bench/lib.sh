# Shared by the benchmark scripts (sourced, not run).

say() { printf '==> %s\n' "$*" >&2; }

# listening PORT: whether something accepts connections on 127.0.0.1:PORT.
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT [SECONDS]: until something listens on 127.0.0.1:PORT (default 10 s).
wait_port() {
  local tries=$((${2:-10} * 20))
  for _ in $(seq 1 "$tries"); do
    listening "$1" && return 0
    sleep 0.05
  done
  say "nothing listening on $1"
  exit 1
}

# need COMMAND=PACKAGE...: installs from Debian's packages the packages whose command is missing.
need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%=*}" >/dev/null || missing+=("${pair#*=}")
  done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]} from Debian's packages"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# build PROFILE(release|debug): the gateway and the benchmark's servers.
build() {
  say "building ($1)"
  local flags=(--locked --bin cloudcasa-gateway --example bench_servers)
  [[ $1 == release ]] && flags+=(--release)
  cargo build "${flags[@]}" >&2
}

# ports_free PORT...: exits when one of them is in use (another run of a script still going).
ports_free() {
  local p
  for p in "$@"; do
    if listening "$p"; then
      say "port $p is in use (another run still going?)"
      exit 1
    fi
  done
}

# stop_started: kills the processes in PIDS and waits for them (a script's EXIT trap).
stop_started() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}

# reopen_log FILE PID SIGNAL: removes a server's log file, as logrotate would, signals the server
# to reopen it (the gateway: HUP, nginx: USR1), and waits until the new file exists and neither
# the process nor its children (nginx's worker reopens after its master) hold the removed one.
reopen_log() {
  rm -f "$1"
  kill "-$3" "$2"
  for _ in $(seq 1 100); do
    [[ -e $1 ]] && ! holds_removed "$2" "$1" && return 0
    sleep 0.05
  done
  say "$1 was not reopened within 5 s"
  exit 1
}
holds_removed() { # PID FILE
  local p fd
  for p in "$1" $(pgrep -P "$1" || true); do
    for fd in /proc/"$p"/fd/*; do
      [[ $(readlink "$fd" 2>/dev/null) == "$2 (deleted)" ]] && return 0
    done
  done
  return 1
}

# gateway_toml PORT ADMIN_PORT UPSTREAM_PORT TOKEN_FILE AUDIT(true|false) AUDIT_PATH CACHE_SIZE:
# a benchmark gateway's configuration (one worker thread). [cache] comes last, so that a caller
# can append more of its keys.
gateway_toml() {
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
worker_threads = 1
[admin]
listen = "127.0.0.1:$2"
[upstream]
url = "http://127.0.0.1:$3"
[token]
file = "$4"
[audit]
enabled = $5
path = "$6"
[cache]
max_size = "$7"
EOF
}
