"""The toy GRPO job on the three-node netns cluster (see conftest.py for the topology).

Every job runs its driver inside the head namespace, as a user on the head node would:
  ip netns exec <head> env RAY_ADDRESS=198.18.0.1:6379 RAY_AUTH_MODE=disabled physarum run ...
and places its roles with Ray custom resources only (cluster.*_resources), so what lands
where is decided by the cluster, and read back from the run dir's placement.json.

- test_a_resource_no_node_has_fails_at_once_naming_it: a role asks for a custom resource
  that no node declares; the job fails at start, naming it.
- test_driver_on_head_two_trainer_ranks_across_nodes: TWO trainer ranks, one on n2 and one
  on n3 (`trainer_rank` exists on those two nodes only, one each), the two rollout
  workers on n3, the buffer on the head; 20 steps. The ranks meet in a gloo rendezvous on
  rank 0's address, so this also covers torch.distributed across nodes.
- test_ray_job_submit: the same job (one trainer rank, on n2) through the head's job server.
- test_rollout_node_dies_and_comes_back: one trainer rank on n2; n3's raylet is SIGKILLed
  mid-run (both rollout workers die with it), n3 is started again, new workers start there
  and the job finishes; the buffer's accounting shows no prompt lost and no group trained
  twice.
- test_trainer_node_dies_the_job_stops_naming_it_and_resumes: n2's raylet is SIGKILLed
  after the step-5 checkpoint; the job stops within 60 s naming n2 and the resume command;
  with n2 back, that command finishes the job.
The run dir is on the filesystem every node shares (design (a) of DESIGN.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import BIN, NODE_IPS, REPO, NetnsCluster
from tests.physarum.test_job import TINY

HEAD, N2, N3 = NODE_IPS["head"], NODE_IPS["n2"], NODE_IPS["n3"]
# a rollout worker's line in run_dir/logs/rollout-N.log (physarum.logs)
ACTOR_LINE = re.compile(r"\[rollout-\d+ pid=(\d+) ip=([\d.]+)\]")
STEPS = 20
PROMPTS_PER_STEP = 4  # TINY's trainer.prompts_per_step


def overrides(run_dir: Path, *extra: str) -> list[str]:
    """TINY (without the embedded Ray's CPU count) on the cluster's custom resources."""
    tiny = [x for x in TINY if not x.startswith("cluster.num_cpus=")]
    return [
        f"run_dir={run_dir}",
        *tiny,
        f"trainer.steps={STEPS}",
        "rollout.eval.interval=0",
        "checkpoint.interval=5",
        "rollout.num_workers=2",
        'cluster.buffer_resources={"buffer_node": 1}',
        'cluster.rollout_resources={"rollout_node": 1}',
        'cluster.trainer_resources={"trainer_node": 1}',
        *extra,
    ]


def physarum_run(sets: list[str], binary: str = str(BIN / "physarum")) -> list[str]:
    argv = [binary, "run", "configs/toy_grpo.yaml"]
    for item in sets:
        argv += ["--set", item]
    return argv


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written while the job runs
            continue
    return out


def train_steps(run_dir: Path) -> list[int]:
    return sorted({r["step"] for r in records(run_dir) if "reward" in r})


def placement(run_dir: Path) -> dict[str, list[dict]]:
    rows = json.loads((run_dir / "placement.json").read_text())
    by_role: dict[str, list[dict]] = {}
    for row in rows:
        assert set(row) >= {"role", "rank", "node_id", "node_ip", "pid", "device", "gpu_ids"}
        by_role.setdefault(row["role"], []).append(row)
    return by_role


def check_every_step(run_dir: Path, steps: int, ranks: int = 1) -> None:
    assert train_steps(run_dir) == list(range(1, steps + 1))
    for record in records(run_dir):
        if "reward" in record:
            # 4 samples a prompt; the step's metrics are rank 0's, which trains its share
            assert record["data/episodes"] == PROMPTS_PER_STEP * 4 / ranks
            assert record["buffer/staleness_max"] <= 1


def check_placement(run_dir: Path, trainer_ips: list[str]) -> None:
    where = placement(run_dir)
    assert sorted(r["rank"] for r in where["trainer"]) == list(range(len(trainer_ips)))
    assert sorted(r["node_ip"] for r in where["trainer"]) == trainer_ips
    assert [r["node_ip"] for r in where["rollout"]] == [N3, N3]
    assert [r["node_ip"] for r in where["buffer"]] == [HEAD]
    assert [r["node_ip"] for r in where["driver"]] == [HEAD]
    assert len({r["node_id"] for rows in where.values() for r in rows}) == 3
    for rows in where.values():
        for row in rows:
            assert row["device"] == "cpu" and row["gpu_ids"] == []


def test_a_resource_no_node_has_fails_at_once_naming_it(
    netns_cluster: NetnsCluster, tmp_path: Path
) -> None:
    sets = overrides(tmp_path / "run", 'cluster.rollout_resources={"rollout_gpu_node": 1}')
    started = time.monotonic()
    done = netns_cluster.run("head", physarum_run(sets), timeout=120)
    assert done.returncode != 0
    assert time.monotonic() - started < 60, "the job did not fail at start"
    assert "rollout_gpu_node: need 2, the cluster has 0" in done.stdout, done.stdout[-4000:]


def test_driver_on_head_two_trainer_ranks_across_nodes(
    netns_cluster: NetnsCluster, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    sets = overrides(
        run_dir,
        "trainer.num_ranks=2",
        'cluster.trainer_resources={"trainer_rank": 1}',
        "cluster.rendezvous_timeout_s=60",
    )
    started = time.monotonic()
    done = netns_cluster.run("head", physarum_run(sets), timeout=420)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-6000:]
    print(f"two-rank {STEPS}-step job on the netns cluster: {took:.0f} s")
    assert "joining the Ray cluster" in done.stdout  # not an embedded Ray
    check_every_step(run_dir, STEPS, ranks=2)
    check_placement(run_dir, [N2, N3])
    assert (run_dir / "checkpoints" / f"step_{STEPS}" / "COMPLETE").exists()
    assert (run_dir / "hf" / "config.json").exists()


def test_ray_job_submit(netns_cluster: NetnsCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sets = overrides(run_dir)
    submit = [
        "ray",
        "job",
        "submit",
        f"--address={netns_cluster.dashboard}",
        f"--working-dir={REPO}",
        "--",
        *physarum_run(sets, binary="physarum"),
    ]
    started = time.monotonic()
    for _ in range(30):  # the head answers HTTP before its job agent is up
        done = netns_cluster.run("head", submit, timeout=420)
        if "No available agent to submit job" not in done.stdout:
            break
        time.sleep(2)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-6000:]
    print(f"ray job submit, {STEPS} steps: {took:.0f} s")
    assert "succeeded" in done.stdout.lower()
    assert "joining the Ray cluster" in done.stdout
    check_every_step(run_dir, STEPS)
    check_placement(run_dir, [N2])


def _raylet(netns_cluster: NetnsCluster, node: str) -> int | None:
    for pid in netns_cluster.pids(node):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                return pid
        except OSError:
            continue
    return None


def _buffer_stats(run_dir: Path, namespace: str):
    """The job's buffer as it was left: its redis-server, restarted on the run's AOF (on
    127.0.0.1 of this test process, outside the namespaces)."""
    from buffer.redis_server import EmbeddedRedis
    from buffer.store import EpisodeStore

    data_dir = run_dir / "redis"
    assert any(data_dir.rglob("*.aof")), f"no AOF under {data_dir}"
    server = EmbeddedRedis(data_dir)
    url = server.start()
    try:
        return EpisodeStore(url, namespace).stats()
    finally:
        server.stop()


def test_rollout_node_dies_and_comes_back(netns_cluster: NetnsCluster, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Short leases: the dead workers' prompts return while the job still runs.
    sets = overrides(run_dir, "rollout.lease_seconds=4")
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        netns_cluster.command("head", physarum_run(sets)),
        env=netns_cluster.env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    killed_at = restarted_at = None
    try:
        deadline = time.monotonic() + 300
        # A step takes well under a second once the job is up: kill n3 right after step 2.
        while not train_steps(run_dir) or train_steps(run_dir)[-1] < 2:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "the job did not reach step 2 in 300 s"
            time.sleep(0.1)
        raylet = _raylet(netns_cluster, "n3")
        assert raylet is not None, "no raylet in n3"
        os.kill(raylet, signal.SIGKILL)
        killed_at = train_steps(run_dir)[-1]
        time.sleep(8)  # the head declares n3 dead after 5 missed 1 s health checks
        netns_cluster.kill_node("n3")  # what the raylet left (agents, dying workers)
        netns_cluster.start_node("n3")
        restarted_at = train_steps(run_dir)[-1]
        driver.wait(timeout=360)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
        if _raylet(netns_cluster, "n3") is None:  # leave a whole cluster to later tests
            netns_cluster.kill_node("n3")
            netns_cluster.start_node("n3")
    output = (tmp_path / "driver.log").read_text()
    assert driver.returncode == 0, output[-6000:]
    print(f"n3 killed after step {killed_at}, back after step {restarted_at}")
    check_every_step(run_dir, STEPS)
    assert restarted_at < STEPS - 2, "the job finished before n3 came back; kill it earlier"
    train = [r for r in records(run_dir) if "reward" in r]
    assert train[-1]["rollout/restarts"] >= 1
    # New rollout workers ran on n3 after it came back (no other node has rollout_node).
    before = {r["pid"] for r in placement(run_dir)["rollout"]}
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("rollout-*.log*"))
    after = {int(pid) for pid, ip in ACTOR_LINE.findall(logs) if ip == N3} - before
    assert after, "no new rollout worker logged from n3"

    stats = _buffer_stats(run_dir, "toy_grpo")
    print(f"buffer after the job: {stats}")
    # No prompt lost: each prompt is done, leased or queued. Leases the dead workers held
    # expired and their prompts went back to the queue (lease_expiries; none when the kill
    # found them waiting for the trainer); a group dropped as too stale (the new workers'
    # first groups can be, while the shares settle) sends its prompt back too, so that
    # prompt is done twice.
    assert stats.stale_requeued == stats.drops_stale, stats
    assert stats.prompts_total == 200
    done_once = stats.prompts_done - stats.stale_requeued
    assert stats.prompts_total == (
        done_once + stats.prompts_leased + stats.prompts_queued + stats.prompts_filtered
    ), stats
    # No group trained twice: one group a completed lease; every group put is acknowledged
    # (and deleted), still unconsumed, or dropped, exactly once; exactly the job's steps'
    # worth acknowledged; nothing left pending.
    assert stats.groups_put == stats.prompts_done, stats
    assert stats.groups_put == (
        stats.groups_acked + stats.groups_unconsumed + stats.drops_stale + stats.corrupt
    ), stats
    assert stats.groups_acked == STEPS * PROMPTS_PER_STEP, stats
    assert stats.groups_pending == 0, stats
    assert stats.version == STEPS


def test_trainer_node_dies_the_job_stops_naming_it_and_resumes(
    netns_cluster: NetnsCluster, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        netns_cluster.command("head", physarum_run(overrides(run_dir))),
        env=netns_cluster.env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / "step_5" / "COMPLETE").exists():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "no checkpoint at step 5 within 300 s"
            time.sleep(0.1)
        raylet = _raylet(netns_cluster, "n2")
        assert raylet is not None, "no raylet in n2"
        os.kill(raylet, signal.SIGKILL)
        killed = time.monotonic()
        driver.wait(timeout=120)
        stopped_after = time.monotonic() - killed
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        log.close()
        netns_cluster.kill_node("n2")  # what the raylet left; then n2 rejoins
        netns_cluster.start_node("n2")
    output = (tmp_path / "driver.log").read_text()
    last = train_steps(run_dir)[-1]
    print(f"trainer node killed after step {last}: the job stopped {stopped_after:.0f} s later")
    assert driver.returncode != 0, output[-6000:]
    assert stopped_after < 60, output[-6000:]
    assert f"on node {N2} was lost" in output, output[-6000:]
    assert f"physarum run --resume {run_dir}" in output, output[-6000:]

    # What the message says to run, with n2 back: the job ends where it would have.
    started = time.monotonic()
    done = netns_cluster.run(
        "head", [str(BIN / "physarum"), "run", "--resume", str(run_dir)], timeout=300
    )
    assert done.returncode == 0, done.stdout[-6000:]
    print(f"resumed and finished in {time.monotonic() - started:.0f} s")
    assert "resumed from" in done.stdout
    check_every_step(run_dir, STEPS)
    check_placement(run_dir, [N2])
    assert (run_dir / "checkpoints" / f"step_{STEPS}" / "COMPLETE").exists()


def _job_process(argv: list[bytes]) -> bool:
    """A process of a job (not of Ray itself): its driver, an actor, its redis-server."""
    first = argv[0].strip() if argv else b""
    if first.startswith(b"ray::"):  # Ray's own agents and idle workers stay
        return first not in (b"ray::IDLE", b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")
    if Path(first.decode(errors="replace")).name.startswith("redis-server"):
        return True
    return any(a.endswith(b"/physarum") for a in argv[:2])


@pytest.fixture(autouse=True)
def _no_orphans(netns_cluster: NetnsCluster):
    """After each job no actor, driver or redis-server of it is left in any node."""
    yield
    deadline = time.monotonic() + 30
    while True:
        left = {}
        for node in NODE_IPS:
            for pid in netns_cluster.pids(node):
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if _job_process(argv):
                    left[pid] = (node, b" ".join(argv)[:160])
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not left, f"processes of a finished job still run: {left}"
