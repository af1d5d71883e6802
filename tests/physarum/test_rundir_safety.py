"""Run dirs that are never mixed and state that is never silently lost (issue 18 item 3).

- a new run into a non-empty dir is refused unless --overwrite (which clears a run dir, and
  nothing else); --resume DIR runs in DIR, whatever job.yaml says; a changed mode is refused;
- checkpoints carry checksums: a corrupt latest one is set aside and the previous intact one
  is used, with a warning naming both; none intact is an error;
- a buffer that does not match the checkpoint (acks, version, prompt cursor) stops the resume
  before anything is loaded or acknowledged.
Every refusal asserts its error class, that the message names what is wrong, and that nothing
on disk changed. The checks run on a real trainer checkpoint and a real redis-server; the
last two tests run real jobs (a tiny RL run, then resumes of copies of it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from buffer.redis_server import EmbeddedRedis
from buffer.store import EpisodeStore
from configs import load_job
from physarum.cli import main
from physarum.context import JobContext
from physarum.launch import execute, resolve
from physarum.prepare import prepare
from physarum.resume import (
    BufferMismatchError,
    CheckpointCorruptError,
    check_buffer,
    pick_checkpoint,
    set_aside,
)
from physarum.rundir import ResumeModeError, RunDir, RunDirInUseError
from tests.buffer.helpers import make_group, write_prompts
from tests.physarum.test_job import TINY
from trainer.checkpoint_record import verify, write_buffer_record, write_manifest
from trainer.service import TrainerService

GRPO = Path("configs/toy_grpo.yaml")
SFT = Path("configs/toy_sft.yaml")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (and the dirs, as ''): what 'nothing changed' means."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
    }


# ---- new runs, --overwrite, --resume and the mode ------------------------------------------


def _old_run(root: Path) -> Path:
    """A dir that holds an earlier run's traces."""
    (root / "checkpoints" / "step_2").mkdir(parents=True)
    (root / "checkpoints" / "step_2" / "COMPLETE").write_text("2")
    (root / "metrics.jsonl").write_text('{"step": 1}\n')
    return root


def test_a_new_run_into_a_non_empty_dir_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _old_run(tmp_path / "run")
    before = snapshot(run_dir)
    job = load_job(GRPO, [f"run_dir={run_dir}"])
    with pytest.raises(RunDirInUseError) as refused:
        JobContext(job)
    message = str(refused.value)
    assert f"run_dir {run_dir} is not empty (checkpoints, metrics.jsonl)" in message
    assert f"physarum run --resume {run_dir}" in message and "--overwrite" in message
    assert snapshot(run_dir) == before

    assert main(["run", str(GRPO), "--set", f"run_dir={run_dir}"]) == 2  # the CLI: one line
    err = capsys.readouterr().err
    assert "is not empty" in err and "Traceback" not in err
    assert snapshot(run_dir) == before


def test_overwrite_clears_a_run_dir_and_nothing_else(tmp_path: Path) -> None:
    stranger = _old_run(tmp_path / "not_a_run")  # no job.yaml: not ours to delete
    before = snapshot(stranger)
    with pytest.raises(RunDirInUseError, match=r"not a run dir \(no job.yaml\)"):
        RunDir(stranger).claim(overwrite=True)
    assert snapshot(stranger) == before

    old = RunDir(_old_run(tmp_path / "run"))
    old.save_job(load_job(GRPO, [f"run_dir={old.root}"]))
    old.claim(overwrite=True)
    assert old.root.is_dir() and not any(old.root.iterdir())
    RunDir(tmp_path / "missing").claim(overwrite=False)  # a new dir is fine
    assert not (tmp_path / "missing").exists()


def test_resume_and_overwrite_together_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--resume", str(tmp_path), "--overwrite"]) == 2
    assert "--overwrite clears the run dir, --resume continues it" in capsys.readouterr().err


