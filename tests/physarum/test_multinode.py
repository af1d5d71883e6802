"""What multi-node needs that one node can check: absolute paths, placement bundles with
custom resources, requests the cluster cannot satisfy, the run-dir check, the Redis
password, the trainer rendezvous naming a rank that never arrives, a lost trainer rank."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
import ray
import redis

from configs import load_job
from physarum.errors import ClusterError, UserError
from physarum.launch import resolve
from physarum.rundir import RunDir
from physarum.services.buffer_service import BufferService
from physarum.services.nodes import check_run_dir
from physarum.services.placement import Placement, group_specs
from physarum.services.rendezvous import join
from physarum.services.trainer_start import check_lost, join_group

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "toy_grpo.yaml"


def _job(*overrides: str):
    return load_job(PRESET, list(overrides))


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, resources={"trainer_node": 1}, include_dashboard=False, namespace="mn")
    yield
    ray.shutdown()


def test_paths_handed_to_actors_are_absolute(tmp_path: Path) -> None:
    job = _job("run_dir=runs/x", "model.path=ckpt", "tokenizer.path=/abs/tok")
    job = job.model_copy(update={"data": job.data.model_copy(update={"train_path": "d.jsonl"})})
    out = job.with_absolute_paths(tmp_path)
    assert out.run_dir == str(tmp_path / "runs/x") and out.resolved_run_dir == tmp_path / "runs/x"
    assert out.model.path == str(tmp_path / "ckpt") and out.tokenizer.path == "/abs/tok"
    assert out.data.train_path == str(tmp_path / "d.jsonl") and out.data.eval_path is None
    assert _job().with_absolute_paths(tmp_path).run_dir == str(tmp_path / "runs" / "toy_grpo")
    assert _job("run_dir=rel").resolved_run_dir.is_absolute()


def test_resume_takes_the_run_dir_where_it_is_now(tmp_path: Path, monkeypatch) -> None:
    run = RunDir(tmp_path / "moved").create()
    run.save_job(_job("run_dir=/somewhere/else"))
    monkeypatch.chdir(tmp_path)
    job, resume = resolve(None, [], "moved")
    assert resume and job.run_dir == str(tmp_path / "moved")


def test_bundles_carry_custom_resources_and_tp_groups_pack() -> None:
    job = _job(
        "trainer.backend=megatron",
        "trainer.num_ranks=4",
        "trainer.megatron.tp=2",
        "rollout.num_workers=3",
        "cluster.trainer_resources={trainer_node: 1}",
        "cluster.rollout_resources={rollout_node: 0.5}",
        "cluster.buffer_resources={head: 1}",
        "cluster.rollout_strategy=SPREAD",
        "cluster.trainer_gpus=1",
    )
    specs = {s.name: s for s in group_specs(job, trainers=4, workers=3, buffer=True)}
    assert list(specs) == ["trainer-tp0", "trainer-tp1", "rollout", "buffer"]
    assert specs["trainer-tp1"].strategy == "STRICT_PACK"
    assert list(specs["trainer-tp1"].bundles) == ["trainer-2", "trainer-3"]
    assert specs["trainer-tp0"].bundles["trainer-0"] == {"CPU": 1.0, "GPU": 1.0, "trainer_node": 1}
    assert specs["rollout"].strategy == "SPREAD" and len(specs["rollout"].bundles) == 3
    assert specs["rollout"].bundles["rollout-2"] == {"CPU": 1.0, "rollout_node": 0.5}
    assert specs["buffer"].bundles["buffer"]["head"] == 1


def test_resource_names_are_checked() -> None:
    with pytest.raises(ValueError, match="cluster.trainer_resources"):
        _job("cluster.trainer_resources={GPU: 1}")
    with pytest.raises(ValueError, match="must be > 0"):
        _job("cluster.rollout_resources={rollout_node: 0}")


def test_placement_reserves_custom_resources(local_ray) -> None:
    job = _job("cluster.trainer_resources={trainer_node: 1}")
    placement = Placement(job, trainers=1, workers=1)
    try:
        nodes = placement.node_ids()
        assert set(nodes) == {"trainer-0", "rollout-0"}
        assert set(nodes.values()) == {ray.get_runtime_context().get_node_id()}
        assert ray.available_resources().get("trainer_node", 0) == 0
    finally:
        placement.remove()


def test_a_resource_the_cluster_lacks_fails_at_once_naming_it(local_ray) -> None:
    job = _job("cluster.rollout_resources={rollout_node: 2}")
    started = time.monotonic()
    with pytest.raises(UserError, match="rollout_node: need 2, the cluster has 0"):
        Placement(job, trainers=1, workers=1)
    assert time.monotonic() - started < 60


def test_a_request_that_cannot_be_placed_fails_in_time_naming_the_nodes(local_ray) -> None:
    job = _job("cluster.trainer_resources={trainer_node: 1}", "trainer.num_ranks=1")
    first = Placement(job, trainers=1, workers=0)  # holds the only trainer_node
    try:
        started = time.monotonic()
        with pytest.raises(UserError, match=r"not placed within 2 s.*trainer_node 0/1"):
            Placement(job, trainers=1, workers=0, timeout_s=2)
        assert time.monotonic() - started < 60
    finally:
        first.remove()


def test_run_dir_check_names_a_node_that_cannot_see_it(local_ray, tmp_path: Path) -> None:
    here = ray.get_runtime_context().get_node_id()
    check_run_dir(tmp_path, {here})
    assert not (tmp_path / ".node_check").exists()
    ghost = "ab" * 28  # a node id no node has: the check cannot run there
    with pytest.raises(UserError, match=f"run dir {tmp_path} is not shared.*{ghost[:12]}"):
        check_run_dir(tmp_path, {here, ghost}, timeout_s=20)


def test_private_redis_has_a_0600_password_that_is_required_and_kept(tmp_path: Path) -> None:
    job = _job(f"run_dir={tmp_path}")
    run = RunDir(tmp_path).create()
    first = BufferService(job, run)
    try:
        path = run.redis_password
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        password = path.read_text()
        assert f":{password}@127.0.0.1:" in first.url
        anonymous = redis.Redis(host="127.0.0.1", port=int(first.url.rsplit(":", 1)[1][:-2]))
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        assert first.store.stats() is not None
    finally:
        first.stop()
    second = BufferService(job, run)  # a resumed job: same password, same data
    try:
        assert run.redis_password.read_text() == password and password in second.url
    finally:
        second.stop()


def test_rendezvous_names_the_rank_that_never_arrives() -> None:
    from physarum.services.network import free_port

    started = time.monotonic()
    missing = join(
        ("127.0.0.1", free_port("127.0.0.1")),
        rank=0,
        world_size=3,
        backend="gloo",
        timeout_s=1.5,
        node_ip="127.0.0.1",
    )
    assert missing == [1, 2] and time.monotonic() - started < 10


@ray.remote(num_cpus=0)
class _Rank:
    """Stands in for a TrainerActor: rank 1 never joins (as if its node were unreachable)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def where(self) -> dict:
        from physarum.services.nodes import where

        return where("trainer", self.rank)

    def address(self) -> tuple[str, int]:
        from physarum.services.network import free_port

        return "127.0.0.1", free_port("127.0.0.1")

    def join(self, master: tuple[str, int], timeout_s: float) -> list[int]:
        if self.rank == 1:
            time.sleep(3600)
        return join(master, rank=0, world_size=2, backend="gloo", timeout_s=timeout_s, node_ip="x")

    def die(self) -> None:
        import os

        os._exit(1)


def test_join_group_names_the_missing_rank_and_its_node(local_ray) -> None:
    ranks = [_Rank.remote(0), _Rank.remote(1)]
    ip = ray.util.get_node_ip_address()
    try:
        with pytest.raises(ClusterError, match=rf"rank 1 \(node {ip}\) did not join .*within 2 s"):
            join_group(ranks, timeout_s=2)
    finally:
        for actor in ranks:
            ray.kill(actor)


def test_a_lost_trainer_rank_stops_the_job_with_the_resume_command(local_ray) -> None:
    job = _job("run_dir=/runs/x")
    rank = _Rank.remote(0)
    ref = rank.die.remote()
    ray.wait([ref], timeout=30)
    with pytest.raises(
        ClusterError, match=r"rank 0 on node 10\.0\.0\.9 was lost.*--resume /runs/x"
    ):
        check_lost([rank], [ref], [ref], job, {0: "10.0.0.9"})
