"""Fed-SB vs the LoRA baselines under record-level DP (DP-SGD in each client), and the DP step cost.

    python benchmarks/bench_dp.py                         # MiniLM-L6 on SST-2, 3 clients, eps 1,3,5,7.5,10
    python benchmarks/bench_dp.py --epsilons 1,10 --methods fedsb:32 ffa:8
    python benchmarks/bench_dp.py --step-time-only        # DP vs non-DP step time only
    python benchmarks/bench_dp.py --noise-only --epsilons 1,10 -- train.optimizer=sgd   # noise left in dW
    python benchmarks/bench_dp.py --runs-only --epsilons 1,3 --threads 1 &   # split the runs over
    python benchmarks/bench_dp.py --runs-only --epsilons 5,7.5,10 --threads 1  # processes (and the
    python benchmarks/bench_dp.py --reference-only --threads 1                  # no-DP references),
    python benchmarks/bench_dp.py --threads 1 --skip-step-time                  # then the full command
                                                                               # reuses them for the table

Accuracy part: for every epsilon, `fedsb compare` runs the variants under identical partitions and seeds
with privacy.mode=sample and privacy.target_epsilon=eps (sigma solved per client for ALL planned steps;
delta = min(1e-5, 1/(10 N_client)); PRV accountant; Poisson sampling; C = 0.1), into benchmarks/out/dp-<preset>/eps<eps>/;
a non-private reference runs into .../nodp/. Learning rates: each variant's rate tuned WITHOUT DP on the
validation split by bench_methods.py --tune-lr (benchmarks/out/methods-<preset>/tuned_lr.json) if present,
else the preset's. Finished runs are reused (idempotent). Writes dp.md, dp.json and dp.png (accuracy vs
epsilon) and checks the paper's claim: Fed-SB >= FFA-LoRA > FedIT at every epsilon.

Step-time part: one client's local round (DP-SGD vs plain AdamW) on the same model, data and batch size,
interleaved repeats, median seconds per step and their ratio (target <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ["fedsb:32,64", "fedit:8", "ffa:8", "fedex:8"]
DEFAULT_EPSILONS = "1,3,5,7.5,10"
SHARED = [
    "partition.num_clients=3",
    "data.train_size=3000",  # 1,000 sentences per client
    "train.batch_size=32",  # the expected Poisson batch
    "train.local_steps=100",  # per round; tens of DP-SGD steps learn nothing here (benchmarks/README)
    "fed.rounds=2",
    "eval.every=2",
    "export=false",
    "progress=false",
]
DP = ["privacy.max_grad_norm=0.1", "privacy.accountant=prv"]  # with privacy.mode=sample only (else an error)


def tuned_rates(preset: str) -> dict[str, list[str]]:
    path = ROOT / "benchmarks" / "out" / f"methods-{preset}" / "tuned_lr.json"
    if not path.is_file():
        return {}
    from fedsb.compare import best_rates

    return best_rates(json.loads(path.read_text()))


def check_claim(table: dict[str, dict[str, float]], epsilons: list[str]) -> tuple[bool, list[str]]:
    """Fed-SB (best rank) >= FFA-LoRA > FedIT at every epsilon."""
    lines, ok = [], True
    for eps in epsilons:
        row = table[eps]
        sb = max((v for k, v in row.items() if k.startswith("fedsb")), default=float("nan"))
        ffa = max((v for k, v in row.items() if k.startswith("ffa")), default=float("nan"))
        fedit = max((v for k, v in row.items() if k.startswith("fedit")), default=float("nan"))
        holds = sb >= ffa > fedit
        ok &= holds
        lines.append(
            f"eps {eps}: Fed-SB {100 * sb:.1f}% {'>=' if sb >= ffa else '<'} FFA {100 * ffa:.1f}% "
            f"{'>' if ffa > fedit else '<='} FedIT {100 * fedit:.1f}%  {'holds' if holds else 'DOES NOT HOLD'}"
        )
    return ok, lines


def plot(table: dict[str, dict[str, float]], nodp: dict[str, float], epsilons: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [float(e) for e in epsilons]
    for label in table[epsilons[0]]:
        line = ax.plot(xs, [100 * table[e][label] for e in epsilons], marker="o", label=label)
        if label in nodp:
            ax.axhline(100 * nodp[label], color=line[0].get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("epsilon (record-level, max over clients; delta = 1/N_client)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("DP-SGD in each client: accuracy vs privacy (dotted: no DP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- DP step time --------------------------------------------------------------------------------------------


def one_client(config: str, overrides: list[str]) -> tuple[Any, Any, Any, Any, Any]:
    """(cfg, task, method, prepared data, (client id, client)) for one client of the job these settings
    describe: the model loaded, the method's adapters injected, the first client's data prepared."""
    from fedsb.config import resolve_config
    from fedsb.job import build_components

    cfg = resolve_config(config, overrides)
    parts = build_components(cfg, role="client")  # model, data and method; no basis data, ledger or plan
    assert parts.data is not None
    return cfg, parts.task, parts.method, parts.data, next(iter(parts.data.clients.items()))


def step_times(config: str, rank: int, steps: int, repeats: int, threads: int) -> dict[str, Any]:
    """Median seconds per local step, DP-SGD vs plain, same model, data, batch size and threads."""
    import torch

    from fedsb.privacy.ledger import PrivacyLedger
    from fedsb.train.local import StepPlan, loss_for, train_local
    from fedsb.train.schedule import Schedule

    torch.set_num_threads(threads)
    overrides = [*SHARED, f"adapter.rank={rank}", "init.method=random", f"train.local_steps={steps}"]
    cfg, task, method, data, (cid, client) = one_client(
        config, [*overrides, "fed.method=fedsb", "privacy.mode=sample", *DP, "privacy.noise_multiplier=1.0"]
    )
    ledger = PrivacyLedger.plan(cfg, data.client_sizes, dict.fromkeys(data.clients, steps), init_info={})
    params = method.adapted.trainable_parameters()
    sched = Schedule(base_lr=cfg.train.lr, total=steps, warmup=0, kind="constant")
    times: dict[str, list[float]] = {"dp": [], "plain": []}
    batch_sizes: list[float] = []
    for rep in range(repeats + 1):  # the first repeat warms up kernels and caches, not timed
        for kind in ("plain", "dp"):
            dp = ledger.dpsgd_for(cid) if kind == "dp" else None
            t0 = time.perf_counter()
            result, _ = train_local(
                method.adapted.model,
                params,
                client.loader,
                cfg.train,
                StepPlan(steps=steps, schedule=sched, seed=rep),
                loss_fn=loss_for(task, per_example=kind == "dp"),
                privacy=dp,
            )
            if rep > 0:
                times[kind].append((time.perf_counter() - t0) / steps)
                if kind == "dp":
                    batch_sizes.append(result.num_examples / steps)
    dp_med, plain_med = statistics.median(times["dp"]), statistics.median(times["plain"])
    return {
        "model": cfg.model.name,
        "rank": rank,
        "threads": threads,
        "steps_per_repeat": steps,
        "repeats": repeats,
        "batch_size": cfg.train.batch_size,
        "dp_mean_poisson_batch": statistics.mean(batch_sizes),
        "dp_seconds_per_step": times["dp"],
        "plain_seconds_per_step": times["plain"],
        "pair_ratios": [d / q for d, q in zip(times["dp"], times["plain"], strict=True)],
        "dp_median": dp_med,
        "plain_median": plain_med,
        "ratio": dp_med / plain_med,
    }


# ---- noise left in the effective update ------------------------------------------------------------------


def noise_in_update(
    config: str,
    specs: list[str],
    epsilons: list[str],
    steps: int,
    threads: int,
    rates: dict[str, list[str]],
    overrides: list[str],
) -> dict[str, dict[str, float]]:
    """Relative noise in one client's effective weight update after `steps` DP-SGD steps, per variant:

        ||dW(sigma) - dW(0)||_F / ||dW(0)||_F,   dW = sum over adapted layers of (s*delta after - before),

    with the same Poisson batches, clipping (C), optimizer, seed and starting point; sigma solved for the
    grid's whole plan (SHARED: 2 rounds x local_steps) at each epsilon. FedIT/FedEx (local training is the
    same LoRA) noise both factors of B A; FFA-LoRA only B; Fed-SB only R in B R A (B, A orthonormal, so
    ||B N A|| = ||N||). With AdamW the per-coordinate normalisation makes a noise-dominated update as large
    as a clean one (the ratio then sits near sqrt(2) whatever sigma is); train.optimizer=sgd shows the noise
    geometry itself."""
    import torch

    from fedsb.compare import parse_variants

    torch.set_num_threads(threads)
    return {
        v.label: _relative_noise(config, v, epsilons, steps, [*rates.get(v.label, []), *overrides])
        for v in parse_variants(specs)
    }


def _relative_noise(
    config: str, v: Any, epsilons: list[str], steps: int, extra: list[str]
) -> dict[str, float]:
    import torch

    from fedsb.adapters.layer import AdapterLayer
    from fedsb.config import resolve_config
    from fedsb.privacy.ledger import PrivacyLedger
    from fedsb.train.local import StepPlan, loss_for, train_local
    from fedsb.train.schedule import Schedule

    # the same Poisson batches for dW(sigma) and dW(0) need the seeded (research) noise source
    base = [*SHARED, f"fed.method={v.method}", "init.method=random", *extra, "privacy.mode=sample", *DP]
    base += ["privacy.reproducible_noise=true"]
    base += [f"adapter.rank={v.rank}"] if v.rank else []
    cfg0, task, method, data, (cid, client) = one_client(config, [*base, "privacy.noise_multiplier=0"])
    layers = [m for m in method.adapted.model.modules() if isinstance(m, AdapterLayer)]
    params = method.adapted.trainable_parameters()
    start = method.adapted.get_state()
    before = [m.delta_weight() for m in layers]
    sched = Schedule(base_lr=cfg0.train.lr, total=steps, warmup=0, kind="constant")

    def update(cfg: Any) -> list[torch.Tensor]:
        method.adapted.set_state(start)
        planned = dict.fromkeys(data.clients, cfg.train.local_steps)
        ledger = PrivacyLedger.plan(cfg, data.client_sizes, planned, init_info={})
        train_local(
            method.adapted.model,
            params,
            client.loader,
            cfg.train,
            StepPlan(steps=steps, schedule=sched, seed=0),
            loss_fn=loss_for(task, per_example=True),
            privacy=ledger.dpsgd_for(cid),
        )
        return [m.delta_weight() - b for m, b in zip(layers, before, strict=True)]

    clean = update(cfg0)
    clean_norm = torch.sqrt(sum((d**2).sum() for d in clean)).item()
    out: dict[str, float] = {}
    for eps in epsilons:
        noisy = update(resolve_config(config, [*base, f"privacy.target_epsilon={eps}"]))
        err = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(noisy, clean, strict=True))).item()
        out[eps] = err / clean_norm
        print(f"{v.label} eps {eps}: relative noise in dW after {steps} DP steps {out[eps]:.3f}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "sst2-minilm.yaml"))
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--epsilons", default=DEFAULT_EPSILONS)
    p.add_argument("--output", default=None, help="default: benchmarks/out/dp-<preset name>")
    p.add_argument("--step-time-only", action="store_true")
    p.add_argument("--no-reference", action="store_true", help="skip the non-private reference runs")
    p.add_argument(
        "--reference-methods",
        nargs="+",
        default=None,
        help="the variants that get a non-private reference (default: all of --methods)",
    )
    p.add_argument("--skip-step-time", action="store_true")
    p.add_argument(
        "--runs-only",
        action="store_true",
        help="only run the given epsilons (no reference, table or step time): split the work over processes",
    )
    p.add_argument(
        "--reference-only", action="store_true", help="only the non-private reference runs (see --runs-only)"
    )
    p.add_argument(
        "--noise-only",
        action="store_true",
        help="only measure the relative noise DP-SGD leaves in each variant's effective update (no training runs)",
    )
    p.add_argument("--noise-steps", type=int, default=20, help="DP-SGD steps for --noise-only (default 20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="key=value settings for every run")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from fedsb.compare import parse_variants, run_comparison

    preset = Path(args.config).stem
    out = Path(args.output or ROOT / "benchmarks" / "out" / f"dp-{preset}")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"config": args.config, "shared": SHARED + DP + args.overrides}
    if args.noise_only:
        noise = noise_in_update(
            args.config,
            args.methods,
            args.epsilons.split(","),
            args.noise_steps,
            args.threads,
            tuned_rates(preset),
            args.overrides,
        )
        optimizer = next(
            (o.split("=", 1)[1] for o in args.overrides if o.startswith("train.optimizer=")), "adamw"
        )
        (out / f"noise-{optimizer}.json").write_text(
            json.dumps(
                {"steps": args.noise_steps, "overrides": args.overrides, "relative_noise": noise}, indent=2
            )
        )
        return 0
    if not args.step_time_only:
        variants = parse_variants(args.methods)
        rates = tuned_rates(preset)
        shared = [*SHARED, f"threads={args.threads}", *args.overrides]
        epsilons = args.epsilons.split(",")
        references = parse_variants(args.reference_methods) if args.reference_methods else variants
        if args.reference_only:
            run_comparison(
                references,
                output=out / "nodp",
                config_file=args.config,
                overrides=shared,
                variant_overrides=rates,
            )
            return 0
        if args.runs_only:
            for eps in epsilons:
                run_comparison(
                    variants,
                    output=out / f"eps{eps}",
                    config_file=args.config,
                    overrides=[*shared, "privacy.mode=sample", *DP, f"privacy.target_epsilon={eps}"],
                    variant_overrides=rates,
                )
            return 0
        nodp: dict[str, float] = {}
        if not args.no_reference:
            nodp_rows = run_comparison(
                references,
                output=out / "nodp",
                config_file=args.config,
                overrides=shared,
                variant_overrides=rates,
            )
            nodp = {r["variant"]: r["accuracy"] for r in nodp_rows}
        table: dict[str, dict[str, float]] = {}
        runs: dict[str, list[dict[str, Any]]] = {}
        for eps in epsilons:
            rows = run_comparison(
                variants,
                output=out / f"eps{eps}",
                config_file=args.config,
                overrides=[*shared, "privacy.mode=sample", *DP, f"privacy.target_epsilon={eps}"],
                variant_overrides=rates,
            )
            runs[eps] = rows
            table[eps] = {r["variant"]: r["accuracy"] for r in rows}
        eps_spent = {
            eps: {
                r["variant"]: json.loads((Path(r["run_dir"]) / "results.json").read_text())["privacy"][
                    "max_epsilon"
                ]
                for r in rows
            }
            for eps, rows in runs.items()
        }
        labels = list(table[epsilons[0]])
        head = "| epsilon | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels)
        body = [
            f"| {eps} | " + " | ".join(f"{100 * table[eps][v]:.1f}%" for v in labels) + " |"
            for eps in epsilons
        ]
        if nodp:
            body.append(
                "| no DP | "
                + " | ".join(f"{100 * nodp[v]:.1f}%" if v in nodp else "-" for v in labels)
                + " |"
            )
        md = "\n".join([head, *body]) + "\n"
        (out / "dp.md").write_text(md)
        plot(table, nodp, epsilons, out / "dp.png")
        ok, lines = check_claim(table, epsilons)
        report.update(
            accuracy=table,
            no_dp=nodp,
            epsilon_spent=eps_spent,
            learning_rates=rates,
            claim_holds=ok,
            claim=lines,
        )
        print(md)
        print("\n".join(lines))
        print(f"claim (Fed-SB >= FFA-LoRA > FedIT at every epsilon): {'holds' if ok else 'DOES NOT HOLD'}")
    step_file = out / "step_time.json"
    if args.skip_step_time and step_file.is_file():  # keep the last measured step time in the report
        report["step_time"] = json.loads(step_file.read_text())
    elif not args.skip_step_time:
        st = step_times(args.config, rank=32, steps=10, repeats=5, threads=args.threads)
        step_file.write_text(json.dumps(st, indent=2))
        report["step_time"] = st
        print(
            f"DP step {st['dp_median']:.3f} s vs plain {st['plain_median']:.3f} s (median of {st['repeats']} x "
            f"{st['steps_per_repeat']} steps, batch {st['batch_size']}, {st['threads']} threads): ratio "
            f"{st['ratio']:.2f} (target <= 1.3)"
        )
    (out / "dp.json").write_text(json.dumps(report, indent=2))
    print(f"table: {out / 'dp.md'}  plot: {out / 'dp.png'}  json: {out / 'dp.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
