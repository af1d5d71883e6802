"""torchrun worker for the megatron backend tests (one scenario per launch; see test_backend.py).

Each rank builds the same torch reference model (models.Glm4MoeForCausalLM, the glm4moe-tiny
preset with every optional path switched on and weights drawn large enough that routing and
softmaxes are far from uniform), hands its HF state dict to a MegatronBackend under the
requested TP/PP/EP layout, and checks against the torch model on the same packed batches:

  roundtrip   export_weights() == the HF weights it was built from, bitwise, every tensor
  logprobs    per-token logprobs, max |megatron - torch|
  loss        the step loss (ActorObjective shares summed) vs the torch objective's
  ref         logprobs(model="ref") equal the initial actor's after a step
  step        after one optimizer step on both sides (torch: AdamW + the same clipping and
              loss-free bias update), max |logprob difference|
  ckpt        save -> train a step -> load -> logprobs equal the saved ones, bitwise
  service     (--service) MegatronBackend.train(this rank's own StepBatch) vs
              TorchBackend.train(the whole step) -- the trainer service's GRPO step with
              old-logprob and ref passes and 2 PPO epochs -- metrics and logprobs after
  group       (--group-routing) group-limited routing (n_group 2) logprobs vs the torch model
  r3          (--r3) R3's logprob pass: engine experts forced, the prompt's own, recorded
  bf16        (--bf16) bf16 training: export exact to the bf16-cast weights, logprobs within
              bf16 error of the fp32 torch model, the loss falls over three steps

Results go to OUT/rank{r}.json; the pytest side asserts. TEST-ONLY: installs the CPU shim.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--dispatcher", default="alltoall")
    parser.add_argument("--dist-opt", action="store_true")
    parser.add_argument("--ckpt", action="store_true")
    parser.add_argument("--untied", action="store_true")
    parser.add_argument("--service", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--group-routing", action="store_true")
    parser.add_argument("--recompute", action="store_true")
    parser.add_argument("--r3", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = _args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from tests.trainer.megatron import cpu_shim

    cpu_shim.install()
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from tests.trainer.megatron import scenarios

    result = scenarios.run_scenario(args)
    extra = {
        "service": scenarios.run_service_scenario,
        "bf16": scenarios.run_bf16_scenario,
        "group_routing": scenarios.run_group_routing_scenario,
        "r3": scenarios.run_r3_scenario,
    }
    for flag, scenario in extra.items():  # more backends in the same processes: megatron's
        if getattr(args, flag):  # parallel state is re-initialised by each
            result.update(scenario(args))
    rank = dist.get_rank()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    main()
