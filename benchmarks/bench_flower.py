"""The same small job three ways: in-process simulator, Flower simulation (`flwr run`), loopback deployment.

    python benchmarks/bench_flower.py                      # tiny Llama, 2 clients x 3 rounds (about 3 min)
    python benchmarks/bench_flower.py --rounds 2 --clients 2 --out benchmarks/out/flower.json

Each mode runs the identical config (same seeds); the table gives end-to-end wall time (what a user
waits, start-up included), the job's own time inside the ServerApp (`run_job`'s total), the rounds' time,
the ledger's bytes, Flower's own count of the ArrayRecord payloads, and the final R's largest difference
from the in-process run. Deployment = SuperLink + one SuperNode per client as processes on 127.0.0.1, TLS
and SuperNode authentication on. Every Flower process is stopped by PID.
"""

from __future__ import annotations

import argparse
import json
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


def overrides(clients: int, rounds: int) -> list[str]:
    return [
        "threads=1",
        "progress=false",
        "export=false",
        "eval.every=100",
        "data.test_size=16",
        f"partition.num_clients={clients}",
        f"data.train_size={32 * clients}",
        f"fed.rounds={rounds}",
    ]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}


def summarize(mode: str, wall: float, out: Path) -> dict[str, Any]:
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
    wire_file = out / "flower_wire.json"
    if wire_file.exists():
        wire = json.loads(wire_file.read_text())
        row["flower_bytes_rounds"] = sum(w["bytes"] for w in wire if w["round"] > 0)
        row["flower_bytes_setup"] = sum(w["bytes"] for w in wire if w["round"] == 0)
    return row


def run_inprocess(cfg_file: str, ov: list[str], out: Path) -> float:
    code = (
        "import sys; from fedsb.config import resolve_config; from fedsb.run import run_job; "
        f"run_job(resolve_config({cfg_file!r}, {[*ov, f'output_dir={out}']!r}), echo=lambda s: None)"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=flower_env(out.parent / "unused-home"))
    return time.perf_counter() - t0


def run_simulation(cfg_file: str, ov: list[str], out: Path, clients: int) -> float:
    home = out.parent / "flwr-home-sim"
    run_config = f'config="{cfg_file}" overrides="{" ".join(ov)}" output-dir="{out}"'
    cmd = ["flwr", "run", str(APP_DIR), "local", "--stream", "--run-config", run_config]
    cmd += ["--federation-config", f"num-supernodes={clients} client-resources-num-cpus=1"]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            cmd, env=flower_env(home, own_local_superlink=True), capture_output=True, text=True, timeout=900
        )
        wall = time.perf_counter() - t0
        if res.returncode != 0 or not (out / "results.json").exists():
            raise RuntimeError(f"flwr run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    finally:
        stop_local_superlink(home)
    return wall


def run_deployment(cfg_file: str, ov: list[str], out: Path, clients: int) -> float:
    t0 = time.perf_counter()
    with LocalDeployment(clients, out.parent / "deployment") as dep:
        code, log = dep.run_app(
            {"config": cfg_file, "overrides": " ".join(ov), "output-dir": str(out)}, timeout=900
        )
        if code != 0 or not (out / "results.json").exists():
            raise RuntimeError(f"deployment run failed:\n{log[-3000:]}")
    return time.perf_counter() - t0


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'mode':<22}{'wall s':>8}{'job s':>8}{'rounds s':>10}{'train s':>9}"
        f"{'ledger B/rounds':>17}{'Flower B/rounds':>17}{'ledger B/once':>15}{'Flower B/once':>15}{'max|dR|':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        fb = "-" if r["flower_bytes_rounds"] is None else f"{r['flower_bytes_rounds']:,}"
        fs = "-" if r["flower_bytes_setup"] is None else f"{r['flower_bytes_setup']:,}"
        lines.append(
            f"{r['mode']:<22}{r['wall_s']:>8.1f}{r['job_s']:>8.1f}{r['rounds_s']:>10.1f}{r['local_training_s']:>9.2f}"
            f"{r['ledger_bytes_rounds']:>17,}{fb:>17}{r['ledger_bytes_one_time']:>15,}{fs:>15}{r['max_dR']:>10.2g}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    ov = overrides(args.clients, args.rounds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
        t = Path(tmp)
        walls = {
            "in-process simulator": run_inprocess(args.config, ov, t / "inprocess"),
            "Flower simulation": run_simulation(args.config, ov, t / "simulation", args.clients),
            "deployment (TLS+auth)": run_deployment(args.config, ov, t / "deployment-out", args.clients),
        }
        ref = final_state(t / "inprocess")
        for mode, d in zip(walls, ("inprocess", "simulation", "deployment-out"), strict=True):
            row = summarize(mode, walls[mode], t / d)
            got = final_state(t / d)
            row["max_dR"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
            rows.append(row)
    print(
        f"job: {Path(args.config).name}, {args.clients} clients x {args.rounds} rounds, overrides {' '.join(ov)}"
    )
    print(table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"config": args.config, "overrides": ov, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
