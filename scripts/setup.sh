#!/usr/bin/env bash
# Set up Physarum on a fresh Debian/Ubuntu machine with Python 3.11: redis-server and bwrap (apt),
# a virtualenv with torch==2.13.0 (CPU) installed FIRST, then the project with its extras.
# Idempotent: a second run only re-installs when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing redis-server with apt-get"
    apt-get update -qq >/dev/null && apt-get install -y -qq redis-server redis-tools >/dev/null
  else
    echo "setup: redis-server is missing. Install it with:" >&2
    echo "  sudo apt-get install -y redis-server redis-tools" >&2
    exit 1
  fi
fi

# bubblewrap: the isolation of the code sandbox (rewards/sandbox.py); without it the `code`
# reward and the python env refuse to start unless their args say allow_weak: true.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing bubblewrap with apt-get"
    apt-get update -qq >/dev/null && apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "setup: bwrap (bubblewrap) is missing. Install it with:" >&2
    echo "  sudo apt-get install -y bubblewrap" >&2
    exit 1
  fi
fi

stamp="$VENV/.physarum-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q -U pip
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU) first"
  "${pip[@]}" install -q torch==2.13.0
fi
echo "setup: installing physarum and its dependencies"
"${pip[@]}" install -q -c constraints.txt -e ".[dev,megatron,sglang,envs]"
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
touch "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
