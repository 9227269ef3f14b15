"""Step time and peak RSS of LoRA-SB r=32 on SmolLM2-135M under five base precisions, side by side.

    nice -n 10 .venv/bin/python benchmarks/bench_quant.py                 # 2 threads, 8 x 128, 4 timed steps
    nice -n 10 .venv/bin/python benchmarks/bench_quant.py --steps 6 --out benchmarks/out/quant.json

Variants (each in its own subprocess, so its peak RSS is that process's `ru_maxrss`):
  (a) fp32 base, fp32 compute             model.dtype=float32 train.bf16=false
  (b) fp32 base + bf16 autocast           model.dtype=float32 (train.bf16=true, the CPU default)
  (c) bf16 base                           model.dtype=bfloat16
  (d) nf4 base                            model.quantize=nf4 (the rest of the base bfloat16)
  (e) nf4 base + gradient checkpointing   model.quantize=nf4 train.gradient_checkpointing=true
(c)-(e) keep the default bf16 autocast. The base comes from the job recipe's own load (`fedsb.job.load_base`:
the quantization and checkpointing of a real run), the adapters from `FederatedMethod.inject` with random
orthonormal B, A; a step is the real training loop (`fedsb.train.local.train_local`: answer loss over all
batch x seq tokens, clipping, AdamW) on one fixed batch of random token ids. Step time: the median of the
timed steps after one warm-up step. Memory, per variant: RSS after the imports, the base's resident weights
(tensor bytes as stored: packed 4-bit weights and their absmax included) and the RSS they added, the peak
RSS, and the dry run's estimate (`fedsb.plan.plan_run`) of one client's step, so the rest of the peak can be
attributed: imports, weights, activations and autograd's saved tensors (estimated), and the remainder
(allocator slack, transient dequantized weights and kernel workspaces).

The orchestrator imports only the standard library; the workers import torch and fedsb.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "a": ("fp32 base", ["model.dtype=float32", "train.bf16=false"]),
    "b": ("fp32 base + bf16 autocast", ["model.dtype=float32", "train.bf16=true"]),
    "c": ("bf16 base", ["model.dtype=bfloat16", "train.bf16=true"]),
    "d": ("nf4 base", ["model.quantize=nf4", "train.bf16=true"]),
    "e": ("nf4 base + gradient checkpointing", ["model.quantize=nf4", "train.gradient_checkpointing=true"]),
}
MIB = 2**20


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load, adapt and time one variant in this process; the JSON-ready measurements."""
    rss_start = rss_now()
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from fedsb.config import resolve_config
    from fedsb.data.prepare import task_from_config
    from fedsb.fed.base import get_method_class
    from fedsb.job import configure_torch, load_base, placement_of
    from fedsb.models.quantize import quantized_bytes
    from fedsb.plan import plan_run
    from fedsb.train.local import StepPlan, causal_lm_loss, train_local
    from fedsb.train.schedule import Schedule

    overrides = [
        "model.name=smollm2-135m",
        f"threads={args.threads}",
        f"adapter.rank={args.rank}",
        f"train.batch_size={args.batch}",
        f"data.max_length={args.seq}",
        *VARIANTS[variant][1],
    ]
    cfg = resolve_config(None, overrides)
    configure_torch(cfg)
    rss_imports = rss_now()
    plan = plan_run(cfg)  # the dry run's estimate, on a meta model (allocates nothing)
    estimate = plan["memory"]["by_base"][cfg.model.quantize]
    t0 = time.perf_counter()
    loaded = load_base(cfg, task_from_config(cfg), placement_of(cfg))
    load_seconds = time.perf_counter() - t0
    model = loaded.model
    weights = quantized_bytes(model)
    rss_loaded = rss_now()
    adapted = get_method_class("fedsb").inject(model, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapted.layers.values():  # random orthonormal B (m, r), A (r, n): a realistic branch
            B = torch.linalg.qr(torch.randn(layer.out_features, layer.rank, generator=g))[0]
            A = torch.linalg.qr(torch.randn(layer.in_features, layer.rank, generator=g))[0].T
            layer.set_factors(B, A)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    stamps: list[float] = []
    steps = 1 + args.steps
    start = time.perf_counter()
    result, _ = train_local(
        model,
        adapted.trainable_parameters(),
        lambda epoch: [batch],
        cfg.train,
        StepPlan(
            steps=steps,
            schedule=Schedule(base_lr=1e-3, total=steps, warmup=0, kind="constant"),
            on_step=lambda k, loss: stamps.append(time.perf_counter()),
        ),
        loss_fn=causal_lm_loss,
    )
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)][1:]  # drop the warm-up step
    return {
        "variant": variant,
        "label": VARIANTS[variant][0],
        "overrides": VARIANTS[variant][1],
        "step_seconds": times,
        "median_step_seconds": statistics.median(times),
        "losses": result.losses,
        "load_seconds": load_seconds,
        "rss_start_mib": rss_start / MIB,
        "rss_imports_mib": rss_imports / MIB,
        "rss_loaded_mib": rss_loaded / MIB,
        "weights_mib": weights / MIB,
        "peak_rss_mib": peak_rss() / MIB,
        "estimate_mib": {k: estimate[k] / MIB for k in ("weights", "optimizer", "activations", "saved_activations", "total")},
        "trainable": adapted.num_trainable(),
    }  # fmt: skip


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", variant, *forwarded(args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forwarded(args: argparse.Namespace) -> list[str]:
    return [f"--threads={args.threads}", f"--batch={args.batch}", f"--seq={args.seq}", f"--rank={args.rank}",
            f"--steps={args.steps}"]  # fmt: skip


