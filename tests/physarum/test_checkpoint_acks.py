"""The trainer's checkpoint and the buffer's acknowledgements, across a crash between them.

A checkpoint is marked COMPLETE before the groups its steps consumed are acknowledged, and
their entry ids are saved with it; `restore` acknowledges them again. So a trainer that dies
right after the marker neither trains those groups a second time nor loses any.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore
from configs import load_job
from physarum.prepare import prepare
from physarum.rundir import RunDir
from tests.buffer.helpers import make_group
from tests.physarum.test_job import TINY
from trainer.service import CONSUMED_FILE, TrainerService


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server.url


def _service(tmp_path: Path, url: str) -> tuple[TrainerService, EpisodeStore]:
    job = load_job(Path("configs/toy_grpo.yaml"), [f"run_dir={tmp_path / 'run'}", *TINY])
    prepared = prepare(job, RunDir(tmp_path / "run").create())
    store = EpisodeStore.from_config(url, "acks", job.buffer)
    return TrainerService(job, prepared.model_dir, store=store, total_steps=4), store


def test_a_crash_between_complete_and_ack_is_repaired_on_restore(
    tmp_path: Path, redis_url: str
) -> None:
    trainer, store = _service(tmp_path, redis_url)
    ids = store.put_groups([make_group(f"p{i}") for i in range(3)])
    assert len(trainer.take_groups(3, timeout_s=10)) == 3
    assert store.stats().groups_pending == 3

    def crash(entry_ids: list[str]) -> None:
        raise SystemExit("killed after COMPLETE, before the ack")

    store.ack = crash  # type: ignore[method-assign]
    path = tmp_path / "ckpt"
    with pytest.raises(SystemExit):
        trainer.checkpoint(path)
    assert (path / "COMPLETE").exists()  # the marker came first ...
    assert sorted(json.loads((path / CONSUMED_FILE).read_text())) == sorted(ids)
    assert store.stats().groups_pending == 3  # ... and nothing was acknowledged
    store.close()

    restarted, fresh = _service(tmp_path / "again", redis_url)
    restarted.restore(path)
    stats = fresh.stats()
    assert (stats.groups_pending, stats.groups_acked) == (0, 3)
    # the consumer comes back under the same name: nothing from before the checkpoint again
    assert fresh.take_groups(restarted.consumer, 3, block_ms=200) == []
    restarted.restore(path)  # idempotent
    assert fresh.stats().groups_acked == 3


def test_a_checkpoint_acks_what_its_steps_consumed_and_records_it(
    tmp_path: Path, redis_url: str
) -> None:
    trainer, store = _service(tmp_path, redis_url)
    first = store.put_groups([make_group("a"), make_group("b")])
    trainer.take_groups(2, timeout_s=10)
    trainer.checkpoint(tmp_path / "c1")
    later = store.put_groups([make_group("c")])
    trainer.take_groups(1, timeout_s=10)
    trainer.checkpoint(tmp_path / "c2")
    assert sorted(json.loads((tmp_path / "c1" / CONSUMED_FILE).read_text())) == sorted(first)
    assert json.loads((tmp_path / "c2" / CONSUMED_FILE).read_text()) == later
    stats = store.stats()
    assert (stats.groups_pending, stats.groups_acked) == (0, 3)
