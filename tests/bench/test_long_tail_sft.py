"""bench/long_tail.py's SFT warm start in length-sorted pieces (--model small-36M): the same
mean token loss and gradient as the whole batch padded at once."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.models.glm_helpers import make_model, to_hf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import long_tail  # noqa: E402  (bench/ modules import each other by bare name)


def _examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Prompt + answer ids with the prompt's labels -100; lengths heavy-tailed (3..60)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = int(torch.randint(2, 6, (1,), generator=gen))
        answer = int(min(55, torch.distributions.LogNormal(1.0, 1.0).sample().item() + 1))
        ids = torch.randint(1, 128, (prompt + answer,), generator=gen).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def test_chunked_sft_step_equals_the_whole_batch() -> None:
    torch.manual_seed(0)
    model = to_hf(make_model(seed=2))
    batch = _examples(13, seed=1)  # 13 rows in 4 pieces: uneven piece sizes
    whole = model(**long_tail._sft_kwargs(batch, pad_id=0)).loss
    whole.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    loss = long_tail._sft_chunked_backward(model, batch, chunks=4, pad_id=0)
    assert abs(loss.item() - whole.item()) < 1e-5
    for name, p in model.named_parameters():
        if name in ref:
            assert (p.grad - ref[name]).abs().max().item() < 1e-5, name
