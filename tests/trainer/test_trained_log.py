"""trained_groups.json: every checkpoint lists the groups its lineage's steps trained (step,
stream entry id, prompt id, epoch), cumulative across a restore, checksummed with the rest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from buffer.episode import Episode, EpisodeGroup
from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore
from configs import load_job
from physarum.prepare import prepare
from physarum.rundir import RunDir
from tests.physarum.test_job import TINY
from trainer.checkpoint_record import verify
from trainer.service import TrainerService
from trainer.trained_log import TRAINED_FILE, TrainedGroup, read_trained


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server.url


def _group(prompt_id: str, epoch: int, seed: int) -> EpisodeGroup:
    """Two episodes of token ids inside the tiny model's vocabulary (128)."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, 128, 5)
    episodes = []
    for i in range(2):
        episode = Episode.from_generation(
            prompt_ids=prompt,
            response_ids=rng.integers(0, 128, 6),
            logprobs=-rng.random(6).astype(np.float32),
            versions=np.zeros(6, dtype=np.int64),
            finish_reason="stop",
        )
        episode.reward = float(i)
        episodes.append(episode)
    return EpisodeGroup(prompt_id, episodes, {"epoch": epoch})


def _service(root: Path, url: str) -> tuple[TrainerService, EpisodeStore]:
    overrides = [f"run_dir={root / 'run'}", *TINY, "trainer.prompts_per_step=2"]
    job = load_job(Path("configs/toy_grpo.yaml"), overrides)
    prepared = prepare(job, RunDir(root / "run").create())
    store = EpisodeStore.from_config(url, "trained", job.buffer)
    return TrainerService(job, prepared.model_dir, store=store, total_steps=4), store


def test_the_lineage_is_recorded_and_survives_a_restore(tmp_path: Path, redis_url: str) -> None:
    trainer, store = _service(tmp_path, redis_url)
    first = store.put_groups([_group("a", 0, 1), _group("b", 0, 2)])
    trainer.rl_step(timeout_s=30)
    trainer.checkpoint(tmp_path / "c1")
    assert read_trained(tmp_path / "c1") == [
        TrainedGroup(1, first[0], "a", 0),
        TrainedGroup(1, first[1], "b", 0),
    ]
    assert verify(tmp_path / "c1") == []
    store.close()

    restarted, fresh = _service(tmp_path / "again", redis_url)
    restarted.restore(tmp_path / "c1")
    later = fresh.put_groups([_group("c", 1, 3), _group("a", 1, 4)])
    restarted.rl_step(timeout_s=30)
    restarted.checkpoint(tmp_path / "c2")
    lineage = read_trained(tmp_path / "c2")
    assert lineage is not None and lineage[:2] == read_trained(tmp_path / "c1")
    assert sorted(lineage[2:], key=lambda g: g.prompt_id) == [
        TrainedGroup(2, later[1], "a", 1),
        TrainedGroup(2, later[0], "c", 1),
    ]
    (tmp_path / "c2" / TRAINED_FILE).write_text("[]")  # a doctored record fails its checksum
    assert any(TRAINED_FILE in problem for problem in verify(tmp_path / "c2"))
