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

# chromium + chromedriver: the dashboard's browser test (tests/physarum/test_dashboard_browser.py),
# which skips without them. Not needed to run jobs, so a missing one is only a warning.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing chromium and chromium-driver with apt-get (the dashboard's browser test)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
      chromium-driver; } >/dev/null 2>&1 || echo "setup: chromium did not install; the browser test will skip" >&2
  else
    echo "setup: chromium is missing (the dashboard's browser test skips); install it with:" >&2
    echo "  sudo apt-get install -y chromium chromium-driver" >&2
  fi
fi

# a C compiler: the CPU decode kernels (models/*_kernels.c, built on first use by
# models/native_build.py). Without one the engine runs its torch ops, ~1.5x slower per token.
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing gcc with apt-get (the engine's CPU decode kernels)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev; } \
      >/dev/null 2>&1 || echo "setup: gcc did not install; the engine will use its torch ops" >&2
  else
    echo "setup: no C compiler; the engine runs its slower torch ops. Install one with:" >&2
    echo "  sudo apt-get install -y gcc" >&2
  fi
fi

stamp="$VENV/.physarum-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0  # up to date: quiet
fi
started=$SECONDS
log="$VENV/setup.log"  # pip's full output; the console gets a summary, or the errors
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
: >"$log"
echo "setup: installing physarum and its extras into $VENV (torch==2.13.0 CPU first; pip's log: $log)"

# Quiet pip: its output goes to the log. A failure prints pip's errors and the end of the log;
# on success only pip's ERROR lines (e.g. a dependency conflict) reach the console, never its
# harmless warnings (deprecations, scripts not on PATH, a newer pip, retries).
pip_install() {
  local out
  out=$(mktemp)
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check install -q "$@" >"$out" 2>&1; then
    cat "$out" >>"$log"
    echo "setup: pip install $* failed:" >&2
    grep -E "^ERROR|[Ee]rror:" "$out" | tail -n 20 >&2 || true
    echo "setup: the last lines of pip's output (all of it in $log):" >&2
    tail -n 15 "$out" >&2
    rm -f "$out"
    exit 1
  fi
  grep -E "^ERROR" "$out" >&2 || true
  cat "$out" >>"$log"
  rm -f "$out"
}

pip_install -U pip
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  pip_install torch==2.13.0
fi
pip_install -c constraints.txt -e ".[dev,megatron,sglang,envs]"
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
case "$torch_version" in
  2.13.0*) ;;
  *) echo "setup: torch $torch_version is installed in $VENV, not 2.13.0" >&2; exit 1 ;;
esac
touch "$stamp"
elapsed=$((SECONDS - started))
packages=$("$VENV/bin/python" -m pip --disable-pip-version-check list 2>/dev/null | tail -n +3 | wc -l)
echo "setup: done in $((elapsed / 60))m$(printf %02d $((elapsed % 60)))s (torch $torch_version, $packages packages in $VENV)"
