"""The same job three ways: in-process simulator, Flower simulation (`flwr run`), loopback deployment.

    python benchmarks/bench_flower.py                      # the default job (SmolLM2-135M), 2 clients x 2 rounds
    python benchmarks/bench_flower.py --config configs/tiny.yaml --rounds 3 --out benchmarks/out/flower.json

Each mode runs the identical config (same seeds); the table gives end-to-end wall time (what a user
waits, start-up included), the job's own time inside the ServerApp (`run_job`'s total), the rounds' time,
the ledger's bytes, Flower's own count of the ArrayRecord payloads, and the final R's largest difference
from the in-process run. Deployment = SuperLink + one SuperNode per client as processes on 127.0.0.1, TLS
and SuperNode authentication on. Every Flower process is stopped by PID.

Per message, the ClientApp writes where its seconds went (`fedsb.flower.timing`): process start (Python,
Flower, the message fetch), our imports, model build, data preparation, basis verification, local
training, serialization, node state; and per round the overhead ratio (round wall - the round's local
training) / the round's local training, where a round's local training is the longest client's in the
Flower modes (clients train in parallel) and the sum of the clients' in-process (one after another).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from fedsb.flower.deploy import APP_DIR, LocalDeployment, flower_env, stop_local_superlink  # noqa: E402
from fedsb.flower.timing import ENV  # noqa: E402

PHASES = [
    "process start",
    "imports",
    "model build",
    "data preparation",
    "basis verification",
    "local training",
    "serialization",
    "node state",
    "other",
]


def overrides(clients: int, rounds: int, steps: int | None, train_size: int | None) -> list[str]:
    ov = [
        "threads=1",
        "progress=false",
        "export=false",
        "eval.every=100",
        "data.test_size=16",
        f"partition.num_clients={clients}",
        f"fed.rounds={rounds}",
    ]
    if steps is not None:
        ov.append(f"train.local_steps={steps}")
    if train_size is not None:
        ov.append(f"data.train_size={train_size}")
    return ov


def final_state(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}


def summarize(mode: str, wall: float, out: Path, clients: int) -> dict[str, Any]:
    res = json.loads((out / "results.json").read_text())
    totals = res["ledger"]["totals"]
    row = {
        "mode": mode,
        "wall_s": wall,
        "job_s": res["timing"]["total_seconds"],
        "rounds_s": res["timing"]["rounds_seconds"],
        "local_training_s": res["timing"]["local_training_seconds"],
        "ledger_bytes_rounds": totals["bytes_rounds"],
        "ledger_bytes_one_time": totals["bytes_one_time"],
        "flower_bytes_rounds": None,
        "flower_bytes_setup": None,
        "accuracy": (res.get("final") or {}).get("accuracy"),
    }
    row.update(round_overhead(res, workers=concurrent_clients(mode, clients)))
    wire_file = out / "flower_wire.json"
    if wire_file.exists():
        wire = json.loads(wire_file.read_text())
        row["flower_bytes_rounds"] = sum(w["bytes"] for w in wire if w["round"] > 0)
        row["flower_bytes_setup"] = sum(w["bytes"] for w in wire if w["round"] == 0)
    return row


def round_overhead(res: dict[str, Any], *, workers: int) -> dict[str, Any]:
    """Per round: wall seconds, local training on its critical path and the ratio (wall - training) /
    training; the mean ratio. With `workers` clients training at once (1: one after another in-process;
    the Ray actors of a Flower simulation; every client in a deployment), the critical path is at least
    the longest client's training and at least the sum of all of it over `workers`: the larger of the two."""
    rounds = []
    for r in res["rounds"]:
        train = [m.get("seconds", 0.0) for m in r["client_metrics"].values()]
        critical = max(max(train, default=0.0), sum(train) / workers)
        wall = r["seconds"]["total"]
        rounds.append(
            {
                "round": r["round"],
                "wall_s": wall,
                "train_s": critical,
                "train_sum_s": sum(train),
                "ratio": (wall - critical) / critical,
            }
        )
    return {"per_round": rounds, "overhead_ratio": sum(x["ratio"] for x in rounds) / len(rounds)}


