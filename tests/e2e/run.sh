#!/usr/bin/env bash
# End-to-end suite: the real gateway binary in front of the real Eve 0.7.10 framework.
#
#   bash tests/e2e/run.sh [GATEWAY_BIN]      (from anywhere; paths are relative to the repo root)
#
# GATEWAY_BIN defaults to $GATEWAY_BIN, else target/debug/cloudcasa-gateway (it is not built here).
# The Eve app is $EVE_APP, else ../shared/eve/eve_app.py beside the clone. Needs Python 3.9
# (pyenv's, or python3.9 on PATH) and PyPI for the first run; the venv is target/eve-venv, reused
# while its pins are unchanged. Extra arguments after GATEWAY_BIN go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

die() { printf 'tests/e2e/run.sh: %s\n' "$*" >&2; exit 1; }

GATEWAY_BIN=${1:-${GATEWAY_BIN:-target/debug/cloudcasa-gateway}}
[ $# -gt 0 ] && shift
case "$GATEWAY_BIN" in /*) ;; *) GATEWAY_BIN="$ROOT/$GATEWAY_BIN" ;; esac
[ -x "$GATEWAY_BIN" ] || die "the gateway binary $GATEWAY_BIN does not exist or is not executable (build it first: cargo build --locked)"

EVE_APP=${EVE_APP:-$ROOT/../shared/eve/eve_app.py}
case "$EVE_APP" in /*) ;; *) EVE_APP="$ROOT/$EVE_APP" ;; esac
[ -f "$EVE_APP" ] || die "the Eve app $EVE_APP does not exist (set EVE_APP, or put shared/eve/ beside the clone)"

# Python 3.9: Eve 0.7.10 pins Cerberus 0.9.2, which imports collections.Iterable (gone in 3.10).
is_py39() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' >/dev/null 2>&1; }
PY39=""
candidates=()
if command -v pyenv >/dev/null 2>&1; then
  pyenv_root=$(pyenv root 2>/dev/null || true)
  [ -n "$pyenv_root" ] && candidates+=("$pyenv_root"/versions/3.9.*/bin/python)
fi
candidates+=("${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9.*/bin/python)
if command -v python3.9 >/dev/null 2>&1; then candidates+=("$(command -v python3.9)"); fi
for candidate in "${candidates[@]}"; do
  if [ -x "$candidate" ] && is_py39 "$candidate"; then PY39=$candidate; fi
  [ -n "$PY39" ] && break
done
if [ -z "$PY39" ]; then
  die "the Eve end-to-end suite needs Python 3.9 (Eve 0.7.10 / Cerberus 0.9.2 import collections.Iterable, removed in Python 3.10); none found under \$(pyenv root)/versions/3.9.* nor as python3.9 on PATH. Install one, e.g. 'pyenv install 3.9'."
fi

# The venv, reused while it is a 3.9 venv holding exactly these pins.
PINS=("eve==0.7.10" "Eve-SQLAlchemy==0.7.1" "Flask-SQLAlchemy==2.5.1" "SQLAlchemy==1.3.24"
      "pymongo<4" "pytest==8.3.5")
VENV=$ROOT/target/eve-venv
STAMP=$VENV/.e2e-pins
want="$PY39 ${PINS[*]}"
if [ ! -x "$VENV/bin/python" ] || ! is_py39 "$VENV/bin/python" \
   || [ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]; then
  printf 'tests/e2e/run.sh: creating %s with %s\n' "$VENV" "$PY39"
  rm -rf "$VENV"
  mkdir -p "$ROOT/target"
  "$PY39" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
  printf '%s\n' "$want" > "$STAMP"
fi

export GATEWAY_BIN EVE_APP PYTHONDONTWRITEBYTECODE=1
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$ROOT/tests/e2e" "$@" || status=$?
if [ "$status" -eq 5 ]; then
  die "pytest collected no tests (exit 5): the suite is missing or broken"
fi
exit "$status"
