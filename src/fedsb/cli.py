"""The `fedsb` command line: run | eval | export | compare | comm | models | tasks. Parses, loads the config, dispatches; nothing else.

Heavy imports (torch, transformers) happen inside the commands so `fedsb --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from fedsb import __version__
from fedsb.argparsing import Renamed, common_options

RUN_EPILOG = """\
examples:
  fedsb run                                   # the embedded default: SmolLM2-135M, arithmetic, 4 clients
  fedsb run --config configs/tiny.yaml        # a preset
  fedsb run fed.rounds=5 adapter.rank=64      # overrides (section.key=value), applied after the preset
  fedsb run --resume runs/20261125-101500-3fa9c2   # continue a stopped run from its last checkpoint
  fedsb run report_to=[csv,tensorboard]       # trackers (also wandb, mlflow when installed)
  fedsb run --dry-run device=cuda model.name=meta-llama/Llama-3.2-1B   # plan it: memory, bytes, sigma
"""


EVAL_EPILOG = """\
examples:
  fedsb eval runs/20261125-101500                        # the run's final model on its own test set
  fedsb eval runs/20261125-101500 --size all --output eval.json
  fedsb eval runs/x/peft --task commonsense --scorer likelihood
  fedsb eval --model smollm2-135m --task boolq --size 100  # an untuned base model
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
    common = [common_options()]  # -v/--verbose after the subcommand too
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        parents=common,
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
        "--dry-run",
        action="store_true",
        help="resolve the config and print the plan (device, dtype, adapters, trained parameters, estimated "
        "memory, bytes per round, DP noise) without loading weights, training or writing anything",
    )
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="settings, e.g. fed.rounds=5 train.lr=1e-3"
    )
    export = sub.add_parser(
        "export",
        parents=common,
        help="export a finished run: a standard PEFT LoRA adapter or a merged model",
        description="Export a finished run's final model. 'peft' writes a lossless standard LoRA adapter "
        "(lora_B = B R, lora_A = A) for peft/vLLM; 'merged' writes a plain HF checkpoint of W0 + s B R A.",
    )
    export.add_argument("run_dir", help="a finished run directory (holds config.yaml, basis/, adapter/)")
    export.add_argument("--format", choices=("peft", "merged"), default="peft")
    export.add_argument(
        "--output", "--out", dest="output", action=Renamed, deprecated=["--out"], required=True, metavar="DIR",
        help="where to write the export: a new or empty directory (--out: deprecated alias)",
    )  # fmt: skip
    export.add_argument(
        "--overwrite", action="store_true", help="replace the contents of a non-empty --output directory"
    )
    compare = sub.add_parser(
        "compare",
        parents=common,
        help="run several methods/ranks under identical partitions and seeds; table and Pareto plot",
        description="Run each variant as a normal `fedsb run` in OUTPUT/<method>-r<rank>/ with the same data, "
        "partitions and seeds, then write OUTPUT/compare.{json,md} and OUTPUT/pareto.png (accuracy vs bytes). "
        "Finished variants are reused.",
    )
    compare.add_argument(
        "--methods", "--method", dest="methods", action=Renamed, deprecated=["--method"], nargs="+",
        required=True, metavar="METHOD[:R1,R2][/KEY=VALUE]",
        help="e.g. fedsb:32,64 fedit:8 ffa:8 ravan:16 fedsvd:8 fedsb:32/init.method=lora-xs",
    )  # fmt: skip
    compare.add_argument("--config", metavar="FILE", help="YAML preset shared by every variant")
    compare.add_argument(
        "--output", "--out", dest="output", action=Renamed, deprecated=["--out"], required=True,
        metavar="DIR", help="directory of the variants' runs and the comparison (--out: deprecated alias)",
    )  # fmt: skip
    compare.add_argument("--no-progress", action="store_true")
    compare.add_argument(
        "--isolate",
        action="store_true",
        help="run each variant in its own process (its own peak memory in the table; a crash stops one variant)",
    )
    compare.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run up to N variants at once, each in its own process (implies --isolate), its output in "
        "OUTPUT/<variant>.log; give each 1/N of the cores with threads=... (default 1)",
    )
    compare.add_argument("overrides", nargs="*", metavar="key=value")
    _add_eval_parser(sub, common)
    add_comm_parser(sub, parents=common)
    sub.add_parser("models", parents=common, help="list the builtin (offline) models")
    sub.add_parser("tasks", parents=common, help="list the tasks")
    return parser


