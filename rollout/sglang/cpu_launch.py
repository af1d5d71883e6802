"""Entry point for SGLang servers on a CPU without SGLang's CPU engine; runs in the SGLang env.

Run as `<sglang python> rollout/sglang/cpu_launch.py <sglang.launch_server flags>`. It is
never imported by the main environment (which has no sglang).

Why it exists (measured with sglang 0.5.23, transformers 5.19, on this AMD EPYC without AMX):
SGLang's transformers backend (`--model-impl transformers`) builds the HF model on the meta
device, swaps Linear/Embedding/MoE-expert modules for its own, and then materialises every
parameter still on the meta device with `get_device()`. On a CPU run without
`SGLANG_USE_CPU_ENGINE=1` (which cannot be used here: it needs sgl_kernel's CPU build and AMX)
`get_device()` raises "No accelerator (CUDA, XPU, HPU, NPU, MUSA, MPS) or platform plugin is
available". Dense models such as Qwen2/Llama never reach that call because all their
parameters live in replaced modules, but GLM-4-MoE's router (`Glm4MoeTopkRouter.weight`, a bare
`nn.Parameter`) stays on the meta device, so a GLM-4-MoE server dies at load.

The fix here is the smallest one: when `get_device()` finds no accelerator, answer "cpu" (the
device this server was told to use). SGLang starts its scheduler and detokenizer with the
`spawn` start method, which re-imports this file (as `__mp_main__`) in every child before the
child imports SGLang's model code, so the patch is in place in every process. Everything else
is SGLang's unmodified server.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("physarum.sglang.cpu_launch")


def _patch_get_device() -> None:
    import sglang.srt.utils as utils_pkg
    import sglang.srt.utils.common as common

    original = common.get_device
    if getattr(original, "_physarum_cpu_fallback", False):
        return

    def get_device(device_id: int | None = None) -> str:
        try:
            return original(device_id)
        except RuntimeError:
            return "cpu"

    get_device._physarum_cpu_fallback = True  # type: ignore[attr-defined]
    common.get_device = get_device
    utils_pkg.get_device = get_device


_patch_get_device()


def main(argv: list[str]) -> None:
    """What `python -m sglang.launch_server ARGV` does, with this file staying `__main__` (so
    spawned children re-import it and get the patch)."""
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    log.info("launching sglang.launch_server with the CPU get_device fallback")
    main(sys.argv[1:])
