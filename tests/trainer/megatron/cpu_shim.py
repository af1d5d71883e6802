"""TEST-ONLY CPU shim for megatron-core 0.16.1 -- never import this from production code.

megatron-core calls CUDA unconditionally in its RNG tracker, MoE router, RoPE, pipeline
schedules, optimizers and gradient clipping (see /work/shared/reference/megatron_cpu.md).
This module redirects those calls to the CPU so that the *real* megatron training path
(GPTModel, megatron DDP, the distributed optimizer, `get_forward_backward_func`,
`finalize_model_grads`) runs over gloo in test subprocesses on a machine without a GPU.

It is process-global (it patches `torch.cuda`, enters a TorchFunctionMode and replaces a few
private megatron functions), so call `install()` once, at the top of a torchrun worker
process, before any megatron module is built. It edits no file of megatron-core.

What it does, and why (line numbers are megatron-core 0.16.1):
  1. `torch.cuda`: `current_device() -> "cpu"` (a string, because code inside
     `torch.autograd.backward` does not see a TorchFunctionMode), `synchronize` a no-op,
     `get_rng_state/set_rng_state/manual_seed` on the CPU generator, dummy streams/events.
  2. megatron's RNG tracker (`tensor_parallel/random.py:41,72`) reads/writes the CPU state.
  3. A TorchFunctionMode maps `device="cuda"` / `device=<int>` to "cpu" in factory calls and
     `Tensor.to`, makes `Tensor.cuda()` a no-op, drops `pin_memory=True` and makes a bare
     `Tensor.type()` report `torch.cuda.*Tensor` (optimizer.py:690, distrib_optimizer.py:420,
     clip_grads.py:167 check that string).
  4. Module patches: `moe_utils.te_general_gemm = None` (moe_utils.py:1192 NameError without
     TransformerEngine), numpy split sizes for the alltoall dispatcher (moe_utils.py:1093 only
     converts CUDA tensors), and uneven all-gather / reduce-scatter emulated on gloo
     (mappings.py:150,193: gloo has no uneven all_gather).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_STATE: dict[str, object] = {}  # holds the entered mode so it is not garbage-collected


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device requests to the CPU; see the module docstring, item 3."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _DummyEvent:
    """Stands in for torch.cuda.Event (and, as _DummyStream, for Stream): methods are no-ops."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def __getattr__(self, name):
        # record_event() must return something with synchronize(); everything else no-ops.
        return lambda *a, **k: _DummyEvent()


class _DummyStream(_DummyEvent):
    """A class (so `torch.cuda.Stream | None` annotations still work) whose every instance is
    the same object: megatron calls record_stream when `Stream()` differs from
    `current_stream()`."""

    _instance: _DummyStream | None = None

    def __new__(cls, *args, **kwargs):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance


def _patch_torch_cuda() -> None:
    stream = _DummyStream()
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed calls torch.cuda.manual_seed_all; point at the generator, not at
    # torch.manual_seed, or it recurses.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.Stream = _DummyStream
    cuda.current_stream = lambda *a, **k: stream
    cuda.default_stream = lambda *a, **k: stream
    cuda.stream = lambda *a, **k: stream
    cuda.Event = _DummyEvent
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import mappings, random
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    moe_utils.te_general_gemm = None

    def move_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor):
            return tensor.detach().cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = move_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu
    original_gather = mappings._gather_along_first_dim
    original_reduce_scatter = mappings._reduce_scatter_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        # gloo has no uneven all_gather: pad every piece to the largest, gather, cut.
        sizes = [int(s) for s in output_split_sizes]
        padded = input_.new_zeros((max(sizes), *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((max(sizes) * group.size(), *input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        pieces = out.split(max(sizes))
        return torch.cat([piece[:size] for piece, size in zip(pieces, sizes)])

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original_reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        summed = input_.clone()
        dist.all_reduce(summed, group=group)
        sizes = [int(s) for s in input_split_sizes]
        return summed.split(sizes)[group.rank()].contiguous()

    mappings._gather_along_first_dim = gather
    mappings._reduce_scatter_along_first_dim = reduce_scatter


def install() -> None:
    """Apply every patch (idempotent). Call before building any megatron module."""
    if _STATE.get("installed"):
        return
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    torch._dynamo.config.disable = True
    _patch_torch_cuda()
    _patch_megatron()
    mode = _CpuDeviceMode()
    mode.__enter__()
    _STATE["mode"] = mode
    _STATE["installed"] = True
    # The RNG tracker logs "CPU RNG state changed within GPU RNG context" at every fork.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
