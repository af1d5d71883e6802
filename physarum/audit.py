"""Invariant checker for a finished (or crashed and resumed) RL run: nothing lost, nothing
trained twice, the data order kept. Used by the chaos trials (tests/chaos, bench/chaos.py).

It trusts only the buffer's own records and the checkpoint, never the job's log lines:
 - the trained lineage: `trained_groups.json` of the newest intact checkpoint (one row per
   group a checkpointed step trained on: step, stream entry id, prompt id, epoch);
 - the buffer: the run's redis AOF, loaded by a private redis-server started on a *copy* of
   `run_dir/redis` (the run's own files are never touched): dataset ids, seed and shuffle,
   the prompt cursor (epoch, pos), and everything still outstanding (stream entries not
   acknowledged, live leases, the retry list), plus the `groups_acked` counter.

Checks (`audit`):
 - trained twice: an entry id or an (epoch, prompt) trained more than once, or trained and
   still outstanding (it would be trained again), or `groups_acked` != groups trained;
 - lost: a prompt of an epoch the cursor has passed (all of earlier epochs, the current
   epoch up to the cursor) that is neither trained nor outstanding (prompts released as
   filtered by dynamic sampling are allowed, counted in `prompts_filtered`);
 - data order: the prompts consumed in each epoch (trained or outstanding) are exactly a
   prefix of that epoch's order in the reference (the seeded shuffle an uninterrupted run
   with the same seed and dataset uses), and the buffer's stored order of its current epoch
   is that order. A buffer rebuilt from scratch, a cursor that jumped, or a reshuffle fail it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from buffer.keys import Keys
from buffer.prompt_queue import epoch_order
from buffer.redis_server import EmbeddedRedis
from physarum.resume import pick_checkpoint
from physarum.rundir import RunDir
from trainer.checkpoint_record import read_buffer_record
from trainer.trained_log import TrainedGroup, read_trained

Prompt = tuple[int, str]  # (epoch, prompt id)


@dataclass(frozen=True)
class BufferSnapshot:
    """What the buffer's own records say, read once the job has stopped."""

    ids: list[str]  # dataset prompt ids in file order
    seed: int
    shuffle: bool
    epoch: int  # the cursor: the epoch being leased and the next position in its order
    cursor: int
    order: list[str]  # the stored order of the current epoch
    outstanding: list[tuple[str, int, str]]  # (where: stream|lease|retry, epoch, prompt id)
    stream_entries: list[str]  # entry ids still in the stream (not acknowledged)
    groups_acked: int
    prompts_filtered: int

    def reference_order(self, epoch: int) -> list[str]:
        return epoch_order(self.ids, self.seed, epoch, self.shuffle)


@dataclass
class AuditReport:
    """Problems found; `ok` when there are none. Counts are for the outcome tables."""

    trained: int = 0
    outstanding: int = 0
    lost: list[Prompt] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.twice or self.order)

    def summary(self) -> str:
        if self.ok:
            return f"ok ({self.trained} groups trained, {self.outstanding} outstanding)"
        parts = [f"lost {len(self.lost)}: {self.lost[:5]}"] if self.lost else []
        parts += [f"twice: {'; '.join(self.twice[:5])}"] if self.twice else []
        parts += [f"order: {'; '.join(self.order[:5])}"] if self.order else []
        return " | ".join(parts)


def audit(
    trained: list[TrainedGroup],
    buffer: BufferSnapshot,
    reference: Callable[[int], list[str]] | None = None,
) -> AuditReport:
    """Check the three invariants; `reference(epoch)` is the order an uninterrupted run
    uses (default: the seeded shuffle of the buffer's own dataset ids)."""
    reference = reference or buffer.reference_order
    report = AuditReport(trained=len(trained), outstanding=len(buffer.outstanding))
    report.twice = _trained_twice(trained, buffer)
    consumed = _consumed(trained, buffer, report)
    report.lost, report.order = _lost_and_order(consumed, buffer, reference)
    return report


def _trained_twice(trained: list[TrainedGroup], buffer: BufferSnapshot) -> list[str]:
    problems = []
    for entry, n in Counter(g.entry_id for g in trained).items():
        if n > 1:
            problems.append(f"group {entry} trained {n} times")
    keyed = Counter((g.epoch, g.prompt_id) for g in trained if g.epoch is not None)
    for (epoch, prompt), n in keyed.items():
        if n > 1:
            problems.append(f"prompt {prompt} of epoch {epoch} trained {n} times")
    pending = set(buffer.stream_entries) & {g.entry_id for g in trained}
    problems += [f"group {e} trained and still unacknowledged" for e in sorted(pending)]
    if buffer.groups_acked != len(trained):
        problems.append(
            f"the buffer acknowledged {buffer.groups_acked} groups, the checkpoint trained "
            f"{len(trained)}"
        )
    return problems


