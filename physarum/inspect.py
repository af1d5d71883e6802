"""`physarum inspect RUN_DIR --step N`: the tokens and sequences whose trainer logprob
differed most from the rollout engine's in one RL step, decoded in context.

It reads what the trainer wrote after that step (trainer/forensics.py:
run_dir/mismatch/step_<N>.jsonl, one file per trainer rank) and the run's tokenizer
(run_dir/tokenizer). Each token shows |Δlogprob|, both logprobs, its policy version and
staleness, the sequence's finish reason and, with R3 (algorithm.moe.routing_replay rollout),
whether its logprob ran on the engine's experts. Without a tokenizer the ids are printed.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from physarum.errors import UserError

MISMATCH_DIR = "mismatch"  # trainer/forensics.py's (not imported: it loads torch)
_STEP_FILE = re.compile(r"^step_(\d+)(?:\.rank(\d+))?\.jsonl$")

Decode = Callable[[list[int]], str]


class InspectError(ValueError):
    """A run dir or step that has no mismatch records; the message says what to do."""


def recorded_steps(run_dir: Path) -> dict[int, list[Path]]:
    """step -> its record files (rank 0 first) under run_dir/mismatch."""
    steps: dict[int, list[tuple[int, Path]]] = {}
    folder = Path(run_dir) / MISMATCH_DIR
    for path in folder.glob("step_*.jsonl") if folder.is_dir() else ():
        match = _STEP_FILE.match(path.name)
        if match:
            rank = int(match.group(2) or 0)
            steps.setdefault(int(match.group(1)), []).append((rank, path))
    return {s: [p for _, p in sorted(files)] for s, files in steps.items()}


def load_step(run_dir: Path, step: int | None) -> tuple[int, list[dict[str, Any]]]:
    """(step, its records of every rank, largest |Δlogprob| first); step None = the latest."""
    steps = recorded_steps(run_dir)
    if not steps:
        raise InspectError(
            f"{run_dir}: no {MISMATCH_DIR}/step_<N>.jsonl; an RL job writes them after each "
            "step unless logging.mismatch_top is 0"
        )
    if step is None:
        step = max(steps)
    if step not in steps:
        have = sorted(steps)
        raise InspectError(f"--step {step}: not recorded; recorded steps are {have[0]}..{have[-1]}")
    records = []
    for rank, path in enumerate(steps[step]):
        for line in path.read_text().splitlines():
            if line.strip():
                records.append({**json.loads(line), "rank": rank})
    records.sort(key=lambda r: -r["abs_diff"])
    return step, records


def _decoder(run_dir: Path) -> Decode:
    tokenizer_dir = Path(run_dir) / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return lambda ids: " ".join(f"<{i}>" for i in ids)
    from models.tokenizer import load_tokenizer  # transformers: only when there is one

    tokenizer = load_tokenizer(tokenizer_dir)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def _flags(r: dict[str, Any]) -> str:
    staleness = "" if r["staleness"] is None else f" (staleness {r['staleness']})"
    replay = {None: "", True: "  routing replayed", False: "  routing NOT replayed"}
    return f"version {r['version']}{staleness}  finish {r['finish_reason']}{replay[r['replayed']]}"


def format_step(step: int, records: list[dict[str, Any]], decode: Decode, top: int) -> str:
    """The report: sequences by their largest |Δlogprob|, then the top tokens in context."""
    lines = [f"step {step}: {len(records)} recorded tokens, largest |Δlogprob| first"]
    seqs: dict[tuple[int, int], dict[str, Any]] = {}
    for r in records:
        seqs.setdefault((r["rank"], r["sample_index"]), r)
    lines.append("\nsequences (rank/sample: max |Δ|, mean |Δ| over its trainable tokens)")
    for (rank, sample), r in list(seqs.items())[:top]:
        lines.append(
            f"  {rank}/{sample}: max {r['seq_abs_diff_max']:.4f}  mean "
            f"{r['seq_abs_diff_mean']:.4f}  response {r['response_len']} tokens  {_flags(r)}"
        )
    lines.append("\ntokens ([[token]] in its context)")
    for i, r in enumerate(records[:top], 1):
        lines.append(
            f"#{i} |Δ|={r['abs_diff']:.4f}  trainer {r['trainer_logprob']:.4f}  rollout "
            f"{r['rollout_logprob']:.4f}  rank/sample {r['rank']}/{r['sample_index']}  "
            f"position {r['position']}/{r['response_len']}  {_flags(r)}"
        )
        text = decode(r["context_ids"]) + "[[" + decode([r["token_id"]]) + "]]"
        lines.append("    " + (text + decode(r["after_ids"])).replace("\n", "\\n"))
    return "\n".join(lines)


def inspect_run(run_dir: Path, step: int | None = None, top: int = 10) -> str:
    """The report of `step` (None = the latest recorded) of the run in run_dir."""
    step, records = load_step(run_dir, step)
    return format_step(step, records, _decoder(run_dir), top)


def add_inspect_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "inspect", help="tokens with the largest trainer-rollout logprob mismatch of a step"
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--step", type=int, default=None, help="trainer step (default: latest)")
    parser.add_argument("--top", type=int, default=10, help="how many tokens and sequences")
    parser.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserError(f"--top: expected >= 1, got {args.top}")
    try:
        print(inspect_run(args.run_dir, args.step, args.top))
    except InspectError as e:
        raise UserError(str(e)) from e
    return 0