def _add_eval_parser(sub: Any, common: list[argparse.ArgumentParser]) -> None:
    """`fedsb eval`: a run directory, an exported PEFT directory or a base model, without training."""
    ev = sub.add_parser(
        "eval",
        parents=common,
        help="evaluate a finished run, an exported PEFT adapter or a base model (no training)",
        description="Evaluate without training. TARGET is a run directory (the final global model; the run's "
        "task, split, size and scorer are the defaults), an exported PEFT LoRA directory (base model from its "
        "adapter_config.json or --model; needs --task), or omitted to evaluate the base model --model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EVAL_EPILOG,
    )
    ev.add_argument("target", nargs="?", help="run directory or PEFT directory (omit to evaluate --model)")
    ev.add_argument("--task", help="task name (fedsb tasks); default: the run's task")
    ev.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="task option (YAML value)"
    )
    ev.add_argument("--model", help="base model: for a PEFT directory or without a target")
    ev.add_argument("--split", help="test or validation (default: the run's eval split, else test)")
    ev.add_argument("--size", help="number of examples, or 'all' (default: the run's test_size, else 200)")
    ev.add_argument(
        "--scorer", choices=("auto", "generate", "likelihood"), help="default: the run's, else auto"
    )
    ev.add_argument("--normalize", choices=("sum", "mean"), help="likelihood: sum or per-token mean")
    ev.add_argument("--batch-size", type=int, metavar="N")
    ev.add_argument("--max-new-tokens", type=int, metavar="N", help="generation length (default: the task's)")
    ev.add_argument("--max-length", type=int, metavar="N", help="classification: truncate inputs to N tokens")
    ev.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None,
        help="bf16 autocast (default: as the run evaluated, else on, like train.bf16)",
    )  # fmt: skip
    ev.add_argument("--threads", type=int, metavar="N", help="torch threads")
    ev.add_argument(
        "--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps (default: the run's, else auto)"
    )
    ev.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"),
        help="base model dtype (default: the run's, which a run directory requires; else auto)",
    )  # fmt: skip
    ev.add_argument(
        "--quantize", choices=("none", "nf4", "int8"),
        help="4/8-bit base (default: the run's, which a run directory requires; else none)",
    )  # fmt: skip
    ev.add_argument(
        "--hub", action="store_true", default=None,
        help="allow downloading --model from the Hugging Face hub (default: the run's model.hub, else no)",
    )  # fmt: skip
    ev.add_argument(
        "--output", "--out", dest="output", action=Renamed, deprecated=["--out"], metavar="FILE",
        help="also write the report as JSON (--out: deprecated alias)",
    )  # fmt: skip
    ev.add_argument("--no-progress", action="store_true")


COMM_EPILOG = """\
examples:
  fedsb comm --model llama-3.2-3b --methods fedit ffa fedex flora --rank 32 --clients 5
  fedsb comm --model gemma-2-9b --methods fedit:32 fedex:32 fedsb:120,160,200 --clients 25
  fedsb comm --model bert-base --methods fedsb --rank 32 48 64 --clients 3 --dtype bfloat16 --json
  fedsb comm --model ./my-model-dir --methods fedsb --rank 64 --clients 10 --targets q_proj v_proj
  fedsb comm --model bert-base --methods fedsb:64 ravan:32 fedsvd:8 --heads 4 --clients 5
  fedsb comm --model minilm-l6 --methods fedsb --rank 32 --clients 3 --client-ranks 8 16 32
  fedsb comm --model minilm-l6 --methods fedsb fedit --rank 32 --clients 5 --dtype int8 --wire-scale row
  fedsb comm --model minilm-l6 --methods fedsb --rank 32 --clients 5 --federated-init sketch

a METHOD:R1,R2 item gives that method its own ranks; --rank applies to the others.
"""