def report(rows: dict[str, dict[str, Any]]) -> str:
    a = rows.get("a") or next(iter(rows.values()))
    lines = [
        f"{'variant':38s} {'step s':>7s} {'vs b':>5s} {'weights':>8s} {'vs a':>5s} {'imports':>8s} {'peak':>7s} "
        f"{'vs a':>5s} {'est.act':>8s} {'rest':>7s}  (MiB)"
    ]
    for key, r in rows.items():
        train = r["peak_rss_mib"] - r["rss_loaded_mib"]  # what training added on top of the loaded model
        rest = train - r["estimate_mib"]["activations"] - r["estimate_mib"]["optimizer"]
        lines.append(
            f"({key}) {r['label']:34s} {r['median_step_seconds']:7.2f} "
            f"{r['median_step_seconds'] / rows.get('b', a)['median_step_seconds']:5.2f} {r['weights_mib']:8.0f} "
            f"{r['weights_mib'] / a['weights_mib']:5.2f} {r['rss_imports_mib']:8.0f} {r['peak_rss_mib']:7.0f} "
            f"{r['peak_rss_mib'] / a['peak_rss_mib']:5.2f} {r['estimate_mib']['activations']:8.0f} {rest:7.0f}"
        )
    c, d, e = rows.get("c"), rows.get("d"), rows.get("e")
    if c and d and e:
        lines += [
            "targets:",
            f"  (c) step / (b) step = {c['median_step_seconds'] / rows['b']['median_step_seconds']:.2f} (<= 1.00); "
            f"(c) peak / (a) peak = {c['peak_rss_mib'] / a['peak_rss_mib']:.2f} (< 1.00)",
            f"  (d) weights / (a) weights = {d['weights_mib'] / a['weights_mib']:.2f} (<= 0.30)",
            f"  (e) peak / (a) peak = {e['peak_rss_mib'] / a['peak_rss_mib']:.2f} (<= 0.50)",
        ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--variants", default="abcde")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per variant")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "quant.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0
    started = time.time()
    rows = {}
    for v in args.variants:
        rows[v] = run_variant(v, args)
        print(f"({v}) {rows[v]['label']}: median step {rows[v]['median_step_seconds']:.2f} s, "
              f"peak RSS {rows[v]['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    text = report(rows)
    print(text)
    load = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "batch": args.batch, "seq": args.seq, "rank": args.rank, "steps": args.steps,
            "cpu": platform.processor(), "cpus": os.cpu_count(), "loadavg_end": load,
            "wall_seconds": time.time() - started}  # fmt: skip
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "report": text}, indent=2))
    print(f"load average at the end {load[0]:.1f} (the machine is shared); written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
