"""`physarum plan --placement`: which node gets which trainer rank and rollout engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import load_job
from physarum.cli import main
from physarum.errors import UserError
from physarum.placement_plan import plan_placement

REPO = Path(__file__).resolve().parents[2]
GLM = str(REPO / "configs" / "glm46_grpo.yaml")


def _job(*overrides: str):
    base = ["trainer.backend=megatron", "cluster.trainer_gpus=1", "cluster.rollout_gpus=2"]
    return load_job(REPO / "configs" / "toy_grpo.yaml", [*base, *overrides])


def test_tp_groups_stay_whole_and_engines_pack() -> None:
    job = _job("trainer.num_ranks=4", "trainer.megatron.tp=2", "rollout.num_workers=3")
    nodes = plan_placement(job, nodes=4, gpus_per_node=4)
    assert [n.trainer_ranks for n in nodes] == [[0, 1, 2, 3], [], [], []]
    assert [n.engines for n in nodes] == [[], [0, 1], [2], []]
    assert [n.used for n in nodes] == [4, 4, 2, 0]


def test_engines_spread_round_robin() -> None:
    job = _job("rollout.num_workers=4", "cluster.rollout_strategy=SPREAD", "trainer.num_ranks=1")
    nodes = plan_placement(job, nodes=4, gpus_per_node=4)
    assert [n.engines for n in nodes] == [[3], [0], [1], [2]]


def test_a_tp_group_wider_than_a_node_is_refused() -> None:
    job = _job("trainer.num_ranks=8", "trainer.megatron.tp=8")
    with pytest.raises(UserError, match="TP group .* would span nodes of 4 GPUs"):
        plan_placement(job, nodes=4, gpus_per_node=4)


def test_fragmentation_that_would_split_a_group_is_refused() -> None:
    # 3-GPU nodes hold one TP-2 group each; the spare GPU never takes half of the next group
    job = _job(
        "trainer.num_ranks=6",
        "trainer.megatron.tp=2",
        "rollout.num_workers=1",
        "cluster.rollout_gpus=1",
    )
    nodes = plan_placement(job, nodes=3, gpus_per_node=3)
    assert [n.trainer_ranks for n in nodes] == [[0, 1], [2, 3], [4, 5]]
    assert [n.engines for n in nodes] == [[0], [], []]
    tight = _job(
        "trainer.num_ranks=8",
        "trainer.megatron.tp=2",
        "rollout.num_workers=1",
        "cluster.rollout_gpus=1",
    )  # 9 GPUs asked, 9 there, but group 3 fits on no node whole
    with pytest.raises(UserError, match=r"TP group 3 \(ranks 6-7\) fits on no node whole"):
        plan_placement(tight, nodes=3, gpus_per_node=3)


def test_too_few_gpus_in_total_is_refused() -> None:
    with pytest.raises(UserError, match=r"needs 160 GPUs .* have 32"):
        plan_placement(load_job(GLM, []), nodes=4, gpus_per_node=8)


def test_cli_prints_one_line_per_node(capsys) -> None:
    assert main(["plan", "--placement", GLM, "--nodes", "20", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "node 0: trainer ranks 0-7  [8/8 GPUs]" in out
    assert "node 19: rollout engines 3  [8/8 GPUs]" in out
    assert main(["plan", "--placement", GLM, "--nodes", "2", "--gpus-per-node", "8"]) == 2
    assert "needs 160 GPUs" in capsys.readouterr().err
    assert main(["plan", "--placement", GLM]) == 2
