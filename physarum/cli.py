"""The `physarum` command line: run jobs, check configs, make data, serve an engine, plan memory.

Bad input ends with one readable line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from physarum.errors import UserError
from physarum.inspect import add_inspect_parser

log = logging.getLogger("physarum")


def _cmd_run(args: argparse.Namespace) -> int:
    from physarum.launch import run_job

    if args.resume and args.config:
        raise UserError("give either CONFIG or --resume RUN_DIR, not both")
    if not args.resume and not args.config:
        raise UserError("give a CONFIG file (or --resume RUN_DIR)")
    if args.resume and args.overwrite:
        raise UserError("--overwrite clears the run dir, --resume continues it: give one")
    return run_job(
        config_path=args.config,
        overrides=args.set,
        resume_dir=args.resume,
        overwrite=args.overwrite,
        dashboard=not args.no_dashboard,
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from physarum.status import print_status

    return print_status(args.run_dir, as_json=args.json)


def _cmd_config_validate(args: argparse.Namespace) -> int:
    from configs import load_job
    from physarum.model_checks import check_model_fits

    for path in args.files:
        job = load_job(path, args.set)
        check_model_fits(job)  # parallel sizes against the model, memory on this CPU
        print(f"ok  {path}  (mode={job.mode}, name={job.name})")
    return 0


def _cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from configs import load_job

    job = load_job(args.file, args.set)
    print(yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _cmd_data_make(args: argparse.Namespace) -> int:
    from envs.tasks import make_rows, write_jsonl
    from physarum.options import parse_key_values

    params = parse_key_values(args.arg, flag="--arg")
    rows = make_rows(args.task, args.n, seed=args.seed, split=args.split, **params)
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} {args.task} rows ({args.split}, seed {args.seed}) to {args.out}")
    return 0


def _cmd_serve_engine(args: argparse.Namespace) -> int:
    from rollout.server import serve_engine
    from rollout.server.auth import key_from_env

    serve_engine(
        args.model,
        host=args.host,
        port=args.port,
        api_key=key_from_env(args.api_key),
        no_auth=args.no_auth,
        fp8=args.fp8,
        max_running=args.max_running,
        tokenizer_dir=args.tokenizer,
        context_len=args.context_len,
        device=args.device,
        dtype=args.dtype,
        max_n=args.max_n,
        max_body_mb=args.max_body_mb,
    )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    if args.placement:
        from configs import load_job
        from physarum.placement_plan import plan_placement, render

        if args.config or args.nodes is None or args.gpus_per_node is None:
            raise UserError("plan --placement CONFIG needs --nodes N and --gpus-per-node G")
        job = load_job(args.placement, args.set)
        print(render(job, plan_placement(job, args.nodes, args.gpus_per_node)))
        return 0
    if not args.config:
        raise UserError("plan: give a megatron CONFIG, or --placement CONFIG --nodes N ...")
    from physarum.plan import print_plan

    return print_plan(args.config, args.set)


def _cmd_tokenizer_build(args: argparse.Namespace) -> int:
    from envs.tasks import tokenizer_corpus
    from models.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer(args.out, tokenizer_corpus(seed=0), vocab_size=args.vocab_size)
    print(f"wrote a {len(tok)}-token toy tokenizer to {args.out}")
    return 0


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set trainer.lr=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="physarum",
        description="Asynchronous RL post-training for GLM-4.x MoE models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(sub)
    _add_status_parser(sub)
    _add_config_parser(sub)
    _add_data_parser(sub)
    _add_serve_parser(sub)
    add_inspect_parser(sub)  # physarum inspect RUN_DIR --step N (mismatch forensics)
    _add_plan_parser(sub)
    _add_tokenizer_parser(sub)
    return parser


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run a job (SFT, rejection sampling, RL, eval)")
    run.add_argument("config", nargs="?", help="job YAML, e.g. configs/toy_grpo.yaml")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a job from its run dir")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a run_dir that holds an earlier run (deletes what is in it)",
    )
    run.add_argument("--no-dashboard", action="store_true", help="do not serve the live dashboard")
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # keeps `physarum -v run` working
        help="debug logging, and the services' output on the console (else in RUN_DIR/logs/)",
    )
    _add_set(run)
    run.set_defaults(func=_cmd_run)


def _add_status_parser(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="step, metrics, services and buffer of a job")
    status.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_cmd_status)


def _add_config_parser(sub: argparse._SubParsersAction) -> None:
    config = sub.add_parser("config", help="check and show job configs")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    validate = config_sub.add_parser("validate", help="validate one or more job YAML files")
    validate.add_argument("files", nargs="+")
    _add_set(validate)
    validate.set_defaults(func=_cmd_config_validate)
    show = config_sub.add_parser("show", help="print the resolved config with every default")
    show.add_argument("file")
    _add_set(show)
    show.set_defaults(func=_cmd_config_show)


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan", help="per-GPU memory plan of a megatron job, or (--placement) roles per node"
    )
    plan.add_argument("config", nargs="?")
    plan.add_argument("--placement", metavar="CONFIG", help="print which node gets what")
    plan.add_argument("--nodes", type=int, help="with --placement: nodes in the cluster")
    plan.add_argument("--gpus-per-node", type=int, help="with --placement: GPUs per node")
    _add_set(plan)
    plan.set_defaults(func=_cmd_plan)


def _add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    tokenizer = sub.add_parser("tokenizer", help="tokenizers")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    build = tok_sub.add_parser("build", help="build the toy GLM-style tokenizer")
    build.add_argument("out", type=Path)
    build.add_argument("--vocab-size", type=int, default=512)
    build.set_defaults(func=_cmd_tokenizer_build)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="toy datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    make = data_sub.add_parser("make", help="generate a toy task as JSONL")
    make.add_argument("task", help="arithmetic, countdown, calculator or reasoning_gym:<dataset>")
    make.add_argument("--n", type=int, required=True, help="number of rows")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--split", choices=["train", "test"], default="train")
    make.add_argument("--out", required=True, type=Path)
    make.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task parameter, e.g. --arg digits=3 (repeatable)",
    )
    make.set_defaults(func=_cmd_data_make)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve-engine", help="serve the embedded engine with SGLang's HTTP API")
    serve.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    serve.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=30000)
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $PHYSARUM_ENGINE_API_KEY)",
    )
    serve.add_argument(
        "--no-auth", action="store_true", help="serve without a key (loopback --host only)"
    )
    serve.add_argument("--fp8", action="store_true", help="serve blockwise-FP8 weights")
    serve.add_argument("--max-running", type=int, default=64, help="concurrent sequences")
    serve.add_argument("--max-n", type=int, default=64, help="samples one request may ask for")
    serve.add_argument(
        "--max-body-mb", type=float, default=16.0, help="larger request bodies get 413"
    )
    serve.add_argument(
        "--context-len",
        type=int,
        default=None,
        help="positions per sequence (default: min(model max, 2048))",
    )
    serve.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model and KV cache live (auto: cuda:0 if torch sees a GPU, else cpu)",
    )
    serve.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="weight dtype (auto: bfloat16 on a GPU, float32 on the CPU)",
    )
    serve.set_defaults(func=_cmd_serve_engine)


def _user_errors() -> tuple[type[BaseException], ...]:
    from configs import ConfigError

    return (UserError, ConfigError, FileNotFoundError, NotADirectoryError, ValueError)


def main(argv: list[str] | None = None) -> int:
    from physarum.console import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("physarum: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        if args.verbose:
            raise
        from physarum.console import strip_ansi

        print(f"physarum: error: {strip_ansi(str(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # a crash: its traceback, without Ray's colour codes in a pipe
        if sys.stderr.isatty():
            raise
        from physarum.console import print_traceback

        print_traceback(exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
