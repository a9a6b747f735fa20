# Shared by bench/run.sh and bench/instructions.sh (sourced, not run).

say() { printf '==> %s\n' "$*" >&2; }

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
