"""Train-step time and peak RSS on SmolLM2-135M: LoRA-SB vs PEFT LoRA vs full fine-tuning, plus LoRA-SB init.

    .venv/bin/python benchmarks/bench_step.py                  # fp32, 3 interleaved repeats, ~13 min
    .venv/bin/python benchmarks/bench_step.py --bf16           # bf16 autocast (writes step_bf16.json)

One train step = zero_grad + forward (HF loss, labels = inputs) + backward + AdamW step, on a fixed batch of
random token ids (batch x seq, default 8 x 128), CPU, `torch.set_num_threads(threads)`. Each configuration
runs in its own subprocess, so its peak RSS is that process's `ru_maxrss` and allocator state does not leak
between configurations; repeats are interleaved (A, B, C, A, B, C, ...) so slow drift in machine load hits
every configuration alike. The LoRA-SB init rows (gradient estimate over n samples, then the SVDs of all
adapted modules) also run one subprocess each, after the step repeats.

The orchestrator imports only the standard library; torch, transformers, peft and fedsb are imported in the
worker subprocesses (`--worker ...`, internal).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = ("lora-sb", "lora", "full")
LABELS = {"lora-sb": "LoRA-SB r={sb_rank}", "lora": "PEFT LoRA r={lora_rank}", "full": "full FT"}


# --------------------------------------------------------------------------- helpers (stdlib only)


def _ensure_fedsb_importable() -> None:
    """Use the installed package if there is one, else the checkout's src/ (the venv may not install it)."""
    try:
        import fedsb  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "src"))


def _peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or "unknown", "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and info["model"] in ("unknown", "", platform.machine()):
            info["model"] = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            info["flags_of_interest"] = sorted(
                f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags
            )
            break
    return info