def test_resume_refuses_a_changed_mode(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run").create()
    run.save_identity(load_job(GRPO, [f"run_dir={run.root}"]))  # started as rl
    run.save_job(load_job(SFT, [f"run_dir={run.root}"]))  # job.yaml edited to sft
    _old_run(run.root)
    before = snapshot(run.root)
    job, resume = resolve(None, [], str(run.root))
    with pytest.raises(ResumeModeError) as refused:
        JobContext(job, resume=resume)
    message = str(refused.value)
    assert "mode is 'sft' but this run was started as 'rl'" in message
    assert str(run.run_json) in message and "Set mode back to 'rl'" in message
    assert snapshot(run.root) == before


def test_resume_runs_in_the_dir_named_whatever_job_yaml_says(tmp_path: Path) -> None:
    original, copy = tmp_path / "original", tmp_path / "copy"
    RunDir(original).create().save_job(load_job(GRPO, [f"run_dir={original}"]))
    shutil.copytree(original, copy)
    job, resume = resolve(None, [], str(copy))
    assert resume and job.resolved_run_dir == copy.absolute()


# ---- checksums and the fallback ---------------------------------------------------------------


def _checkpoint(run: RunDir, step: int) -> Path:
    path = run.checkpoint(step)
    path.mkdir(parents=True)
    (path / "trainer_state.pt").write_bytes(bytes(range(256)) * (step + 4))
    (path / "rng_rank0.pt").write_bytes(b"rng" * step)
    write_manifest(path)
    (path / "COMPLETE").write_text(str(step))
    return path


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (
            lambda f: f.write_bytes(f.read_bytes()[:-10]),
            "trainer_state.pt has 1526 bytes, not 1536",
        ),
        (lambda f: f.write_bytes(b"X" + f.read_bytes()[1:]), "trainer_state.pt fails its sha256"),
        (lambda f: f.unlink(), "trainer_state.pt is missing"),
    ],
    ids=["truncated", "corrupted", "missing"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, named: str
) -> None:
    run = RunDir(tmp_path).create()
    first, latest = _checkpoint(run, 1), _checkpoint(run, 2)
    damage(latest / "trainer_state.pt")
    before = snapshot(tmp_path)
    chosen, corrupt = pick_checkpoint(run)
    assert chosen == (1, first) and [(s, p) for s, p, _ in corrupt] == [(2, latest)]
    assert named in corrupt[0][2][0]
    assert snapshot(tmp_path) == before  # picking changes nothing

    with caplog.at_level(logging.WARNING, logger="physarum.resume"):
        set_aside(corrupt, chosen)
    warning = caplog.records[-1].getMessage()
    assert f"checkpoint {latest} is corrupt ({named}" in warning
    assert f"previous intact checkpoint {first} (step 1)" in warning
    assert (run.checkpoints / "corrupt_step_2" / "COMPLETE").exists()
    assert run.latest_checkpoint() == (1, first) and verify(first) == []


def test_no_intact_checkpoint_is_an_error_that_changes_nothing(tmp_path: Path) -> None:
    run = RunDir(tmp_path).create()
    for step in (1, 2):
        (_checkpoint(run, step) / "rng_rank0.pt").write_bytes(b"garbage")
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointCorruptError) as refused:
        pick_checkpoint(run)
    message = str(refused.value)
    assert "every checkpoint" in message and "rng_rank0.pt" in message
    assert str(run.checkpoint(1)) in message and str(run.checkpoint(2)) in message
    assert snapshot(tmp_path) == before


# ---- the buffer against the checkpoint ------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server.url


def _stats(store: EpisodeStore) -> dict:
    return store.stats().to_dict()


@pytest.fixture
def two_checkpoints(tmp_path: Path, redis_url: str):
    """A real trainer that consumed 3 then 2 groups and checkpointed after each (steps 1, 2),
    leasing prompts as a rollout would; returns (run, store, trainer)."""
    job = load_job(GRPO, [f"run_dir={tmp_path / 'run'}", *TINY])
    run = RunDir(tmp_path / "run").create()
    prepared = prepare(job, run)
    store = EpisodeStore.from_config(redis_url, "job", job.buffer)
    store.load_prompts(write_prompts(tmp_path / "d.jsonl", 20), shuffle=False)
    trainer = TrainerService(job, prepared.model_dir, store=store, total_steps=4)
    for step, n in ((1, 3), (2, 2)):
        leases = store.lease_prompts("w", n)
        store.put_groups([make_group(lease.prompt_id) for lease in leases])
        assert len(trainer.take_groups(n, timeout_s=10)) == n
        trainer.checkpoint(run.checkpoint(step))
    yield run, store, trainer
    store.close()


def test_a_matching_buffer_resumes(two_checkpoints) -> None:
    run, store, _ = two_checkpoints
    latest, corrupt = pick_checkpoint(run)
    assert latest == (2, run.checkpoint(2)) and corrupt == []
    record = json.loads((run.checkpoint(2) / "buffer_state.json").read_text())
    assert record == {"version": 0, "acked_before": 3, "acked_after": 5, "epoch": 0, "cursor": 5}
    check_buffer(run, latest, _stats(store), corrupt)


def test_a_crash_between_complete_and_ack_still_matches(tmp_path: Path, redis_url: str) -> None:
    job = load_job(GRPO, [f"run_dir={tmp_path / 'run'}", *TINY])
    run = RunDir(tmp_path / "run").create()
    store = EpisodeStore.from_config(redis_url, "job", job.buffer)
    trainer = TrainerService(job, prepare(job, run).model_dir, store=store, total_steps=4)
    store.put_groups([make_group(f"p{i}") for i in range(2)])
    trainer.take_groups(2, timeout_s=10)

    def crash(entry_ids: list[str]) -> None:
        raise SystemExit("killed after COMPLETE, before the ack")

    store.ack = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        trainer.checkpoint(run.checkpoint(1))
    check_buffer(run, (1, run.checkpoint(1)), _stats(store), [])  # restore acks them
    store.close()


