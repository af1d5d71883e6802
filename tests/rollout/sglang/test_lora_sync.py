"""LoRA with `rollout.engine: sglang`: merged full-weight sync into ONE real SGLang 0.5.23
server on this CPU (tiny GLM-4-MoE, fp32). The trainer's update is every adapter-targeted
weight merged (`W + s B A`, trainer/lora_backend.py merged_weight_update) and nothing else;
SGLang's greedy tokens and logprobs must then be the merged model's, through every sync path.
A second LoRA state pushed afterwards replaces the first (each update is merged from the base,
never stacked)."""

from __future__ import annotations

import pytest
import torch

from configs.services import LORA_TARGETS, LoraConfig
from models.lora import LoraAdapters, attach_lora
from trainer.lora_backend import merged_state, merged_weight_update

from .conftest import from_pretrained_like, model_with, run
from .test_engine import check_against, engine_for, greedy, server  # noqa: F401 (fixture)

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(400)]


def _random_lora(model, seed: int) -> LoraAdapters:
    """Adapters on every target kind with A and B random (B = 0 would merge to the base)."""
    lora = attach_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=list(LORA_TARGETS)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return lora


_versions = iter(range(1, 100))


@pytest.mark.parametrize("sync", ["tensor", "distributed", "disk"])
def test_merged_lora_update_gives_the_merged_models_outputs(server, reference_model, sync):  # noqa: F811
    """Each SGLang sync path takes a partial (targeted-only) update."""

    async def body():
        engine = engine_for(server, sync)
        try:
            for seed in (1, 2):
                version = next(_versions)
                model = from_pretrained_like(reference_model)
                lora = _random_lora(model, seed)
                update = merged_weight_update(
                    model, lora, version, bucket_bytes=64 * 1024, dtype=torch.float32
                )
                full = sum(t.numel() * 4 for _, t in reference_model.hf_state_dict())
                print(f"LoRA merged {sync} sync v{version}: {update.nbytes} B of {full} B full")
                assert update.nbytes < full and len(update.buckets) > 1
                await engine.update_weights(update)
                assert await engine.weight_version() == version
                outputs = await engine.generate(greedy())
                merged = model_with(merged_state(model, lora), like=reference_model)
                check_against(merged, outputs, version)
        finally:
            await engine.close()

    run(body())