def _git_info() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit or "unavailable", "dirty": bool(status) if status is not None else None}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "peft"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _busy_cpu_s() -> float | None:
    """CPU-seconds spent busy by the whole machine since boot (/proc/stat: all but idle and iowait)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class OtherLoad:
    """Fraction of the machine's CPUs used by *other* processes between start() and stop().

    busy CPU-seconds of the machine minus this process's own CPU-seconds, over wall x CPUs; a step timing
    taken while this is well above 0 was slowed by a neighbour (steal time counts as a neighbour).
    """

    def start(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), _busy_cpu_s(), _self_cpu_s()

    def stop(self) -> float | None:
        busy = _busy_cpu_s()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.t
        others = (busy - self.busy) - (_self_cpu_s() - self.own)
        return max(0.0, others) / (wall * (os.cpu_count() or 1))


def _wait_for_idle(max_wait_s: float, max_busy: float) -> dict[str, Any]:
    """Before a worker starts: wait (up to max_wait_s) until other processes use < max_busy of the CPUs."""
    t0 = time.perf_counter()
    busy = None
    while True:
        probe = OtherLoad()
        probe.start()
        time.sleep(2.0)
        busy = probe.stop()
        if busy is None or busy < max_busy or time.perf_counter() - t0 >= max_wait_s:
            break
    return {"waited_s": round(time.perf_counter() - t0, 1), "busy_before": busy}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- workers (subprocesses)


def _setup_torch(threads: int) -> Any:
    import torch

    torch.set_num_threads(threads)
    return torch


def _load_base(torch: Any, model_name: str, seed: int) -> Any:
    _ensure_fedsb_importable()
    from fedsb.models.load import load_model

    model = load_model(model_name, dtype=torch.float32, seed=seed).model
    model.train()  # from_pretrained returns eval mode; SmolLM2 has no active dropout either way
    return model


def _random_batch(torch: Any, vocab: int, batch: int, seq: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)  # (batch, seq)
    return {"input_ids": ids, "labels": ids}


def _prepare(torch: Any, model: Any, config: str, args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """Wrap `model` for `config` and return (model to call, trainable parameters)."""
    if config == "lora-sb":
        from fedsb.init.initialize import BasisSpec, attach_basis, compute_basis

        # a random orthonormal basis costs the same per step as a gradient-SVD one and needs no data
        basis = compute_basis(
            model,
            BasisSpec(rank=args.sb_rank, targets=list(LLAMA_TARGETS), init="random"),
            generator=torch.Generator().manual_seed(args.seed),
        )
        adapted = attach_basis(model, basis)
        return adapted.model, list(adapted.trainable_parameters().values())
    if config == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=args.lora_rank,
            lora_alpha=2 * args.lora_rank,
            lora_dropout=0.0,  # LoRA-SB runs without dropout too
            target_modules=list(LLAMA_TARGETS),
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, cfg)
        return peft_model, [p for p in peft_model.parameters() if p.requires_grad]
    if config == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, [p for p in model.parameters() if p.requires_grad]
    raise ValueError(f"unknown config {config!r}; use one of {', '.join(CONFIGS)}")


def worker_step(args: argparse.Namespace) -> dict[str, Any]:
    """Time `steps` undisturbed train steps (after `warmup`) of one configuration in this fresh process."""
    torch = _setup_torch(args.threads)
    load_start = _loadavg()
    t0 = time.perf_counter()
    model = _load_base(torch, args.model, args.seed)
    load_s = time.perf_counter() - t0
    rss_after_load = _peak_rss_mb()
    call, params = _prepare(torch, model, args.config, args)
    # tied embeddings share one tensor between embed_tokens and lm_head: count it once
    trainable = sum(p.numel() for p in {id(p): p for p in params}.values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    batch = _random_batch(torch, model.config.vocab_size, args.batch, args.seq, args.seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    gc.collect()

    def one_step() -> dict[str, float | None]:
        probe = OtherLoad()
        probe.start()
        c0, t0 = time.process_time(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = call(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3, c3 = time.perf_counter(), time.process_time()
        return {
            "step_s": t3 - t0,
            "forward_s": t1 - t0,
            "backward_s": t2 - t1,
            "optimizer_s": t3 - t2,
            "cpu_s": c3 - c0,
            "others_cpu_frac": probe.stop(),
            "loss": float(loss.detach()),
        }

    def is_clean(s: dict[str, float | None]) -> bool:
        frac = s["others_cpu_frac"]
        return frac is None or frac <= args.max_others

    warm = [one_step() for _ in range(args.warmup)]
    gc.collect()  # keep collector work from the warm-up out of the timed steps
    # On a shared machine a neighbour process stalls one of our OpenMP threads and the step time can
    # jump several-fold: keep only steps during which others used <= max_others of the CPUs, running up
    # to max_extra_steps more steps to get `steps` clean ones (else keep the least disturbed ones).
    timed: list[dict[str, float | None]] = []
    while sum(map(is_clean, timed)) < args.steps and len(timed) < args.steps + args.max_extra_steps:
        timed.append(one_step())
    kept = [s for s in timed if is_clean(s)]
    disturbed = len(kept) < args.steps
    if disturbed:
        kept = sorted(timed, key=lambda s: s["others_cpu_frac"] or 0.0)[: args.steps]
    step = [s["step_s"] for s in kept]
    fracs = [s["others_cpu_frac"] for s in kept if s["others_cpu_frac"] is not None]
    return {
        "config": args.config,
        "trainable": trainable,
        "step_s": step,
        "cpu_s": [s["cpu_s"] for s in kept],
        "forward_s": [s["forward_s"] for s in kept],
        "backward_s": [s["backward_s"] for s in kept],
        "optimizer_s": [s["optimizer_s"] for s in kept],
        "median_s": statistics.median(step),
        "min_s": min(step),
        "others_cpu_frac": statistics.mean(fracs) if fracs else None,
        "disturbed": disturbed,
        "timed_attempts": timed,
        "warmup_steps": warm,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_load_mb": rss_after_load,
        "model_load_s": load_s,
        "threads": torch.get_num_threads(),
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
    }


def worker_init(args: argparse.Namespace) -> dict[str, Any]:
    """Time compute_basis(init='lora-sb') with n samples: gradient estimate and SVD phases separately.

    The phases are split by wrapping `fedsb.init.initialize.lora_sb_basis` (the sign step + SVD of every
    module), so compute_basis itself runs unchanged. Extra SVD methods (`--init-extra-svd`) are then timed
    on the same gradients, so their rows share the gradient-estimate time of this process.
    """
    torch = _setup_torch(args.threads)
    load_start = _loadavg()
    model = _load_base(torch, args.model, args.seed)
    import fedsb.init.initialize as initialize

    captured: dict[str, Any] = {}
    real_basis = initialize.lora_sb_basis

    def timed_basis(grads: Any, ranks: Any, **kwargs: Any) -> Any:
        captured["svd_start"] = time.perf_counter()
        captured["grads"], captured["ranks"] = grads, ranks
        basis = real_basis(grads, ranks, **kwargs)
        captured["svd_end"] = time.perf_counter()
        return basis

    n, bs = args.init_samples, args.batch
    g = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(-(-n // bs)):  # ceil(n / bs) batches of (bs, seq) random ids
        ids = torch.randint(0, vocab, (bs, args.seq), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    gc.collect()

    initialize.lora_sb_basis = timed_basis
    others = OtherLoad()
    others.start()
    try:
        t0 = time.perf_counter()
        basis = initialize.compute_basis(
            model,
            initialize.BasisSpec(
                rank=args.sb_rank, targets=list(LLAMA_TARGETS), init="lora-sb", svd=args.svd
            ),
            initialize.GradientSource(batches=iter(batches), num_samples=n),
            generator=torch.Generator().manual_seed(args.seed),
        )
        total = time.perf_counter() - t0
    finally:
        initialize.lora_sb_basis = real_basis
    others_frac = others.stop()
    grad_s = captured["svd_start"] - t0
    rows = [
        {
            "n": n,
            "svd": args.svd,
            "modules": len(basis.factors),
            "grad_estimate_s": grad_s,
            "svd_s": captured["svd_end"] - captured["svd_start"],
            "total_s": total,
            "grads_shared_with": None,
            "others_cpu_frac": others_frac,
        }
    ]
    for method in args.init_extra_svd:
        gc.collect()
        t0 = time.perf_counter()
        real_basis(
            captured["grads"],
            captured["ranks"],
            eta=1e-4,
            svd=method,
            generator=torch.Generator().manual_seed(args.seed),
        )
        svd_s = time.perf_counter() - t0
        rows.append(
            {
                "n": n,
                "svd": method,
                "modules": len(basis.factors),
                "grad_estimate_s": grad_s,
                "svd_s": svd_s,
                "total_s": grad_s + svd_s,
                "grads_shared_with": f"n={n} {args.svd}",
                "others_cpu_frac": None,
            }
        )
    peak = _peak_rss_mb()
    for row in rows:
        row.update(
            peak_rss_mb=peak,
            threads=torch.get_num_threads(),
            loadavg_start=load_start,
            loadavg_end=_loadavg(),
        )
    return {"rows": rows}


# --------------------------------------------------------------------------- orchestrator


def _common_args(args: argparse.Namespace) -> list[str]:
    out = [
        "--model", args.model, "--threads", str(args.threads), "--batch", str(args.batch),
        "--seq", str(args.seq), "--seed", str(args.seed), "--sb-rank", str(args.sb_rank),
        "--lora-rank", str(args.lora_rank),
    ]  # fmt: skip
    return out + (["--bf16"] if args.bf16 else [])


def _run_worker(kind: str, extra: list[str], args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    idle = _wait_for_idle(args.wait_idle, args.max_busy) if args.wait_idle > 0 else {}
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--result", str(result)]
        cmd += _common_args(args) + extra
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-30:])
            raise RuntimeError(f"worker {kind} {' '.join(extra)} failed (exit {proc.returncode}):\n{tail}")
        data = json.loads(result.read_text())
    data["process_wall_s"] = wall
    data.update(idle)
    return data


def _pct(frac: float | None) -> str:
    return "n/a" if frac is None else f"{100 * frac:.0f}%"


def _label(config: str, args: argparse.Namespace) -> str:
    return LABELS[config].format(sb_rank=args.sb_rank, lora_rank=args.lora_rank)


def _summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for config, reps in runs.items():
        steps = [t for r in reps for t in r["step_s"]]

        def med(key: str, reps: list[dict[str, Any]] = reps) -> float:
            return statistics.median([t for r in reps for t in r[key]])

        summary[config] = {
            "trainable": reps[0]["trainable"],
            "median_s": statistics.median(steps),
            "min_s": min(steps),
            "max_s": max(steps),
            "per_repeat_median_s": [r["median_s"] for r in reps],
            "cpu_median_s": med("cpu_s"),
            "per_repeat_others_cpu_frac": [r["others_cpu_frac"] for r in reps],
            "forward_median_s": med("forward_s"),
            "backward_median_s": med("backward_s"),
            "optimizer_median_s": med("optimizer_s"),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in reps),
            "rss_after_load_mb": max(r["rss_after_load_mb"] for r in reps),
            "disturbed_repeats": sum(bool(r["disturbed"]) for r in reps),
            "timed_steps": len(steps),
        }
    return summary


def _ratios(runs: dict[str, list[dict[str, Any]]], summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios of medians, plus the median of per-repeat ratios (adjacent processes: robust to load drift)."""
    out: dict[str, Any] = {}
    for num, den in (("lora-sb", "lora"), ("full", "lora"), ("lora-sb", "full")):
        if num in summary and den in summary:
            paired = [a["median_s"] / b["median_s"] for a, b in zip(runs[num], runs[den], strict=True)]
            out[f"{num} / {den}"] = {
                "of_medians": summary[num]["median_s"] / summary[den]["median_s"],
                "median_of_paired": statistics.median(paired),
                "paired": paired,
            }
    return out