def test_a_rebuilt_buffer_stops_the_resume(two_checkpoints, tmp_path: Path, redis_url) -> None:
    run, store, _ = two_checkpoints
    rebuilt = EpisodeStore.from_config(redis_url, "rebuilt", load_job(GRPO, []).buffer)
    rebuilt.load_prompts(write_prompts(tmp_path / "d.jsonl", 20), shuffle=False)  # from scratch
    stats, before = _stats(rebuilt), snapshot(run.root)
    with pytest.raises(BufferMismatchError) as refused:
        check_buffer(run, (2, run.checkpoint(2)), stats, [])
    message = str(refused.value)
    assert f"the buffer in {run.redis} does not match checkpoint {run.checkpoint(2)}" in message
    assert "acknowledged 0 episode groups but the checkpoint's steps used 5" in message
    assert "prompt cursor is at epoch 0 position 0, behind the checkpoint's epoch 0 position 5" in (
        message
    )
    assert "physarum run CONFIG --overwrite" in message  # the way out
    assert snapshot(run.root) == before and _stats(rebuilt) == stats
    rebuilt.close()


def test_a_buffer_ahead_of_the_checkpoint_stops_the_resume_unless_a_corrupt_one_explains_it(
    two_checkpoints, caplog: pytest.LogCaptureFixture
) -> None:
    run, store, _ = two_checkpoints
    shutil.rmtree(run.checkpoint(2))  # the newer checkpoint is gone; its groups were acked
    stats, before = _stats(store), snapshot(run.root)
    with pytest.raises(BufferMismatchError, match="acknowledged 2 more groups than the checkpoint"):
        check_buffer(run, (1, run.checkpoint(1)), stats, [])
    assert snapshot(run.root) == before and _stats(store) == stats

    corrupt = [(2, run.checkpoint(2), ["trainer_state.pt fails its sha256 checksum"])]
    with caplog.at_level(logging.WARNING, logger="physarum.resume"):
        check_buffer(run, (1, run.checkpoint(1)), stats, corrupt)
    assert "acknowledged 2 groups after checkpoint step 1" in caplog.text


def test_a_buffer_behind_the_checkpoints_version_stops_the_resume(
    tmp_path: Path, redis_url: str
) -> None:
    store = EpisodeStore.from_config(redis_url, "job", load_job(GRPO, []).buffer)
    run = RunDir(tmp_path / "run").create()
    path = run.checkpoint(5)
    path.mkdir(parents=True)
    stats = store.stats()
    write_buffer_record(path, stats, version=5, n_acks=0)  # the trainer was at version 5
    with pytest.raises(BufferMismatchError, match="policy version is 0, behind the checkpoint's 5"):
        check_buffer(run, (5, path), stats.to_dict(), [])
    with pytest.raises(BufferMismatchError, match="no complete checkpoint, but its buffer"):
        check_buffer(run, None, {"groups_acked": 4}, [])
    store.close()


# ---- real jobs: a resumed copy, a corrupt checkpoint, a lost buffer --------------------------

JOB = [*TINY, "trainer.steps=2", "checkpoint.interval=1", "rollout.eval.interval=0"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "original"
    execute(load_job(GRPO, [f"run_dir={run_dir}", *JOB]))
    return run_dir


def test_a_resumed_copy_runs_in_the_copy_and_falls_back_past_a_corrupt_checkpoint(
    finished_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    original = snapshot(finished_run)
    state = copy / "checkpoints" / "step_2" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:-100])  # truncated

    job, resume = resolve(None, [], str(copy))
    with caplog.at_level(logging.WARNING, logger="physarum.resume"):
        result = execute(job, resume=resume)
    assert result["steps"] == 2
    assert f"checkpoint {copy / 'checkpoints' / 'step_2'} is corrupt" in caplog.text
    assert f"previous intact checkpoint {copy / 'checkpoints' / 'step_1'} (step 1)" in caplog.text
    assert (copy / "checkpoints" / "corrupt_step_2" / "COMPLETE").exists()
    assert verify(copy / "checkpoints" / "step_2") == []  # step 2 trained and saved again
    assert load_job(copy / "job.yaml").resolved_run_dir == copy
    assert snapshot(finished_run) == original  # the original was not touched


def test_a_resume_whose_buffer_was_lost_stops_before_loading_anything(
    finished_run: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    shutil.rmtree(copy / "redis")  # the buffer's AOF is gone: a fresh one has no history
    kept = {name: snapshot(copy / name) for name in ("checkpoints", "data", "init")}
    metrics = (copy / "metrics.jsonl").read_bytes()

    job, resume = resolve(None, [], str(copy))
    with pytest.raises(BufferMismatchError) as refused:
        execute(job, resume=resume)
    message = str(refused.value)
    assert f"does not match checkpoint {copy / 'checkpoints' / 'step_2'}" in message
    assert "the prompts were loaded again from the start" in message
    assert "policy version is 0, behind the checkpoint's 2" in message
    assert {name: snapshot(copy / name) for name in kept} == kept
    assert (copy / "metrics.jsonl").read_bytes() == metrics
