"""models/native_build.py: a C source built once into the cache and loaded; None (the torch
path) without a compiler or with a missing symbol."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest

from models import native_build

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler here"
)


def _source(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tiny_kernels.c"
    path.write_text(body)
    return path


@needs_cc
def test_builds_once_into_the_cache_and_calls(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PHYSARUM_CACHE", str(tmp_path / "cache"))
    src = _source(
        tmp_path, "void add_one(float *x, long n) { for (long i = 0; i < n; i++) x[i] += 1; }\n"
    )
    lib = native_build.load(src, {"add_one": [ctypes.c_void_p, ctypes.c_long]})
    assert lib is not None
    built = list((tmp_path / "cache").iterdir())
    assert [p.name for p in built] == [native_build.library_path(src).name]  # no temp left
    values = (ctypes.c_float * 3)(1.0, 2.0, 3.0)
    lib.add_one(ctypes.addressof(values), 3)
    assert list(values) == [2.0, 3.0, 4.0]
    src.write_text(src.read_text() + "\n")  # another source: another build, by name
    assert native_build.library_path(src) != built[0]


@needs_cc
def test_a_missing_symbol_means_none(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PHYSARUM_CACHE", str(tmp_path / "cache"))
    src = _source(tmp_path, "void present(void) {}\n")
    assert native_build.load(src, {"absent": []}) is None


def test_no_compiler_means_none(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PHYSARUM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    src = _source(tmp_path, "void f(void) {}\n")
    assert native_build.load(src, {"f": []}) is None
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