def _print_tables(
    args: argparse.Namespace, summary: dict[str, Any], ratios: dict[str, Any], init: list[Any]
) -> None:
    dtype = "bf16 autocast" if args.bf16 else "fp32"
    print(
        f"\n{args.model}, batch {args.batch} x seq {args.seq}, {args.threads} threads, {dtype}, AdamW; "
        f"{args.repeats} processes x {args.steps} timed steps (after {args.warmup} warm-up) per config"
    )
    head = f"{'config':<16} {'trainable':>12} {'median s':>9} {'min s':>7} {'fwd':>6} {'bwd':>6} {'opt':>6} {'peak RSS':>10}  per-repeat medians (others' CPU use)"
    print(head)
    print("-" * len(head))
    for config, s in summary.items():
        reps = ", ".join(
            f"{m:.2f} ({_pct(o)})"
            for m, o in zip(s["per_repeat_median_s"], s["per_repeat_others_cpu_frac"], strict=True)
        )
        print(
            f"{_label(config, args):<16} {s['trainable']:>12,} {s['median_s']:>9.3f} {s['min_s']:>7.3f} "
            f"{s['forward_median_s']:>6.2f} {s['backward_median_s']:>6.2f} {s['optimizer_median_s']:>6.3f} "
            f"{s['peak_rss_mb'] / 1024:>7.2f} GiB  {reps}"
        )
    for name, r in ratios.items():
        target = "  (target <= 1.05)" if name == "lora-sb / lora" else ""
        paired = ", ".join(f"{p:.3f}" for p in r["paired"])
        print(
            f"ratio {name:<16} {r['of_medians']:.3f} of medians; {r['median_of_paired']:.3f} median of paired "
            f"repeats [{paired}]{target}"
        )
    if init:
        print(
            f"\nLoRA-SB init, r={args.sb_rank} (gradient estimate in batches of {args.batch} x {args.seq}, then SVD per module)"
        )
        head = f"{'n':>5} {'svd':<11} {'modules':>7} {'grad est s':>10} {'svd s':>7} {'total s':>8} {'peak RSS':>10}"
        print(head)
        print("-" * len(head))
        for row in init:
            note = f"  (gradients shared with {row['grads_shared_with']})" if row["grads_shared_with"] else ""
            print(
                f"{row['n']:>5} {row['svd']:<11} {row['modules']:>7} {row['grad_estimate_s']:>10.2f} "
                f"{row['svd_s']:>7.2f} {row['total_s']:>8.2f} {row['peak_rss_mb'] / 1024:>7.2f} GiB{note}"
            )