def add_comm_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the `comm` subcommand to an argparse subparsers object (handler: `cmd_comm`)."""
    from fedsb.comm import DTYPE_BYTES, METHODS, shipped_models

    p = subparsers.add_parser(
        "comm",
        parents=list(parents),
        help="communication per round for Fed-SB and the baselines (no weights, offline for shipped shapes)",
        description="Per-client, per-round communication of Fed-SB, FedIT, FFA-LoRA, FedEx-LoRA, FLoRA, RAVAN "
        "and FedSVD: the paper's '# Comm.' figure, real upload/download parameters and bytes, and the one-time "
        f"frozen bases (Fed-SB, RAVAN). Shipped shapes: {', '.join(shipped_models())}; or a local model directory / hub id "
        "(its config.json only).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=COMM_EPILOG,
    )
    p.add_argument("--model", required=True, help="shipped shape name, model directory or hub id")
    p.add_argument(
        "--methods",
        "--method",
        dest="method",
        action=Renamed,
        deprecated=["--method"],
        nargs="+",
        default=list(METHODS),
        metavar="METHOD[:R,...]",
        help=f"methods ({', '.join(METHODS)}; default all), optionally with their own ranks "
        "(--method: deprecated alias)",
    )
    p.add_argument(
        "--rank", nargs="+", type=int, default=[32], metavar="R", help="ranks for every method [32]"
    )
    p.add_argument("--clients", type=int, required=True, metavar="C", help="clients per round")
    p.add_argument("--targets", nargs="+", metavar="NAME", help="adapted modules (default: the model's)")
    p.add_argument(
        "--dtype",
        default="float32",
        help=f"wire dtype for bytes: {', '.join(DTYPE_BYTES)} [float32, fed.wire_dtype's default in runs]",
    )
    p.add_argument("--head-params", type=int, metavar="N", help="trained head size (default: the model's)")
    p.add_argument("--heads", type=int, default=4, metavar="H", help="RAVAN's heads (rank = per head) [4]")
    p.add_argument(
        "--client-ranks",
        nargs="+",
        type=int,
        metavar="R_I",
        help="partition.client_ranks: one rank per client of the federation (fedsb; mixed ranks)",
    )
    p.add_argument(
        "--wire-scale",
        choices=("tensor", "row"),
        default="tensor",
        help="fed.wire_scale with --dtype int8: a fp32 scale per tensor or per row [tensor]",
    )
    p.add_argument(
        "--federated-init",
        choices=("sketch", "dense"),
        metavar="EXCHANGE",
        help="init.source=federated with this init.exchange (sketch or dense): its one-time bytes",
    )
    p.add_argument(
        "--oversample", type=int, default=10, metavar="K", help="init.oversample of a sketch init [10]"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=cmd_comm)


def _parse_methods(
    specs: Sequence[str], default_ranks: Sequence[int]
) -> tuple[list[str], dict[str, list[int]]]:
    """`fedsb comm --methods` items (METHOD or METHOD:R1,R2) -> (method keys, method -> its ranks)."""
    from fedsb.comm.table import method_key
    from fedsb.errors import FedsbError

    methods: list[str] = []
    ranks: dict[str, list[int]] = {}
    for spec in specs:
        name, _, rank_text = spec.partition(":")
        key = method_key(name)
        if rank_text:
            try:
                given = [int(r) for r in rank_text.split(",") if r.strip()]
            except ValueError:
                raise FedsbError(
                    field="method", value=spec, fix="write METHOD:R1,R2 with integer ranks"
                ) from None
        else:
            given = list(default_ranks)
        if key not in ranks:
            methods.append(key)
            ranks[key] = []
        ranks[key].extend(r for r in given if r not in ranks[key])
    return methods, ranks


def cmd_comm(args: argparse.Namespace) -> int:
    """Run `fedsb comm`: print the table (or JSON); a user error prints `fedsb: error: ...` and returns 2."""
    import json

    from fedsb.comm import comm_table, describe, format_table
    from fedsb.errors import FedsbError

    try:
        methods, ranks = _parse_methods(args.method, args.rank)
        rows = comm_table(
            args.model,
            methods,
            ranks,
            args.clients,
            targets=args.targets,
            dtype=args.dtype,
            head_params=args.head_params,
            heads=args.heads,
            client_ranks=args.client_ranks,
            wire_scale=args.wire_scale,
            federated_init=args.federated_init,
            oversample=args.oversample,
        )
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(format_table(rows, describe(args.model, args.targets, rows)))
    except FedsbError as exc:
        print(f"fedsb: error: {exc}", file=sys.stderr)
        return 2
    return 0


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
    if args.dry_run:
        from fedsb.plan import format_plan, plan_run

        print(format_plan(plan_run(cfg)))
        return 0
    run_job(
        cfg,
        resume=args.resume,
        stop_after_round=args.stop_after_round,
        command=["fedsb", *sys.argv[1:]],
        handle_signals=True,  # SIGINT/SIGTERM: stop after the next checkpoint, print the resume command
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from fedsb.trained import export_run

    summary = export_run(args.run_dir, args.format, args.output, overwrite=args.overwrite)
    print(f"exported {args.format} to {args.output}")
    if summary.get("max_lora_rank"):
        print(f"serve with vLLM: --enable-lora --max-lora-rank {summary['max_lora_rank']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch
    import yaml

    from fedsb.console import bars_enabled
    from fedsb.errors import ConfigError
    from fedsb.eval.saved import evaluate_saved, format_report

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(field="--option", value=item, fix="use KEY=VALUE, e.g. --option template=plain")
        options[key.strip()] = yaml.safe_load(value)
    size: int | None | str = "auto"
    if args.size is not None:
        if args.size == "all":
            size = None
        elif args.size.isdigit() and int(args.size) > 0:
            size = int(args.size)
        else:
            raise ConfigError(field="--size", value=args.size, fix="use a positive integer or 'all'")
    if args.output:
        from fedsb.paths import check_output_file

        check_output_file(args.output)  # before evaluating, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate_saved(
        args.target,
        task_name=args.task,
        task_options=options,
        model=args.model,
        split=args.split,
        size=size,
        scorer=args.scorer,
        normalize=args.normalize,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_length=args.max_length,
        bf16=args.bf16,
        progress=bars_enabled(not args.no_progress),
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        hub=args.hub,
    )
    print(format_report(report))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2, default=str))
        print(f"report written to {args.output}")
    return 0


def _cmd_models() -> int:
    from fedsb.models import BUILTIN_MODELS

    for name, text in BUILTIN_MODELS.items():
        print(f"{name:14s} {text}")
    print("any other name: a local checkpoint directory or a Hugging Face hub id (needs hub access)")
    return 0


def _cmd_tasks() -> int:
    import shutil

    from fedsb.data.tasks import register_builtin_tasks

    width = max(60, min(120, shutil.get_terminal_size((100, 24)).columns))
    for name, cls in register_builtin_tasks().items():
        text = textwrap.wrap(plain_summary(cls.__doc__ or ""), width - 15, break_on_hyphens=False) or [""]
        print(f"{name:14s} {text[0]}")
        for line in text[1:]:
            print(" " * 15 + line)
    return 0


def plain_summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, as plain text (RST roles and literals removed)."""
    import re

    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", paragraph)  # :class:`x` -> x
    text = re.sub(r"``([^`]+)``", r"\1", text)  # ``x`` -> x
    text = re.sub(r"`([^`]+)`", r"\1", text)
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z(])", text, maxsplit=1)
    return parts[0]


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
    from fedsb.interrupt import RunStopped

    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "compare":
            from fedsb.compare import parse_variants, run_comparison

            overrides = [*args.overrides, *(["progress=false"] if args.no_progress else [])]
            run_comparison(
                parse_variants(args.methods),
                output=args.output,
                config_file=args.config,
                overrides=overrides,
                isolate=args.isolate,
                jobs=args.jobs,
            )
            return 0
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "comm":
            return cmd_comm(args)
        if args.command == "models":
            return _cmd_models()
        if args.command == "tasks":
            return _cmd_tasks()
    except (FedsbError, CheckpointError, UpdateRejected, _round_failed()) as exc:
        print(f"fedsb: error: {exc}", file=sys.stderr)
        return 2
    except RunStopped as stop:  # a run stopped by SIGINT/SIGTERM: how to continue it
        print(f"fedsb: {stop.message}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("fedsb: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def console_main() -> None:
    from fedsb.interrupt import exit_at_once_on_signals

    code = main()
    exit_at_once_on_signals(code)  # a signal during the exit (a second Ctrl-C) keeps this status
    sys.exit(code)
