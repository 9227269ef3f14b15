"""Round-loop scaling: RSS of 10 vs 1,000 simulated clients, aggregation time of 1,000 updates, overhead.

    python benchmarks/bench_rounds.py                  # all three parts (about 2-4 minutes on 2 cores)
    python benchmarks/bench_rounds.py --clients 10 1000 --rounds 2

Each simulation runs `fedsb run` in-process inside its own subprocess (tiny Llama, 4 examples and one local
step per client, all clients every round), so peak RSS (ru_maxrss) belongs to that simulation alone.
Targets (issue 3): RSS(1,000 clients) <= RSS(10 clients) + 100 MB; aggregating 1,000 updates < 1 s;
round-loop overhead (everything except local training and evaluation) <= 3 % of the rounds' wall time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def simulate(num_clients: int, rounds: int, out: Path) -> dict:
    """Child process: one tiny-model run with `num_clients` clients; returns timing and peak RSS."""
    from fedsb.config import resolve_config
    from fedsb.run import run_job

    cfg = resolve_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"partition.num_clients={num_clients}",
            f"data.train_size={4 * num_clients}",
            "train.local_steps=1",
            f"fed.rounds={rounds}",
            f"eval.every={rounds}",
            "data.test_size=8",
            "progress=false",
            "export=false",
            f"output_dir={out}",
        ],
    )
    t0 = time.perf_counter()
    results = run_job(cfg, echo=lambda s: None)
    wall = time.perf_counter() - t0
    return {
        "clients": num_clients,
        "rounds": rounds,
        "wall_seconds": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timing": results["timing"],
        "aggregate_seconds": [r["seconds"]["aggregate"] for r in results["rounds"]],
    }


def time_aggregation(num_updates: int, shapes: list[tuple[int, int]], repeats: int = 3) -> dict:
    """Median seconds to validate-free aggregate `num_updates` updates with the Fed-SB weighted mean."""
    from fedsb.fed.base import WeightedMean

    g = torch.Generator().manual_seed(0)
    updates = [
        {f"layer{i}.R": torch.randn(s, generator=g) for i, s in enumerate(shapes)} for _ in range(num_updates)
    ]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        agg = WeightedMean("examples")
        for u in updates:
            agg.add(u, 10)
        agg.result()
        times.append(time.perf_counter() - t0)
    return {
        "updates": num_updates,
        "tensors": len(shapes),
        "params": sum(a * b for a, b in shapes),
        "median_seconds": statistics.median(times),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "rounds.json"))
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(simulate(args.child, args.rounds, Path(args.child_dir))))
        return 0

    sims = []
    for n in args.clients:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(n),
                    "--child-dir",
                    tmp,
                    "--rounds",
                    str(args.rounds),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        sims.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    tiny_shapes = [(4, 4)] * 14
    smollm_shapes = [(32, 32)] * 210
    agg = [time_aggregation(1000, tiny_shapes), time_aggregation(1000, smollm_shapes)]

    print(
        f"{'clients':>8} {'rounds':>6} {'wall s':>8} {'peak RSS MB':>12} {'overhead %':>11} {'max aggregate s':>16}"
    )
    for s in sims:
        print(
            f"{s['clients']:>8} {s['rounds']:>6} {s['wall_seconds']:>8.1f} {s['peak_rss_mb']:>12.1f} "
            f"{100 * s['timing']['round_overhead_fraction']:>11.2f} {max(s['aggregate_seconds']):>16.4f}"
        )
    by_n = {s["clients"]: s for s in sims}
    if 10 in by_n and 1000 in by_n:
        delta = by_n[1000]["peak_rss_mb"] - by_n[10]["peak_rss_mb"]
        print(
            f"RSS(1000) - RSS(10) = {delta:.1f} MB (target <= 100 MB): {'met' if delta <= 100 else 'MISSED'}"
        )
    for a in agg:
        ok = "met" if a["median_seconds"] < 1 else "MISSED"
        print(
            f"aggregate {a['updates']} updates of {a['tensors']} tensors ({a['params']:,} params): {a['median_seconds']:.3f} s (target < 1 s): {ok}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"simulations": sims, "aggregation": agg}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