def orchestrate(args: argparse.Namespace) -> int:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        print(f"--configs: unknown {unknown}; use a comma list of {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    out_path = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "out" / ("step_bf16.json" if args.bf16 else "step.json")
    )
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta = {
        "benchmark": "bench_step",
        "argv": sys.argv[1:],
        "started": started,
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": "bf16-autocast" if args.bf16 else "fp32",
        "threads": args.threads,
        "warmup": args.warmup,
        "steps": args.steps,
        "repeats": args.repeats,
        "order": "interleaved: " + ",".join(configs) + f" x {args.repeats}",
        "targets": list(LLAMA_TARGETS),
        "lora_sb": {"rank": args.sb_rank, "init": "random (timing only)", "scaling": 1.0, "dropout": 0.0},
        "lora": {"rank": args.lora_rank, "alpha": 2 * args.lora_rank, "dropout": 0.0},
        "optimizer": "torch.optim.AdamW(lr=1e-4), default implementation",
        "versions": _versions(),
        "cpu": _cpu_info(),
        "git": _git_info(),
        "loadavg_start": _loadavg(),
    }
    print(f"load average at start: {meta['loadavg_start']}; results -> {out_path}", flush=True)

    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for rep in range(args.repeats if configs else 0):
        for config in configs:
            extra = ["--config", config, "--warmup", str(args.warmup), "--steps", str(args.steps)]
            data = _run_worker("step", extra, args)
            runs[config].append(data)
            steps = ", ".join(f"{t:.2f}" for t in data["step_s"])
            print(
                f"[repeat {rep + 1}/{args.repeats}] {_label(config, args):<16} median {data['median_s']:.3f} s "
                f"[{steps}]  cpu {statistics.median(data['cpu_s']):.2f} s  peak RSS {data['peak_rss_mb']:.0f} MiB  "
                f"others {_pct(data['others_cpu_frac'])}  kept {len(data['step_s'])}/{len(data['timed_attempts'])}"
                f"{' DISTURBED' if data['disturbed'] else ''}  waited {data.get('waited_s', 0)} s",
                flush=True,
            )

    init_rows: list[dict[str, Any]] = []
    for i, n in enumerate(args.init_samples):
        if n <= 0:
            continue
        extra = ["--init-samples", str(n), "--svd", "exact"]
        if i == 0 and args.init_randomized:
            extra += ["--init-extra-svd", "randomized"]
        data = _run_worker("init", extra, args)
        for _ in range(args.init_retries):  # rerun an init disturbed by a neighbour; keep the quietest
            frac = data["rows"][0]["others_cpu_frac"]
            if frac is None or frac <= args.max_others:
                break
            print(f"[init] n={n}: others used {_pct(frac)} of the CPUs; rerunning", flush=True)
            again = _run_worker("init", extra, args)
            if (again["rows"][0]["others_cpu_frac"] or 0.0) < frac:
                data = again
        for row in data["rows"]:
            init_rows.append(row)
            print(
                f"[init] n={row['n']} {row['svd']}: gradient estimate {row['grad_estimate_s']:.2f} s, "
                f"SVD {row['svd_s']:.2f} s, peak RSS {row['peak_rss_mb']:.0f} MiB, "
                f"others {_pct(row['others_cpu_frac'])}",
                flush=True,
            )

    summary = _summarize(runs) if configs else {}
    ratios = _ratios(runs, summary) if configs else {}
    meta["loadavg_end"] = _loadavg()
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result = {
        "meta": meta,
        "summary": {_label(c, args): {"config": c, **s} for c, s in summary.items()},
        "ratios": ratios,
        "init": init_rows,
        "runs": runs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    _print_tables(args, summary, ratios, init_rows)
    print(f"\nload average at end: {meta['loadavg_end']}; wrote {out_path}")
    return 0


# --------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m", help="fedsb.models.load_model name (a Llama model)")
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma list of lora-sb, lora, full ('' = none)"
    )
    p.add_argument("--repeats", type=int, default=3, help="processes per config, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per process")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every worker")
    p.add_argument(
        "--bf16", action="store_true", help="bf16 autocast for forward (R, A, B, optimizer stay fp32)"
    )
    p.add_argument("--sb-rank", type=int, default=32, help="LoRA-SB rank (also for the init rows)")
    p.add_argument("--lora-rank", type=int, default=8, help="PEFT LoRA rank (alpha = 2 r)")
    p.add_argument(
        "--init-samples",
        type=_int_list,
        default=[32, 128],
        help="n per LoRA-SB init row ('0' or '' = skip init)",
    )
    p.add_argument(
        "--no-init-randomized",
        dest="init_randomized",
        action="store_false",
        help="skip the randomized-SVD row (timed on the first n's gradients)",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=180.0,
        help="before each worker, wait up to this many seconds for other processes to go quiet (0 = never)",
    )
    p.add_argument(
        "--max-busy", type=float, default=0.25, help="'quiet' = others use < this fraction of the CPUs"
    )
    p.add_argument(
        "--max-others",
        type=float,
        default=0.10,
        help="a timed step (or init run) during which other processes used more than this fraction of the "
        "CPUs is disturbed: steps are redone, init runs retried",
    )
    p.add_argument(
        "--max-extra-steps", type=int, default=10, help="extra steps per process to replace disturbed ones"
    )
    p.add_argument("--init-retries", type=int, default=2, help="reruns of a disturbed init row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=None,
        help="result JSON (default benchmarks/out/step.json, step_bf16.json with --bf16)",
    )
    # internal: worker mode
    p.add_argument("--worker", choices=("step", "init"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--svd", default="exact", help=argparse.SUPPRESS)
    p.add_argument("--init-extra-svd", action="append", default=[], help=argparse.SUPPRESS)
    return p


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through subprocess.run, which kills the running worker


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is None:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return orchestrate(args)
    if args.worker == "init":
        args.init_samples = args.init_samples[0]
        data = worker_init(args)
    else:
        data = worker_step(args)
    Path(args.result).write_text(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
