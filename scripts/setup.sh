#!/usr/bin/env bash
# Set up jkv's environment in .venv: find a Python 3.12, create the venv, install the pinned packages.
# Idempotent and quick on a second run (it reinstalls only when pyproject.toml changed).
# Environment: PYTHON=/path/to/python3.12 picks the interpreter; JKV_EXTRAS=test,cuda12 picks extras.
set -euo pipefail
cd "$(dirname "$0")/.."

is_py312() { [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1
  "$1" -c 'import sys, venv; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 python3 python \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
           /root/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12 \
           /opt/homebrew/bin/python3.12 "$HOME"/.local/share/uv/python/cpython-3.12*/bin/python3.12; do
    [ -n "$c" ] && is_py312 "$c" && { command -v "$c" 2>/dev/null || echo "$c"; return 0; }
  done
  return 1
}

venv=.venv
if ! is_py312 "$venv/bin/python"; then
  if ! py=$(find_python); then
    echo "jkv needs Python 3.12 and found none: install it (pyenv install 3.12, apt-get install python3.12," \
         "brew install python@3.12 or uv python install 3.12), or point PYTHON=/path/to/python3.12 at one." >&2
    exit 1
  fi
  echo "setup: creating $venv with $py" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi

extras="${JKV_EXTRAS:-test}"
stamp="$venv/.jkv-installed"
want="$(cat pyproject.toml | cksum) extras=$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing jkv[$extras] and its pinned dependencies into $venv (a few minutes the first time)" >&2
  log="$venv/pip-install.log"
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check -e ".[$extras]" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "setup: pip could not install jkv's dependencies (full log: $log); check the network or the pins." >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
