"""Bad configs (issue 18, items 6 and 8): each is refused at load or by the model checks, with
the error class, a message naming the field, and nothing written anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs import ConfigError, load_job
from physarum.model_checks import ModelFitError, check_model_fits

TOY = "configs/toy_grpo.yaml"
SFT = "configs/toy_sft.yaml"
GLM = "configs/glm46_grpo.yaml"

# (case id, preset, --set overrides, text the message must contain)
LOAD_CASES = [
    ("lr-inf", TOY, ["trainer.lr=.inf"], "trainer.lr: Input should be a finite number"),
    ("lr-nan", TOY, ["trainer.lr=.nan"], "trainer.lr: Input should be a finite number"),
    ("timeout-neg-inf", TOY, ["reward.timeout_s=-.inf"], "reward.timeout_s"),
    ("weight-inf", TOY, ["reward.plugins=[{name: arithmetic, weight: .inf}]"], "weight"),
    ("steps-bool", TOY, ["trainer.steps=true"], "trainer.steps: expected a number, got the bool"),
    ("seed-bool", TOY, ["seed=false"], "seed: expected a number, got the bool false"),
    ("lr-bool", TOY, ["trainer.lr=true"], "trainer.lr: expected a number, got the bool"),
    ("jsonl-int", TOY, ["logging.jsonl=1"], "logging.jsonl: expected true or false, got int"),
    ("sp-int", TOY, ["trainer.megatron.sequence_parallel=1"], "sequence_parallel: expected true"),
    ("steps-zero", TOY, ["trainer.steps=0"], "trainer.steps"),
    ("steps-float", TOY, ["trainer.steps=2.5"], "trainer.steps"),
    ("max-error-fraction", TOY, ["reward.max_error_fraction=1.5"], "reward.max_error_fraction"),
    ("unknown-key", TOY, ["trainer.learning_rate=0.1"], "trainer.learning_rate: unknown key"),
    ("unknown-section", TOY, ["trainr.lr=0.1"], "trainr: unknown key"),
    ("bad-mode", TOY, ["mode=dpo"], "mode"),
    ("bad-name", TOY, ["name=a b"], "name"),
    ("value-not-section", TOY, ["seed.x=1"], "'seed' is a value, not a section"),
    ("no-equals", TOY, ["trainer.lr"], "expected key.path=value"),
    ("ranks-vs-groups", TOY, ["trainer.num_ranks=16"], "trainer.prompts_per_step"),
    ("adam-beta", TOY, ["trainer.adam_beta1=1.0"], "trainer.adam_beta1"),
    ("megatron-ranks", GLM, ["trainer.megatron.pp=5"], "is not a multiple of tp*pp*cp"),
    ("megatron-ep", GLM, ["trainer.megatron.ep=3"], "trainer.megatron.ep: 3 must divide"),
]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("preset", "overrides", "needle"),
    [c[1:] for c in LOAD_CASES],
    ids=[c[0] for c in LOAD_CASES],
)
def test_config_refused_at_load(preset, overrides, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a loader that wrote a run dir would write it here
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError) as err:
        load_job(root / preset, [*overrides, f"run_dir={tmp_path / 'run'}"])
    assert needle in str(err.value)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("mode: rl\nname: x\n  bad: indent\n", "YAML syntax error at line"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("mode: rl\nname: x\ntrainer:\n  lr: .inf\n", ":4:3: trainer.lr"),
        ("mode: rl\nname: x\ndata: {task: arithmetic}\n", "reward.plugins"),
        ("mode: rl\n", "name: required but missing"),
    ],
    ids=["yaml-syntax", "top-level-list", "inf-with-line", "no-reward", "missing-name"],
)
def test_config_files_refused_with_place(tmp_path, text, needle):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert needle in str(err.value) and str(path) in str(err.value)
    assert path.read_text() == text and _listing(tmp_path) == ["job.yaml"]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read file"):
        load_job(tmp_path / "nope.yaml")


# (case id, preset, overrides, text): configs that load but do not fit their model
FIT_CASES = [
    ("tp-vs-kv-heads", GLM, ["trainer.megatron.tp=16"], "does not divide the model's num_key_"),
    ("tp-vs-heads", GLM, ["trainer.num_ranks=112", "trainer.megatron.tp=7"], "num_attention_h"),
    ("pp-vs-layers", GLM, ["trainer.megatron.pp=8"], "trainer.megatron.pp: 8 does not divide"),
    ("ep-vs-experts", GLM, ["trainer.megatron.ep=64"], "does not divide the model's n_routed_"),
    ("sglang-tp", TOY, ["rollout.engine=sglang", "rollout.sglang.tp=3"], "rollout.sglang.tp: 3"),
    ("sft-batch-vs-ranks", SFT, ["trainer.num_ranks=3", "trainer.batch_size=8"], "batch_size: 8"),
]


@pytest.mark.parametrize(
    ("preset", "overrides", "needle"), [c[1:] for c in FIT_CASES], ids=[c[0] for c in FIT_CASES]
)
def test_parallel_plan_that_does_not_fit_the_model(preset, overrides, needle):
    root = Path(__file__).resolve().parents[2]
    job = load_job(root / preset, overrides)
    with pytest.raises(ModelFitError) as err:
        check_model_fits(job)
    assert needle in str(err.value)


def test_model_too_big_for_this_cpu_is_refused_with_the_estimate():
    root = Path(__file__).resolve().parents[2]
    job = load_job(root / TOY, ["model.preset=glm-4.6", "cluster.device=cpu"])
    with pytest.raises(ModelFitError) as err:
        check_model_fits(job, available=64 * 2**30)
    message = str(err.value)
    assert "preset glm-4.6" in message and "does not fit this machine" in message
    assert "64.0 GiB is available" in message and "physarum plan" in message


def test_toy_model_fits():
    root = Path(__file__).resolve().parents[2]
    check_model_fits(load_job(root / TOY), available=8 * 2**30)
