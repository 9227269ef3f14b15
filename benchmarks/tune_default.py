"""Choose the default job's settings with evidence: short federated runs scored on the VALIDATION split.

    python benchmarks/tune_default.py                      # the grid below (several minutes per run)
    python benchmarks/tune_default.py --grid init.eta=1e-5,1e-4,1e-3 --grid train.lr=3e-3,1e-2

Every run is the embedded default (`fedsb run` with no arguments) plus one combination of the grid values,
evaluated on 200 validation problems (disjoint from the test split that `fedsb run` reports), only after
the last round. Results go to benchmarks/out/tune_default.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", default=[], help="key=v1,v2,... (repeatable)")
    p.add_argument("--base", nargs="*", default=[], help="extra overrides applied to every run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "tune_default.json"))
    args = p.parse_args()
    grid = args.grid or ["init.eta=1e-5,1e-4,1e-3,1e-2"]
    axes = []
    for g in grid:
        key, _, values = g.partition("=")
        axes.append([f"{key}={v}" for v in values.split(",")])

    from fedsb.config import resolve_config
    from fedsb.run import run_job

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text()) if out.exists() else []
    done = {tuple(r["overrides"]) for r in rows}
    for combo in itertools.product(*axes):
        overrides = [*args.base, *combo]
        if tuple(overrides) in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            cfg = resolve_config(
                None,
                [
                    *overrides,
                    "data.eval_split=validation",
                    f"eval.every={10**6}",
                    "progress=false",
                    "export=false",
                    f"output_dir={tmp}",
                ],
            )
            t0 = time.perf_counter()
            res = run_job(cfg, echo=lambda s: None)
            wall = time.perf_counter() - t0
        row = {
            "overrides": overrides,
            "validation_accuracy": res["final"]["accuracy"],
            "untuned": res["before"]["accuracy"],
            "final_train_loss": res["rounds"][-1]["train_loss"],
            "wall_seconds": wall,
            "train_seconds": res["timing"]["local_training_seconds"],
        }
        rows.append(row)
        out.write_text(json.dumps(rows, indent=2))
        print(
            f"{' '.join(overrides):60s} val acc {100 * row['validation_accuracy']:5.1f}%  loss {row['final_train_loss']:.3f}  wall {wall:6.1f}s",
            flush=True,
        )
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
