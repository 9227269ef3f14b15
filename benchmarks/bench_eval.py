"""Evaluation throughput on SmolLM2-135M: greedy generation vs option log-likelihood, side by side.

    .venv/bin/python benchmarks/bench_eval.py                       # commonsense suite, 48 examples, 2 threads
    .venv/bin/python benchmarks/bench_eval.py --task sst2 --option mode=lm --examples 64

Both scorers evaluate the same seeded sample of the task's test split with the untuned model, interleaved
(generation, likelihood, generation, ...) ``--repeats`` times; the table gives the median examples/s and
the accuracy (identical across repeats: both scorers are deterministic). Writes benchmarks/out/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsb.data.tasks import get_task  # noqa: E402
from fedsb.eval.evaluate import evaluate_task  # noqa: E402
from fedsb.models import load_model  # noqa: E402
from fedsb.results import git_state, package_versions  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="commonsense")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option")
    p.add_argument("--examples", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation length (default: the task's)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "eval.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    options = {k: yaml.safe_load(v) for k, _, v in (o.partition("=") for o in args.option)}
    task = get_task(args.task, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = task.load("test", args.examples, 0)
    loaded = load_model(args.model, **({"task": "causal_lm"}))
    runs: dict[str, list[dict]] = {"generate": [], "likelihood": []}
    load_start = os.getloadavg()
    for _ in range(args.repeats):
        for scorer in runs:
            t0 = time.perf_counter()
            res = evaluate_task(
                loaded.model, loaded.tokenizer, task, rows, scorer=scorer, batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens, bf16=args.bf16,
            )  # fmt: skip
            runs[scorer].append(
                {"seconds": res.seconds, "wall": time.perf_counter() - t0, "accuracy": res.accuracy,
                 "examples_per_second": res.examples_per_second, "per_category": res.per_category}
            )  # fmt: skip
            print(
                f"{scorer:10s} {res.examples_per_second:7.2f} examples/s  accuracy {100 * res.accuracy:5.1f}%"
            )
    table = {
        scorer: {
            "median_examples_per_second": statistics.median(r["examples_per_second"] for r in rs),
            "median_seconds": statistics.median(r["seconds"] for r in rs),
            "accuracy": rs[0]["accuracy"],
            "deterministic": len({r["accuracy"] for r in rs}) == 1,
            "per_category": rs[0]["per_category"],
        }
        for scorer, rs in runs.items()
    }
    new_tokens = args.max_new_tokens or task.max_new_tokens
    print(f"\n{args.model} on {args.task} ({len(rows)} test examples, {args.threads} threads, batch "
          f"{args.batch_size}, median of {args.repeats}; generation: greedy, {new_tokens} new tokens)")  # fmt: skip
    print(f"{'scorer':12s} {'examples/s':>11s} {'s / eval':>9s} {'accuracy':>9s}")
    for scorer, t in table.items():
        print(f"{scorer:12s} {t['median_examples_per_second']:11.2f} {t['median_seconds']:9.1f} "
              f"{100 * t['accuracy']:8.1f}%")  # fmt: skip
    ratio = (
        table["likelihood"]["median_examples_per_second"] / table["generate"]["median_examples_per_second"]
    )
    print(f"likelihood / generation throughput: {ratio:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {**vars(args), "options": options, "max_new_tokens": new_tokens},
        "results": table, "runs": runs, "ratio_likelihood_over_generate": ratio,
        "packages": package_versions(), "git": git_state(), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }, indent=2, default=str))  # fmt: skip
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
