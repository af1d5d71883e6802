"""SFT: chat rows to masked episodes, and SFT on the toy arithmetic task learns it."""

from __future__ import annotations

import pytest
import torch

from envs.tasks import make_rows
from models.chat import prompt_ids
from tests.trainer.toy import backend, toy_model
from trainer.batch import build_step
from trainer.sft_data import sft_episodes


def test_sft_episode_masks_exactly_the_assistant_answer(toy_tokenizer):
    rows = [{"id": "r0", "messages": [{"role": "user", "content": "37+58="}], "label": "95"}]
    (episode,) = sft_episodes(toy_tokenizer, rows)
    assert episode.prompt_ids.tolist() == prompt_ids(toy_tokenizer, rows[0]["messages"])
    trained = episode.response_ids[episode.loss_mask.astype(bool)]
    assert toy_tokenizer.decode(trained) == "\n95<|endoftext|>"
    assert episode.versions.tolist() == [-1] * len(episode.response_ids)
    assert episode.metadata == {"id": "r0", "label": "95"}


def test_sft_rows_with_an_assistant_turn_keep_it_and_errors_name_the_row(toy_tokenizer):
    messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]
    (episode,) = sft_episodes(toy_tokenizer, [{"messages": messages, "label": "ignored"}])
    assert toy_tokenizer.decode(episode.response_ids) == "\n2<|endoftext|>"
    with pytest.raises(ValueError, match=r"rows\[1\]: no assistant turn and no 'label'"):
        sft_episodes(toy_tokenizer, [{"messages": messages}, {"messages": messages[:1]}])


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows, max_new_tokens: int = 4) -> float:
    """Exact-match accuracy of greedy answers (the model's packed forward, no KV cache)."""
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    seqs = [prompt_ids(tokenizer, r["messages"]) for r in rows]
    answers: list[list[int]] = [[] for _ in rows]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        ids = torch.tensor([t for s in seqs for t in s])
        cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0)
        hidden = model.forward_packed(ids, cu).hidden
        next_ids = model.lm_head(hidden[cu[1:] - 1]).argmax(-1).tolist()
        for i, t in enumerate(next_ids):
            done[i] = done[i] or t == eos
            if not done[i]:
                answers[i].append(t)
            seqs[i] = [*seqs[i], t]
    hits = [tokenizer.decode(a).strip() == r["label"] for a, r in zip(answers, rows, strict=True)]
    return sum(hits) / len(rows)


def test_sft_on_arithmetic_lowers_loss_and_raises_held_out_accuracy(toy_tokenizer):
    steps, batch = 160, 32
    train = make_rows("arithmetic", steps * batch, seed=0, split="train", digits=1)
    held_out = make_rows("arithmetic", 128, seed=1, split="test", digits=1)
    assert not {r["messages"][0]["content"] for r in train} & {
        r["messages"][0]["content"] for r in held_out
    }
    model = toy_model(len(toy_tokenizer), seed=0)
    trainer = {"lr": 3e-3, "min_lr": 3e-4, "lr_schedule": "cosine", "warmup_steps": 5,
               "steps": steps}  # fmt: skip
    # an RL algorithm section (critic, KL) must not get in the way of an SFT backend
    tb = backend(model, trainer, {"advantage": "gae", "kl": {"coef": 0.1}}, policy_loss="sft")
    assert tb.critic is None and tb.ref is None
    episodes = sft_episodes(toy_tokenizer, train)
    accuracy_before = greedy_accuracy(model, toy_tokenizer, held_out)
    losses = []
    for s in range(steps):
        chunk = episodes[s * batch : (s + 1) * batch]
        step = build_step(chunk, list(range(batch)), micro_batch_tokens=1024)
        losses.append(tb.train(step)["loss"])
    accuracy_after = greedy_accuracy(model, toy_tokenizer, held_out)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.2 * first, (first, last)
    assert accuracy_before <= 0.05
    assert accuracy_after >= 0.5, (accuracy_before, accuracy_after)
