"""Save and load the megatron backend's training state with megatron's dist_checkpointing.

The format is megatron-core's `torch_dist` (PyTorch DCP): each rank writes its shards of the
model and of the optimizer state into one directory, so a checkpoint can be reloaded under a
different TP/PP/EP layout. Contents: the model's sharded_state_dict, the optimizer's (fp32
main params and Adam moments; the distributed optimizer's shards in the `dp_reshardable`
format -- the deprecated default raises in 0.16) and the policy version, from which the LR
schedule resumes.

Note: `dist_checkpointing.save` starts a multiprocessing "spawn" manager, so the launching
script needs an `if __name__ == "__main__":` guard; writing needs psutil.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing

_OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def _state(model, optimizer, version: int, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=_OPTIM_METADATA
        ),
        "version": version,
    }


def save_checkpoint(path: str | Path, model, optimizer, version: int) -> None:
    """Write the training state (collective: every rank calls it with the same path)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_state(model, optimizer, version, False), str(path))
    torch.distributed.barrier()


def load_checkpoint(path: str | Path, model, optimizer) -> int:
    """Restore the training state in place; returns the saved policy version."""
    path = Path(path)
    if not (path / "metadata.json").exists():
        raise FileNotFoundError(f"{path}: not a megatron dist checkpoint (no metadata.json)")
    loaded = dist_checkpointing.load(_state(model, optimizer, 0, True), str(path))
    model.load_state_dict(loaded["model"])
    with torch.no_grad():  # the distributed optimizer copies into leaf parameters in place
        optimizer.load_state_dict(loaded["optimizer"])
    return int(loaded["version"])
