"""Fed-SB vs the baselines under identical data, partitions and seeds, and the paper's claim checked.

    python benchmarks/bench_methods.py                       # MiniLM-L6 on SST-2, 5 clients (configs/sst2-minilm.yaml)
    python benchmarks/bench_methods.py --methods fedsb:16,32,64 fedit:8 ffa:8 fedex:8 flora:8 -- train.lr=2e-3

With --tune-lr, every variant first runs at each learning rate on the VALIDATION split
(benchmarks/out/methods-<preset>/tune/), and the final comparison on the test split uses each variant's
best rate. Then `fedsb compare` (finished variants are reused, so the command is idempotent) runs into
benchmarks/out/methods-<preset>/, and the claim is checked: the best Fed-SB variant reaches at least the
best baseline's accuracy with at most a tenth of that baseline's bytes per round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ["fedsb:32,64", "fedit:8", "ffa:8", "fedex:8", "flora:8"]


def check_claim(rows: list[dict]) -> tuple[bool, str]:
    fedsb = [r for r in rows if r["method"] == "fedsb"]
    base = [r for r in rows if r["method"] in ("fedit", "ffa", "fedex", "flora")]
    if not fedsb or not base:
        return False, "need at least one Fed-SB variant and one baseline"
    best_base = max(base, key=lambda r: r["accuracy"])
    ok = [
        r
        for r in fedsb
        if r["accuracy"] >= best_base["accuracy"]
        and r["bytes_per_round"] <= best_base["bytes_per_round"] / 10
    ]
    best_sb = max(fedsb, key=lambda r: r["accuracy"])
    ratio = best_base["bytes_per_round"] / best_sb["bytes_per_round"]
    text = (
        f"best baseline {best_base['variant']}: {100 * best_base['accuracy']:.1f}% at {best_base['bytes_per_round'] / 1e6:.3f} MB/round; "
        f"best Fed-SB {best_sb['variant']}: {100 * best_sb['accuracy']:.1f}% at {best_sb['bytes_per_round'] / 1e6:.3f} MB/round "
        f"({ratio:.0f}x fewer bytes)"
    )
    return bool(ok), text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "sst2-minilm.yaml"))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--output", default=None, help="default: benchmarks/out/methods-<preset name>")
    p.add_argument(
        "--tune-lr", default="", help="comma-separated learning rates tried per variant on validation"
    )
    p.add_argument("overrides", nargs="*", help="key=value settings for every variant")
    args = p.parse_args()
    from fedsb.compare import parse_variants, run_comparison, tune_learning_rates

    out = Path(args.output or ROOT / "benchmarks" / "out" / f"methods-{Path(args.config).stem}")
    variants = parse_variants(args.methods)
    shared = [*args.overrides, "progress=false"]
    chosen: dict[str, list[str]] = {}
    if args.tune_lr:
        chosen, scores = tune_learning_rates(
            variants,
            args.tune_lr.split(","),
            output=out / "tune",
            config_file=args.config,
            overrides=shared,
            validation=["data.eval_split=validation", "data.test_size=872"],
        )
        for label, by_lr in scores.items():
            print(f"{label}: validation accuracy by lr {by_lr} -> {chosen[label][0]}")
        (out / "tuned_lr.json").write_text(json.dumps(scores, indent=2))
    rows = run_comparison(
        variants, output=out, config_file=args.config, overrides=shared, variant_overrides=chosen
    )
    ok, text = check_claim(rows)
    print(text)
    print(
        f"claim (Fed-SB >= best baseline accuracy with <= 1/10 of its bytes): {'holds' if ok else 'DOES NOT HOLD'}"
    )
    print(f"table: {out / 'compare.md'}  plot: {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
