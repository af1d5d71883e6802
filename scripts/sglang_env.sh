#!/usr/bin/env bash
# Build the separate SGLang 0.5.23 environment (recipe 2 of reference/sglang_api.md).
#
# SGLang pins its own torch (2.14.1) and transformers (5.19.0), so it cannot live in the main
# .venv (torch 2.13.0). Physarum talks to it over HTTP and torch.distributed (gloo) only.
#
# Usage: scripts/sglang_env.sh [VENV_DIR]       (default: <repo>/.venv-sglang)
# Env:   PYTHON (interpreter used to create the venv, default python3)
# Idempotent: a venv whose sglang, torch and transformers already match is left untouched.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-sglang}"
PYTHON="${PYTHON:-python3}"
REQS="$REPO/rollout/sglang/requirements.txt"
SGLANG_VERSION="0.5.23"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
TRANSFORMERS_VERSION="5.19.0"

step() { printf '[sglang-env %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[sglang-env] ERROR: %s\n' "$*" >&2; exit 1; }

[ -f "$REQS" ] || die "runtime requirements file missing: $REQS"
command -v "$PYTHON" >/dev/null || die "interpreter '$PYTHON' not found (set PYTHON=...)"

installed_ok() {
    "$VENV/bin/python" - "$SGLANG_VERSION" "$TORCH_VERSION" "$TRANSFORMERS_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
want = dict(zip(("sglang", "torch", "transformers"), sys.argv[1:]))
bad = {k: version(k) for k in want if not version(k).startswith(want[k])}
sys.exit(1 if bad else 0)
EOF
}

if [ -x "$VENV/bin/python" ] && installed_ok; then
    step "already built: $VENV (sglang $SGLANG_VERSION, torch $TORCH_VERSION); nothing to do"
    exit 0
fi

START=$(date +%s)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" >"$CONSTRAINTS"

if [ ! -x "$VENV/bin/python" ]; then
    step "creating venv $VENV with $("$PYTHON" --version 2>&1)"
    "$PYTHON" -m venv "$VENV" || die "python -m venv $VENV failed"
fi
PIP=("$VENV/bin/python" -m pip install --progress-bar off)

step "1/4 upgrading pip"
"${PIP[@]}" -q -U pip || die "pip upgrade failed"

step "2/4 torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION (large: CUDA build + nvidia-*)"
"${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
    || die "torch $TORCH_VERSION install failed (is the wheel reachable from pip's index?)"

step "3/4 sglang runtime requirements ($REQS) pinned to torch $TORCH_VERSION"
"${PIP[@]}" -c "$CONSTRAINTS" -r "$REQS" || die "runtime requirements install failed"

step "4/4 sglang==$SGLANG_VERSION (--no-deps: its GPU-only deps are skipped on purpose)"
"${PIP[@]}" -c "$CONSTRAINTS" --no-deps "sglang==$SGLANG_VERSION" || die "sglang install failed"

step "checking: import sglang.srt.entrypoints.http_server"
"$VENV/bin/python" -c "import sglang, torch, transformers
import sglang.srt.entrypoints.http_server  # noqa: the server module must import on the CPU
print('sglang', sglang.__version__, 'torch', torch.__version__,
      'transformers', transformers.__version__)" || die "sglang does not import in $VENV"
installed_ok || die "version check failed in $VENV (expected sglang $SGLANG_VERSION," \
    "torch $TORCH_VERSION, transformers $TRANSFORMERS_VERSION)"

step "done in $(( $(date +%s) - START )) s; size $(du -sh "$VENV" | cut -f1)"
