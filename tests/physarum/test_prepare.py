"""Job preparation: toy inputs in the run dir, and a final export that keeps its own weights."""

from __future__ import annotations

from pathlib import Path

from configs import load_job
from models.checkpoint import from_pretrained
from physarum.prepare import export_final, prepare
from physarum.rundir import RunDir


def test_prepare_builds_tokenizer_data_and_initial_model(tmp_path: Path) -> None:
    job = load_job(
        Path("configs/toy_sft.yaml"), [f"run_dir={tmp_path}", "data.n_train=50", "data.n_eval=10"]
    )
    prepared = prepare(job, RunDir(tmp_path).create())
    assert (prepared.tokenizer_dir / "tokenizer.json").exists()
    assert len(prepared.train_path.read_text().splitlines()) == 50
    assert len(prepared.eval_path.read_text().splitlines()) == 10
    model = from_pretrained(prepared.model_dir)
    assert model.config.vocab_size == prepared.vocab_size
    again = prepare(job, RunDir(tmp_path))  # a second prepare (resume) reuses everything
    assert again == prepared


def test_export_final_never_copies_weights_from_a_tokenizer_dir(tmp_path: Path) -> None:
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    for path, payload in ((stage1, b"old weights"), (stage2, b"new weights")):
        path.mkdir()
        (path / "model.safetensors").write_bytes(payload)
        (path / "config.json").write_text("{}")
    (stage1 / "tokenizer.json").write_text("{}")
    export_final(tmp_path / "init", stage1, stage2)
    assert (stage2 / "model.safetensors").read_bytes() == b"new weights"
    assert (stage2 / "tokenizer.json").exists()
