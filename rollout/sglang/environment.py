"""Find and check the separate SGLang environment (the interpreter that runs SGLang servers).

SGLang 0.5.23 pins torch 2.14.1 and transformers 5.19.0, so it lives in its own venv
(`scripts/sglang_env.sh` builds `<repo>/.venv-sglang`). The main environment never imports
sglang: it launches that interpreter as a subprocess and talks to it over HTTP and
torch.distributed. This module only resolves the interpreter and reads the installed versions
(from package metadata, so a probe takes well under a second instead of importing sglang).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-sglang"
SGLANG_VERSION = "0.5.23"  # the API this package is written against (sglang_api.md)

_PROBE = """
import json, sys
from importlib.metadata import PackageNotFoundError, version
out = {"python": sys.version.split()[0]}
for name in ("sglang", "torch", "transformers"):
    try:
        out[name] = version(name)
    except PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""


class SGLangEnvironmentError(RuntimeError):
    """The SGLang interpreter is missing or unusable; the message says how to fix it."""


@dataclass(frozen=True)
class SGLangEnvironment:
    """A checked SGLang interpreter and the versions installed beside it."""

    python: Path
    sglang: str
    torch: str
    transformers: str

    def describe(self) -> str:
        return (
            f"{self.python} (sglang {self.sglang}, torch {self.torch}, "
            f"transformers {self.transformers})"
        )


def default_python() -> Path | None:
    """`<repo>/.venv-sglang/bin/python` when it exists, else None."""
    candidate = DEFAULT_VENV / "bin" / "python"
    return candidate if candidate.exists() else None


def resolve_python(configured: str | Path | None) -> Path:
    """The interpreter named by `rollout.sglang.python`, or the default venv's when null."""
    if configured is not None:
        path = Path(configured).expanduser()
        if not path.exists():
            raise SGLangEnvironmentError(
                f"rollout.sglang.python: {str(path)!r} does not exist; build the environment "
                f"with `make sglang-env` or point this field at an interpreter with sglang"
            )
        return path
    found = default_python()
    if found is None:
        raise SGLangEnvironmentError(
            f"rollout.sglang.python is null and {DEFAULT_VENV}/bin/python does not exist; "
            f"run `make sglang-env` (scripts/sglang_env.sh) to build it"
        )
    return found


def probe(configured: str | Path | None = None, *, timeout: float = 60.0) -> SGLangEnvironment:
    """Resolve the interpreter and read its sglang/torch/transformers versions.

    Raises SGLangEnvironmentError when the interpreter cannot run or sglang is not installed.
    A sglang version other than 0.5.23 is accepted but logged by callers as untested.
    """
    python = resolve_python(configured)
    try:
        done = subprocess.run(
            [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SGLangEnvironmentError(f"{python}: cannot run the interpreter: {err}") from err
    if done.returncode != 0:
        raise SGLangEnvironmentError(
            f"{python}: version probe failed (exit {done.returncode}): {done.stderr.strip()}"
        )
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    missing = [name for name in ("sglang", "torch", "transformers") if not versions.get(name)]
    if missing:
        raise SGLangEnvironmentError(
            f"{python}: {', '.join(missing)} not installed; run `make sglang-env`"
        )
    return SGLangEnvironment(
        python=python,
        sglang=versions["sglang"],
        torch=versions["torch"],
        transformers=versions["transformers"],
    )


def find(configured: str | Path | None = None) -> tuple[SGLangEnvironment | None, str]:
    """(environment, "") when usable, else (None, the reason): for tests that must skip."""
    try:
        env = probe(configured)
    except SGLangEnvironmentError as err:
        return None, str(err)
    return env, ""
