"""The embedded default job (`fedsb run`, no arguments): wall time, accuracy gain, round-loop overhead.

    python benchmarks/bench_default.py            # one run of `fedsb run` in a subprocess (about 4-5 min)

Targets (issue 3): the default run finishes in <= 5 minutes on 2 cores and improves held-out accuracy by
>= 10 points over the untuned model; round-loop overhead (all but local forward/backward and evaluation)
<= 3 % of the rounds' wall time. The wall time includes interpreter start, imports and model loading (the
SmolLM2 checkpoint is converted once beforehand so the one-time conversion is not counted; it is timed
separately and printed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="extra key=value settings (default: none, the embedded job)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "default.json"))
    args = p.parse_args()
    from fedsb.models import prepare_smollm2

    t0 = time.perf_counter()
    prepare_smollm2()
    convert = time.perf_counter() - t0
    fedsb = Path(sys.executable).with_name("fedsb")
    cmd = [
        str(fedsb) if fedsb.exists() else sys.executable,
        *([] if fedsb.exists() else ["-m", "fedsb"]),
        "run",
        "--no-progress",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [*cmd, f"output_dir={tmp}/run", *args.overrides],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ},
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        results = json.loads((Path(tmp) / "run" / "results.json").read_text())
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    before, after = results["before"]["accuracy"], results["final"]["accuracy"]
    timing = results["timing"]
    row = {
        "overrides": args.overrides,
        "wall_seconds": wall,
        "conversion_seconds_if_cached": convert,
        "accuracy_before": before,
        "accuracy_after": after,
        "gain_points": 100 * (after - before),
        "peak_rss_mb": rss_mb,
        "timing": timing,
        "ledger_totals": results["ledger"]["totals"],
        "per_category_after": results["final"].get("per_category"),
    }
    print(proc.stdout.split("-" * 20)[-1] if "-" * 20 in proc.stdout else "")
    print(f"wall time of `fedsb run`: {wall:.1f} s (target <= 300 s): {'met' if wall <= 300 else 'MISSED'}")
    print(
        f"accuracy {100 * before:.1f}% -> {100 * after:.1f}% = {row['gain_points']:+.1f} points (target >= +10): {'met' if row['gain_points'] >= 10 else 'MISSED'}"
    )
    frac = timing["round_overhead_fraction"]
    print(
        f"round-loop overhead {100 * frac:.2f}% of {timing['rounds_seconds']:.1f} s in rounds (target <= 3%): {'met' if frac <= 0.03 else 'MISSED'}"
    )
    print(
        f"local training {timing['local_training_seconds']:.1f} s, evaluation {timing['eval_seconds']:.1f} s, peak RSS {rss_mb:.0f} MB"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