def message_breakdown(timing: Path) -> dict[str, Any]:
    """Mean seconds per train message of each phase (`fedsb.flower.timing` lines), over all train messages
    and over the first one of each process (cold: fresh process, nothing cached)."""
    if not timing.exists():
        return {}
    lines = [json.loads(x) for x in timing.read_text().splitlines() if x.strip()]
    train = [x for x in lines if x["type"] == "train"]

    def split(x: dict[str, Any]) -> dict[str, float]:
        ph = dict(x["phases"])
        ph["process start"] = x["process_start_s"]
        ph["other"] = x["handler_s"] - sum(x["phases"].values())
        return {k: ph.get(k, 0.0) for k in PHASES}

    def mean(xs: list[dict[str, Any]]) -> dict[str, float]:
        return {k: sum(split(x)[k] for x in xs) / len(xs) for k in PHASES} if xs else {}

    return {
        "messages": len(train),
        "setup_messages": len(lines) - len(train),
        "fresh_processes": sum(x["fresh_process"] for x in train),
        "mean": mean(train),
        "later_rounds_mean": mean([x for x in train if x["round"] > 1]),
        "lines": lines,
    }


FLOOR = """
import json, time
t0 = time.perf_counter()
import torch, transformers
t1 = time.perf_counter()
import flwr.clientapp
out = {"import torch+transformers": t1 - t0, "import flwr": time.perf_counter() - t1}
if {smollm2}:
    from fedsb.models.load import prepare_smollm2
    path = prepare_smollm2()
    t2 = time.perf_counter()
    transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    out["load the converted checkpoint"] = time.perf_counter() - t2
print(json.dumps(out))
"""


