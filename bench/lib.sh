# Shared by bench/run.sh and bench/instructions.sh (sourced, not run).

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