def _consumed(
    trained: list[TrainedGroup], buffer: BufferSnapshot, report: AuditReport
) -> dict[int, list[str]]:
    """Prompt ids per epoch that are trained or outstanding; a prompt in two places (trained
    and queued again, or queued twice) is reported as one that would be trained twice."""
    places: dict[Prompt, list[str]] = {}
    for g in trained:
        if g.epoch is None:
            report.order.append(f"group {g.entry_id} has no epoch (pushed without a lease)")
            continue
        places.setdefault((g.epoch, g.prompt_id), []).append("trained")
    for where, epoch, prompt in buffer.outstanding:
        places.setdefault((epoch, prompt), []).append(where)
    for (epoch, prompt), where in sorted(places.items()):
        if len(where) > 1 and where.count("trained") <= 1:  # twice-trained: reported above
            report.twice.append(f"prompt {prompt} of epoch {epoch} is {' and '.join(where)}")
    consumed: dict[int, list[str]] = {}
    for epoch, prompt in places:
        consumed.setdefault(epoch, []).append(prompt)
    return consumed


def _lost_and_order(
    consumed: dict[int, list[str]], buffer: BufferSnapshot, reference: Callable[[int], list[str]]
) -> tuple[list[Prompt], list[str]]:
    lost: list[Prompt] = []
    order: list[str] = []
    if buffer.order != reference(buffer.epoch):
        order.append(f"the buffer's order of epoch {buffer.epoch} is not the reference's")
    for epoch in range(0, max([buffer.epoch, *consumed]) + 1):
        ref = reference(epoch)
        passed = len(ref) if epoch < buffer.epoch else buffer.cursor if epoch == buffer.epoch else 0
        expected, got = ref[:passed], set(consumed.get(epoch, []))
        lost += [(epoch, p) for p in expected if p not in got]
        beyond = got - set(expected)
        if beyond:
            order.append(
                f"epoch {epoch}: {len(beyond)} prompts consumed beyond the cursor "
                f"({passed} of {len(ref)}), e.g. {sorted(beyond)[:3]}"
            )
    if len(lost) <= buffer.prompts_filtered:  # released as filtered: finished without a group
        lost = []
    return lost, order


# ---- reading a run dir -----------------------------------------------------------------


def read_lineage(run_dir: Path) -> list[TrainedGroup]:
    """The trained lineage of the newest intact checkpoint ([] when there is none)."""
    picked, _ = pick_checkpoint(RunDir(run_dir))
    if picked is None:
        return []
    lineage = read_trained(picked[1])
    if lineage is None:
        raise ValueError(f"{picked[1]} has no trained_groups.json: cannot audit it")
    record = read_buffer_record(picked[1])
    if record is not None and record.acked_after != len(lineage):
        raise ValueError(
            f"{picked[1]}: trained_groups.json lists {len(lineage)} groups, buffer_state.json "
            f"says {record.acked_after} were acknowledged"
        )
    return lineage


def read_buffer(run_dir: Path) -> BufferSnapshot:
    """Load a copy of the run's redis data dir in a private redis-server and read it. The
    job must have stopped (its redis-server too)."""
    run = RunDir(run_dir)
    password = run.redis_password.read_text().strip()
    with tempfile.TemporaryDirectory(prefix="physarum-audit-") as tmp:
        copy = Path(tmp) / "redis"
        shutil.copytree(run.redis, copy, ignore=shutil.ignore_patterns("redis.pid", "*.log"))
        with EmbeddedRedis(copy, password=password) as server:
            client = redis.Redis.from_url(server.url)
            try:
                return _snapshot(client)
            finally:
                client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _snapshot(r: redis.Redis) -> BufferSnapshot:
    metas = [_text(k) for k in r.scan_iter(match="physarum:{*}:meta")]
    if len(metas) != 1:
        raise ValueError(f"expected one buffer namespace in the run's redis, found {metas}")
    k = Keys.for_namespace(metas[0][len("physarum:{") : -len("}:meta")])
    meta = {_text(a): _text(b) for a, b in r.hgetall(k.meta).items()}
    cursor = {_text(a): int(b) for a, b in r.hgetall(k.cursor).items()}
    stats = {_text(a): int(b) for a, b in r.hgetall(k.stats).items()}
    outstanding: list[tuple[str, int, str]] = []
    entries = []
    for entry_id, fields in r.xrange(k.stream):
        entries.append(_text(entry_id))
        if b"e" in fields:
            outstanding.append(("stream", int(fields[b"e"]), _text(fields[b"p"])))
    for raw in r.hvals(k.leases):
        lease = json.loads(raw)
        outstanding.append(("lease", int(lease["e"]), str(lease["p"])))
    for raw in r.lrange(k.retry, 0, -1):
        epoch, prompt = _text(raw).split("|", 1)
        outstanding.append(("retry", int(epoch), prompt))
    return BufferSnapshot(
        ids=[_text(x) for x in r.lrange(k.ids, 0, -1)],
        seed=int(meta["seed"]),
        shuffle=meta["shuffle"] == "True",
        epoch=cursor.get("epoch", 0),
        cursor=cursor.get("pos", 0),
        order=[_text(x) for x in r.lrange(k.order, 0, -1)],
        outstanding=outstanding,
        stream_entries=entries,
        groups_acked=stats.get("groups_acked", 0),
        prompts_filtered=stats.get("prompts_filtered", 0),
    )


def audit_run(run_dir: Path, reference: Callable[[int], list[str]] | None = None) -> AuditReport:
    """`audit` of a stopped run dir, from its checkpoint and its buffer."""
    return audit(read_lineage(run_dir), read_buffer(run_dir), reference)
