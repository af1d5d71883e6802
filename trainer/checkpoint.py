"""Save and restore the trainer's whole state: weights, optimizers, schedulers, RNG, counters.

Layout of a checkpoint directory:
  trainer_state.pt     (rank 0) modules' state_dicts (actor, critic, reference), optimizers,
                       schedulers, `version`, `step`, and a `meta` dict
  rng_rank{r}.pt       (every rank) python, numpy and torch RNG states of rank r
A checkpoint written by N ranks is loaded by N ranks (RNG files are per rank).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_state(path: str | os.PathLike, state: dict[str, Any], *, rank: int) -> None:
    """Write `state` (rank 0 only) and this rank's RNG state into directory `path`."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _atomic_save(state, directory / STATE_FILE)
    _atomic_save(rng_state(), directory / f"rng_rank{rank}.pt")


def load_state(path: str | os.PathLike, *, rank: int) -> dict[str, Any]:
    """Read the trainer state of directory `path` and restore this rank's RNG state."""
    directory = Path(path)
    state_file = directory / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {directory}: no {STATE_FILE} (not a trainer checkpoint)"
        )
    rng_file = directory / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {directory}: no {rng_file.name}; it was saved by fewer ranks than "
            f"this run has (rank {rank})"
        )
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    set_rng_state(torch.load(rng_file, weights_only=False))
    return state
