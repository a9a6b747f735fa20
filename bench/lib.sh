# Shared by the benchmark scripts (sourced, not run).

say() { printf '==> %s\n' "$*" >&2; }

# wait_port PORT [SECONDS]: until something listens on 127.0.0.1:PORT (default 10 s).
wait_port() {
  local tries=$((${2:-10} * 20))
  for _ in $(seq 1 "$tries"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
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
