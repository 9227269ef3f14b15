"""int8 R on the wire vs float32 (and server optimizers vs plain averaging) on MiniLM-L6 + SST-2, paired seeds.

    nice -n 10 .venv/bin/python benchmarks/bench_wire.py                          # float32 / int8 / int8+EF
    nice -n 10 .venv/bin/python benchmarks/bench_wire.py --suite server           # avg / avgm / adam / yogi,
                                                                                  # label-skewed (Dirichlet 0.3)
    nice -n 10 .venv/bin/python benchmarks/bench_wire.py --seeds 0 --variants 'fedsb:32' 'fedsb:32/fed.wire_dtype=int8'

Every seed runs every variant with `fedsb compare`'s `run_comparison` (identical partitions, basis, data
order and seeded draws per seed; finished runs are reused, so the command can be interrupted) into
benchmarks/out/<suite>/seed<s>/<variant>/. Reported per variant: test accuracy at each seed, mean and std,
the paired difference to the first variant (mean and std over seeds), bytes over the rounds from the
run's ledger (int8: values + fp32 scales) and the ratio first / variant. Writes <suite>.json and <suite>.md.

The setting is a much cheaper cut of configs/sst2-minilm.yaml (CPU budget: a 2-vCPU machine shared by
several jobs): Fed-SB r = 32 at its validation-tuned rate 0.02 (benchmarks/README, sst2-minilm-iid), 1,000
training sentences over 5 clients, 3 rounds x 5 local steps x 8 sentences of at most 48 tokens, 436 of
the 872 dev sentences (seeded) for the test. Run one process per seed to use more cores
(`--seeds 0`, `--seeds 1`, ...), then all seeds once more for the table (finished runs are reused).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = [
    "adapter.rank=32",
    "train.lr=0.02",
    "data.train_size=1000",  # 200 sentences per client
    "data.max_length=48",
    "data.test_size=436",  # half of the 872 dev sentences (seeded)
    "train.batch_size=8",
    "train.local_steps=5",
    "fed.rounds=3",
    "eval.every=3",
    "eval.initial=false",
    "export=false",
    "progress=false",
]
SUITES: dict[str, dict[str, Any]] = {
    "wire": {
        "variants": [
            "fedsb:32",
            "fedsb:32/fed.wire_dtype=int8",
            "fedsb:32/fed.wire_dtype=int8/fed.error_feedback=true",
        ],
        "overrides": [],
    },
    "server": {
        "variants": [
            "fedsb:32",
            "fedsb:32/fed.server_optimizer=avgm",
            "fedsb:32/fed.server_optimizer=adam",
            "fedsb:32/fed.server_optimizer=yogi",
        ],
        "overrides": ["partition.scheme=dirichlet", "partition.alpha=0.3"],
    },
}


def summarize(per_seed: dict[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per variant: accuracies by seed, mean, std, paired difference to the first variant, bytes, ratio."""
    seeds = sorted(per_seed)
    labels = [r["variant"] for r in per_seed[seeds[0]]]
    by = {s: {r["variant"]: r for r in per_seed[s]} for s in seeds}
    first = labels[0]
    out = []
    for label in labels:
        acc = [by[s][label]["accuracy"] for s in seeds]
        diff = [by[s][label]["accuracy"] - by[s][first]["accuracy"] for s in seeds]
        total = [by[s][label]["bytes_total"] for s in seeds]
        ref = [by[s][first]["bytes_total"] for s in seeds]
        out.append(
            {
                "variant": label,
                "settings": by[seeds[0]][label]["settings"],
                "accuracy_by_seed": dict(zip(seeds, acc, strict=True)),
                "accuracy_mean": statistics.fmean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "paired_diff_mean": statistics.fmean(diff),
                "paired_diff_std": statistics.stdev(diff) if len(diff) > 1 else 0.0,
                "bytes_rounds": statistics.median(total),
                "bytes_ratio_first_over_this": statistics.median(
                    r / t for r, t in zip(ref, total, strict=True)
                ),
                "wall_seconds_median": statistics.median(by[s][label]["wall_seconds"] for s in seeds),
            }
        )
    return out


def markdown(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    head = (
        "| variant | accuracy by seed | mean ± std | paired diff to first | bytes over rounds | "
        "fewer bytes |\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        by_seed = " / ".join(f"{100 * r['accuracy_by_seed'][s]:.1f}" for s in seeds)
        lines.append(
            f"| {r['variant']} | {by_seed} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | "
            f"{100 * r['paired_diff_mean']:+.2f} ± {100 * r['paired_diff_std']:.2f} | "
            f"{r['bytes_rounds'] / 1e6:.3f} MB | {r['bytes_ratio_first_over_this']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "sst2-minilm.yaml"))
    p.add_argument("--suite", choices=sorted(SUITES), default="wire")
    p.add_argument(
        "--variants", nargs="+", default=None, help="method[:r][/key=value...] (default: the suite's)"
    )
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None, help="default: benchmarks/out/<suite>")
    p.add_argument("overrides", nargs="*", help="key=value settings for every run")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from fedsb.compare import parse_variants, run_comparison
    from fedsb.results import git_state, package_versions

    suite = SUITES[args.suite]
    variants = parse_variants(args.variants or suite["variants"])
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.output or ROOT / "benchmarks" / "out" / args.suite)
    shared = [*SHARED, *suite["overrides"], f"threads={args.threads}", *args.overrides]
    load_start = os.getloadavg()
    per_seed = {}
    for seed in seeds:
        per_seed[seed] = run_comparison(
            variants, output=out / f"seed{seed}", config_file=args.config, overrides=[*shared, f"seed={seed}"]
        )
    rows = summarize(per_seed)
    report = {
        "config": args.config,
        "shared": shared,
        "seeds": seeds,
        "rows": rows,
        "packages": package_versions(),
        "git": git_state(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.suite}.json").write_text(json.dumps(report, indent=2, default=str))
    table = markdown(rows, seeds)
    (out / f"{args.suite}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
