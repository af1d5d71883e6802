"""The job config: every preset loads; errors name the dotted field, the line, what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

import configs
from configs import ConfigError, load_job

PRESETS = sorted(Path(configs.__file__).parent.glob("*.yaml"))


def test_there_are_presets() -> None:
    names = {p.name for p in PRESETS}
    expected = {
        "toy_sft.yaml",
        "toy_rejection_sampling.yaml",
        "toy_grpo.yaml",
        "toy_ppo.yaml",
        "toy_agentic.yaml",
        "toy_agentic_sft.yaml",
        "glm46_grpo.yaml",
    }
    assert expected <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(path: Path) -> None:
    job = load_job(path)
    assert job.name == path.stem
    assert job.mode in ("sft", "rejection_sampling", "rl", "eval")


def test_cluster_preset_uses_megatron_fp8_sglang_and_slime_plan() -> None:
    job = load_job(Path(configs.__file__).parent / "glm46_grpo.yaml")
    mc = job.trainer.megatron
    assert job.trainer.backend == "megatron"
    assert (job.rollout.engine, job.rollout.fp8) == ("sglang", True)
    assert (mc.tp, mc.pp, mc.ep) == (8, 4, 16)
    assert job.trainer.num_ranks % (mc.tp * mc.pp) == 0


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


BASE = "mode: rl\nname: t\nreward:\n  plugins: [{name: arithmetic}]\n"


def test_unknown_key_names_field_line_and_suggests(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "rollout:\n  max_new_tokns: 8\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    message = str(info.value)
    assert "rollout.max_new_tokns: unknown key" in message
    assert f"{path}:6:3" in message
    assert "did you mean 'max_new_tokens'" in message


def test_wrong_type_names_field_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "trainer:\n  steps: many\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert "trainer.steps" in str(info.value)
    assert "'many'" in str(info.value)


def test_out_of_range_names_field_bound_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "rollout:\n  temperature: -0.5\n")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert "rollout.temperature: Input should be greater than or equal to 0 (got -0.5)" in str(
        info.value
    )


def test_bad_literal_lists_allowed_values(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE + "trainer:\n  backend: jax\n")
    with pytest.raises(ConfigError, match="trainer.backend: Input should be 'torch' or 'megatron'"):
        load_job(path)


def test_yaml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "mode: rl\nname: t\n  oops: [\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error at line 3, column \d+"):
        load_job(path)


def test_overrides_coerce_types_and_name_bad_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, BASE)
    job = load_job(path, ["trainer.lr=3e-4", "rollout.dynamic_sampling=true", "buffer.capacity=7"])
    assert job.trainer.lr == pytest.approx(3e-4)
    assert job.rollout.dynamic_sampling is True
    assert job.buffer.capacity == 7
    with pytest.raises(ConfigError, match=r"--set: trainer\.nope: unknown key"):
        load_job(path, ["trainer.nope=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_job(path, ["trainer.lr"])


def test_cross_section_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reward.plugins"):
        load_job(_write(tmp_path, "mode: rl\nname: t\n"))
    with pytest.raises(ConfigError, match="max_new_tokens .* must be below max_context"):
        load_job(_write(tmp_path, BASE + "rollout: {max_new_tokens: 64, max_context: 64}\n"))
    with pytest.raises(ConfigError, match="trainer.num_ranks"):
        load_job(
            _write(
                tmp_path,
                BASE + "trainer:\n  backend: megatron\n  num_ranks: 3\n  megatron: {tp: 2}\n",
            )
        )
    with pytest.raises(ConfigError, match="n_samples_per_prompt"):
        load_job(_write(tmp_path, BASE + "rollout: {n_samples_per_prompt: 1}\n"))


def test_validation_never_mutates_input(tmp_path: Path) -> None:
    data = {"mode": "sft", "name": "x", "trainer": {"lr": 0.1}}
    snapshot = repr(data)
    configs.validate_job(data)
    assert repr(data) == snapshot


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_job(tmp_path / "nope.yaml")
