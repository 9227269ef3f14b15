"""The `fedsb` command line: run | models | tasks. Parses, loads the config, dispatches; nothing else.

Heavy imports (torch, transformers) happen inside the commands so `fedsb --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence

from fedsb import __version__

RUN_EPILOG = """\
examples:
  fedsb run                                   # the embedded default: SmolLM2-135M, arithmetic, 4 clients
  fedsb run --config configs/tiny.yaml        # a preset
  fedsb run fed.rounds=5 adapter.rank=64      # overrides (section.key=value), applied after the preset
  fedsb run --resume runs/20261125-101500     # continue an interrupted run from its last checkpoint
"""


def _settings_help() -> str:
    from fedsb.config import describe_fields

    lines = ["settings (section.key=value; default in brackets):"]
    for name, default, text in describe_fields():
        lines.append(f"  {name} [{default}]")
        lines.extend(textwrap.wrap(text, width=96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedsb",
        description="Federated fine-tuning of language models with LoRA-SB (Fed-SB): only an r x r matrix per "
        "layer trains and travels, and the server's average of R is the exact average of the clients' updates.",
    )
    parser.add_argument("--version", action="version", version=f"fedsb {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run (or resume) a federated fine-tuning job",
        description="Run a federated fine-tuning job. With no arguments: the offline default job "
        "(SmolLM2-135M-Instruct, procedural arithmetic word problems, 4 clients, 3 rounds).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=RUN_EPILOG + "\n" + _settings_help(),
    )
    run.add_argument("--config", metavar="FILE", help="YAML preset (see configs/)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    run.add_argument("--output", metavar="DIR", help="results directory (same as output_dir=DIR)")
    run.add_argument("--stop-after-round", type=int, metavar="N", help="stop after round N (resume later)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (same as progress=false)")
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="settings, e.g. fed.rounds=5 train.lr=1e-3"
    )
    export = sub.add_parser(
        "export",
        help="export a finished run: a standard PEFT LoRA adapter or a merged model",
        description="Export a finished run's final model. 'peft' writes a lossless standard LoRA adapter "
        "(lora_B = B R, lora_A = A) for peft/vLLM; 'merged' writes a plain HF checkpoint of W0 + s B R A.",
    )
    export.add_argument("run_dir", help="a finished run directory (holds config.yaml, basis/, adapter/)")
    export.add_argument("--format", choices=("peft", "merged"), default="peft")
    export.add_argument("--out", required=True, metavar="DIR", help="where to write the export")
    compare = sub.add_parser(
        "compare",
        help="run several methods/ranks under identical partitions and seeds; table and Pareto plot",
        description="Run each variant as a normal `fedsb run` in OUTPUT/<method>-r<rank>/ with the same data, "
        "partitions and seeds, then write OUTPUT/compare.{json,md} and OUTPUT/pareto.png (accuracy vs bytes). "
        "Finished variants are reused.",
    )
    compare.add_argument(
        "--methods", nargs="+", required=True, metavar="METHOD[:R1,R2]", help="e.g. fedsb:32,64 fedit:8 ffa:8"
    )
    compare.add_argument("--config", metavar="FILE", help="YAML preset shared by every variant")
    compare.add_argument("--output", required=True, metavar="DIR")
    compare.add_argument("--no-progress", action="store_true")
    compare.add_argument("overrides", nargs="*", metavar="key=value")
    from fedsb.comm import add_comm_parser

    add_comm_parser(sub)
    sub.add_parser("models", help="list the builtin (offline) models")
    sub.add_parser("tasks", help="list the tasks")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedsb.config import resolve_config
    from fedsb.run import resolve_resume_config, run_job

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    if args.no_progress:
        overrides.append("progress=false")
    if args.resume:
        cfg = resolve_resume_config(Path(args.resume), overrides)
        if args.config:
            logging.getLogger("fedsb").warning(
                "--resume uses the run's saved config; --config %s is ignored", args.config
            )
    else:
        cfg = resolve_config(args.config, overrides)
    run_job(cfg, resume=args.resume, stop_after_round=args.stop_after_round, command=["fedsb", *sys.argv[1:]])
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fedsb.trained import export_run

    summary = export_run(args.run_dir, args.format, args.out)
    print(f"exported {args.format} to {args.out}")
    if summary.get("max_lora_rank"):
        print(f"serve with vLLM: --enable-lora --max-lora-rank {summary['max_lora_rank']}")
    return 0


def _cmd_models() -> int:
    from fedsb.models import BUILTIN_MODELS

    for name, text in BUILTIN_MODELS.items():
        print(f"{name:14s} {text}")
    print("any other name: a local checkpoint directory or a Hugging Face hub id (needs hub access)")
    return 0


def _cmd_tasks() -> int:
    from fedsb.data.tasks import register_builtin_tasks

    for name, cls in register_builtin_tasks().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:14s} {doc}")
    return 0


def _round_failed() -> type[Exception]:
    from fedsb.fed.rounds import RoundFailed

    return RoundFailed


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (tests call it in-process)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    from fedsb.errors import CheckpointError, FedsbError, UpdateRejected

    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "compare":
            from fedsb.compare import parse_variants, run_comparison

            overrides = [*args.overrides, *(["progress=false"] if args.no_progress else [])]
            run_comparison(
                parse_variants(args.methods), output=args.output, config_file=args.config, overrides=overrides
            )
            return 0
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "comm":
            from fedsb.comm import cmd_comm

            return cmd_comm(args)
        if args.command == "models":
            return _cmd_models()
        if args.command == "tasks":
            return _cmd_tasks()
    except (FedsbError, CheckpointError, UpdateRejected, _round_failed()) as exc:
        print(f"fedsb: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "fedsb: interrupted; a run continues from its last checkpoint with --resume DIR", file=sys.stderr
        )
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def console_main() -> None:
    sys.exit(main())