def bare_floor(cfg_file: str, ov: list[str]) -> dict[str, float]:
    """What any ClientApp that trains this model pays in a fresh process, fedsb aside: Python start-up,
    `import torch, transformers`, and (SmolLM2) loading the converted checkpoint; seconds."""
    from fedsb.config import resolve_config

    smollm2 = resolve_config(cfg_file or None, ov).model.name == "smollm2-135m"
    res = subprocess.run(
        [sys.executable, "-c", FLOOR.replace("{smollm2}", str(smollm2))],
        env=flower_env(Path(tempfile.gettempdir()) / "unused-home"),
        capture_output=True,
        text=True,
        check=True,
    )
    out = json.loads(res.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    out["python start-up"] = time.perf_counter() - t0
    return out


def run_inprocess(cfg_file: str, ov: list[str], out: Path) -> float:
    code = (
        "import sys; from fedsb.config import resolve_config; from fedsb.run import run_job; "
        f"run_job(resolve_config({cfg_file or None!r}, {[*ov, f'output_dir={out}']!r}), echo=lambda s: None)"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=flower_env(out.parent / "unused-home"))
    return time.perf_counter() - t0


def concurrent_clients(mode: str, clients: int) -> int:
    """Clients that train at once: 1 in-process; in a Flower simulation its Ray actors (one CPU each, as
    `run_simulation` asks); in a deployment every client (one process each)."""
    if mode == MODES["inprocess"][0]:
        return 1
    if mode == MODES["simulation"][0]:
        return max(1, min(clients, os.cpu_count() or 1))
    return clients


def run_simulation(cfg_file: str, ov: list[str], out: Path, clients: int) -> float:
    home = out.parent / "flwr-home-sim"
    run_config = f'config="{cfg_file}" overrides="{" ".join(ov)}" output-dir="{out}"'
    cmd = ["flwr", "run", str(APP_DIR), "local", "--stream", "--run-config", run_config]
    cmd += ["--federation-config", f"num-supernodes={clients} client-resources-num-cpus=1"]
    env = {**flower_env(home, own_local_superlink=True), ENV: str(out.parent / f"timing-{out.name}.jsonl")}
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if res.returncode != 0 or not (out / "results.json").exists():
            raise RuntimeError(f"flwr run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    finally:
        stop_local_superlink(home)
    return wall


def run_deployment(cfg_file: str, ov: list[str], out: Path, clients: int, *, warm: bool = True) -> float:
    """The loopback deployment; `warm`: SuperNodes in process isolation with the warm SuperExec
    (`fedsb.flower.warm`, ClientApps forked), else Flower's default (a fresh `flwr-clientapp` a message)."""
    t0 = time.perf_counter()
    dep = LocalDeployment(clients, out.parent / f"deployment-{out.name}", warm=warm)
    dep.env[ENV] = str(
        out.parent / f"timing-{out.name}.jsonl"
    )  # inherited by SuperNodes and their ClientApps
    with dep:
        code, log = dep.run_app(
            {"config": cfg_file, "overrides": " ".join(ov), "output-dir": str(out)}, timeout=1800
        )
        if code != 0 or not (out / "results.json").exists():
            raise RuntimeError(f"deployment run failed:\n{log[-3000:]}")
    return time.perf_counter() - t0


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'mode':<22}{'wall s':>8}{'job s':>8}{'rounds s':>10}{'train s':>9}{'overhead':>10}"
        f"{'ledger B/rounds':>17}{'Flower B/rounds':>17}{'ledger B/once':>15}{'Flower B/once':>15}{'max|dR|':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        fb = "-" if r["flower_bytes_rounds"] is None else f"{r['flower_bytes_rounds']:,}"
        fs = "-" if r["flower_bytes_setup"] is None else f"{r['flower_bytes_setup']:,}"
        lines.append(
            f"{r['mode']:<22}{r['wall_s']:>8.1f}{r['job_s']:>8.1f}{r['rounds_s']:>10.1f}"
            f"{sum(x['train_s'] for x in r['per_round']):>9.2f}"
            f"{r['overhead_ratio']:>9.0%} {r['ledger_bytes_rounds']:>16,}{fb:>17}{r['ledger_bytes_one_time']:>15,}"
            f"{fs:>15}{r['max_dR']:>10.2g}"
        )
    return "\n".join(lines)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """Mean seconds per train message, by phase: every message, and rounds after the first."""
    head = f"{'mode':<34}" + "".join(f"{k[:12]:>13}" for k in PHASES)
    lines = [head, "-" * len(head)]
    for r in rows:
        b = r.get("messages") or {}
        for label, key in (("all", "mean"), ("rounds > 1", "later_rounds_mean")):
            if b.get(key):
                name = (
                    f"{r['mode']} ({label}, n={b['messages']})" if key == "mean" else f"{r['mode']} ({label})"
                )
                lines.append(f"{name:<34}" + "".join(f"{b[key][k]:>13.2f}" for k in PHASES))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="", help="YAML preset ('' = the default job: SmolLM2-135M)")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-steps", type=int, default=None, help="train.local_steps (default: the config's)")
    p.add_argument("--train-size", type=int, default=None, help="data.train_size (default: the config's)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, any of {', '.join(MODES)} (the in-process run is always made: the reference R)",
    )
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        p.error(f"--modes: unknown {', '.join(unknown)}; choose from {', '.join(MODES)}")
    ov = overrides(args.clients, args.rounds, args.local_steps, args.train_size)
    cfg_file = str(Path(args.config).resolve()) if args.config else ""
    load = [os.getloadavg()]
    report = {"config": args.config, "overrides": ov, "load": load, "floor": {}, "rows": []}
    print(f"job: {Path(args.config).name or 'default'}, {args.clients} clients x {args.rounds} rounds, "
          f"overrides {' '.join(ov)}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        t = Path(tmp)
        ref_wall = run_inprocess(cfg_file, ov, t / "inprocess")
        ref = final_state(t / "inprocess")
        for mode in ["inprocess", *(m for m in modes if m != "inprocess")]:
            out = t / mode
            wall = ref_wall if mode == "inprocess" else MODES[mode][1](cfg_file, ov, out, args.clients)
            load.append(os.getloadavg())
            row = summarize(MODES[mode][0], wall, out, args.clients)
            got = final_state(out)
            row["max_dR"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
            row["messages"] = message_breakdown(t / f"timing-{mode}.jsonl")
            report["rows"].append(row)
            print(f"{row['mode']}: wall {wall:.1f} s, load {load[-1][0]:.1f}", flush=True)
            write(args.out, report)  # after every mode: a stopped run keeps what it measured
        report["floor"] = floor = bare_floor(cfg_file, ov)
        write(args.out, report)
    rows = report["rows"]
    print(f"load average (1 min) {', '.join(f'{x[0]:.1f}' for x in load)}")
    print(table(rows))
    print("\nseconds per train message (mean):")
    print(breakdown_table(rows))
    print(
        "\nfloor of a fresh process (no fedsb, no Flower): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in floor.items())
    )


def write(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=1))


def run_cold_deployment(cfg_file: str, ov: list[str], out: Path, clients: int) -> float:
    return run_deployment(cfg_file, ov, out, clients, warm=False)


#: --modes name -> (table label, runner(cfg_file, overrides, out, clients) -> wall seconds)
MODES: dict[str, tuple[str, Any]] = {
    "inprocess": ("in-process simulator", run_inprocess),
    "simulation": ("Flower simulation", run_simulation),
    "deployment": ("deployment (warm)", run_deployment),
    "deployment-cold": ("deployment (cold)", run_cold_deployment),
}

if __name__ == "__main__":
    main()
