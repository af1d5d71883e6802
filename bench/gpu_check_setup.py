"""gpu_check's preflight: what the machine must have, and pip-installing the small
pure-python dependencies of our library that it lacks. Standard library only until torch
is known to be there."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

# module -> pip requirement: our library's small dependencies (what models/, configs/,
# buffer.episode, trainer/ and rollout/embedded import besides torch)
REQUIRED = {
    "pydantic": "pydantic>=2.6",
    "yaml": "pyyaml>=6",
    "safetensors": "safetensors>=0.4",
    "numpy": "numpy>=1.26",
}
OPTIONAL = {"accelerate": "accelerate"}  # transformers loads FP8 checkpoints only with it


class CheckError(RuntimeError):
    """The machine lacks something the check needs (the message says what and how to fix)."""


# ---- preflight (stdlib only until torch is known to be there) --------------------------------


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _pip_install(requirements: list[str]) -> None:
    print(f"gpu_check: pip-installing missing small dependencies: {' '.join(requirements)}")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*cmd, *requirements], check=True)
    importlib.invalidate_caches()


def preflight(device: str, *, install: bool, want_fp8_hf: bool = True) -> dict[str, str]:
    """Check Python, torch (+ CUDA unless device is cpu), transformers and our small deps;
    install the missing small ones when `install`. Returns versions for the report."""
    if sys.version_info < (3, 10):  # noqa: UP036  (a GPU machine's python may be older)
        raise CheckError(f"Python >= 3.10 needed, this is {sys.version.split()[0]}")
    if not _have("torch"):
        raise CheckError("torch is not installed: install a CUDA build of torch first")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CheckError(
            f"--device cuda: torch {torch.__version__} sees no GPU (torch.version.cuda="
            f"{torch.version.cuda}); run with --device cpu to check the CPU path"
        )
    if not _have("transformers"):
        raise CheckError("transformers is not installed (pip install 'transformers>=4.57')")
    import transformers

    if not hasattr(transformers, "Glm4MoeForCausalLM"):
        raise CheckError(
            f"transformers {transformers.__version__} has no Glm4MoeForCausalLM (need >= 4.57)"
        )
    missing = [req for mod, req in REQUIRED.items() if not _have(mod)]
    if missing:
        if not install:
            raise CheckError(f"missing dependencies {missing} (run without --no-install)")
        _pip_install(missing)
    if want_fp8_hf and device == "cuda":
        optional = [req for mod, req in OPTIONAL.items() if not _have(mod)]
        if optional and install:
            try:
                _pip_install(optional)
            except subprocess.CalledProcessError as err:
                print(f"gpu_check: could not install {optional} ({err}); HF's FP8 row is n/a")
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
    }
