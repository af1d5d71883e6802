"""`make demo`: SFT -> rejection sampling -> GRPO on 2-digit addition, on one embedded Ray.

Each stage starts from the previous stage's final model and shares its tokenizer and its
held-out set (the same task, seed and size give the same eval.jsonl), so the three held-out
accuracies are directly comparable. Prints the accuracy after each stage and the wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import configs
from configs import load_job
from physarum.cluster import connect
from physarum.launch import execute
from physarum.metrics import format_duration

log = logging.getLogger("physarum.demo")

PRESETS = Path(configs.__file__).parent
STAGES = (
    ("sft", "toy_sft.yaml"),
    ("rejection_sampling", "toy_rejection_sampling.yaml"),
    ("grpo", "toy_grpo.yaml"),
)


def run_demo(root: Path, extra: dict[str, list[str]] | None = None) -> list[dict]:
    results: list[dict] = []
    previous: Path | None = None
    started = time.monotonic()
    for stage, preset in STAGES:
        overrides = [f"run_dir={root / stage}", f"name=demo_{stage}"]
        if previous is not None:
            overrides += [f"model.path={previous / 'hf'}", f"tokenizer.path={previous / 'hf'}"]
        overrides += (extra or {}).get(stage, [])
        job = load_job(PRESETS / preset, overrides)
        if stage == STAGES[0][0]:
            handle = connect(job.cluster, min_cpus=2)
        log.info("=== demo stage %s (%s) ===", stage, preset)
        result = execute(job, stage=stage, overwrite=True)  # a rerun replaces its stages
        results.append(
            {
                "stage": stage,
                "accuracy": result.get("eval/accuracy"),
                "wall_s": round(result["wall_s"], 1),
            }
        )
        print(
            f"demo: after {stage:<18} held-out accuracy {result['eval/accuracy']:.3f} "
            f"({format_duration(result['wall_s'])})",
            flush=True,
        )
        previous = root / stage
    handle.shutdown()
    total = time.monotonic() - started
    gain = (results[-1]["accuracy"] - results[0]["accuracy"]) * 100
    print(f"demo: GRPO vs SFT: {gain:+.1f} points; total wall time {format_duration(total)}")
    (root / "demo_summary.json").write_text(
        json.dumps(
            {"stages": results, "wall_s": round(total, 1), "gain_points": round(gain, 1)}, indent=1
        )
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        datefmt="%H:%M:%S",
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
    )
    run_demo(args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
