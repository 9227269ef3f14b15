"""Cost of hashing the live basis (`fedsb.init.integrity.live_fingerprint`): what every client pays before
it trains, and every export before it writes, on real model shapes.

    .venv/bin/python benchmarks/bench_fingerprint.py                  # smollm2-135m and minilm-l6, r = 32
    .venv/bin/python benchmarks/bench_fingerprint.py --rank 64 --repeats 11

Per model: the default targets, a random orthonormal basis of rank r attached with `attach_basis`, then
`--repeats` timed calls of `live_fingerprint` (median and min, ms) and the bytes hashed (r (m + n) fp32
numbers per layer). Writes benchmarks/out/fingerprint.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"


def measure(model_name: str, rank: int, repeats: int) -> dict[str, Any]:
    import torch

    from fedsb.init.initialize import BasisSpec, attach_basis, compute_basis
    from fedsb.init.integrity import live_fingerprint
    from fedsb.models import load_model

    task = {"task": "seq_cls", "num_labels": 2} if model_name.startswith("minilm") else {}
    model = load_model(model_name, **task).model
    basis = compute_basis(
        model, BasisSpec(rank=rank, init="random"), generator=torch.Generator().manual_seed(0)
    )
    adapted = attach_basis(model, basis)
    hashed = 4 * basis.num_basis_parameters()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fp = live_fingerprint(adapted)
        times.append(1000 * (time.perf_counter() - t0))
    assert fp == basis.fingerprint
    return {
        "model": model_name,
        "rank": rank,
        "modules": len(adapted.layers),
        "mb_hashed": hashed / 1e6,
        "ms": times,
        "median_ms": statistics.median(times),
        "min_ms": min(times),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "minilm-l6"])
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = [measure(m, args.rank, args.repeats) for m in args.models]
    for r in rows:
        print(
            f"{r['model']}: {r['modules']} modules, r = {r['rank']}, {r['mb_hashed']:.1f} MB hashed: "
            f"median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f} ms"
        )
    OUT.mkdir(exist_ok=True)
    (OUT / "fingerprint.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
