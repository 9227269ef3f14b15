"""Run artefacts: manifest (versions, git hash, seeds), results JSON, learning-curve PNG, final table."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedsb.privacy.mechanism import mechanism_named

PACKAGES = (
    "fedsb",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "flwr",
    "flwr-datasets",
    "opacus",
    "safetensors",
    "numpy",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(path: str | Path | None = None) -> dict[str, Any]:
    """Commit hash and dirty flag of the checkout holding fedsb (None outside a git checkout)."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def system_info() -> dict[str, Any]:
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_default, allow_nan=True))
    os.replace(tmp, path)


def _default(obj: Any) -> Any:
    if isinstance(obj, set | tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def plot_learning_curve(results: dict[str, Any], path: Path) -> Path:
    """Accuracy and training loss per round (accuracy also against cumulative MB communicated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = results["rounds"]
    cum_mb, total = [], 0.0
    per_round_bytes = {r["round"]: r["bytes_total"] for r in results["ledger"]["rounds"]}
    for r in rounds:
        total += per_round_bytes.get(r["round"], 0) / 1e6
        cum_mb.append(total)
    acc_pts = [(0, 0.0, results["before"]["accuracy"])] if results.get("before") else []
    acc_pts += [
        (r["round"], mb, r["eval"]["accuracy"]) for r, mb in zip(rounds, cum_mb, strict=True) if r.get("eval")
    ]
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    ax = axes[0]
    ax.plot([p[0] for p in acc_pts], [100 * p[2] for p in acc_pts], "o-")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy per round (round 0 = untuned)")
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot([p[1] for p in acc_pts], [100 * p[2] for p in acc_pts], "o-", color="C2")
    ax.set_xlabel("cumulative MB communicated (both ways)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("accuracy vs bytes")
    ax.grid(alpha=0.3)
    ax = axes[2]
    losses = [(r["round"], r["train_loss"]) for r in rounds if not math.isnan(r["train_loss"])]
    ax.plot([p[0] for p in losses], [p[1] for p in losses], "o-", color="C1")
    ax.set_xlabel("round")
    ax.set_ylabel("mean local training loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    for ax in (axes[0], axes[2]):  # rounds are whole numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(
        f"{results['method']} on {results['task']} ({results['model']}), {results['num_clients']} clients"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def final_table(results: dict[str, Any]) -> str:
    """The table printed at the end of `fedsb run`."""
    ledger = results["ledger"]
    before = results.get("before") or {}
    after = results.get("final") or {}
    n_rounds = len(ledger["rounds"])
    per_round = ledger["totals"]["bytes_rounds"] / max(1, n_rounds)
    one_way = ledger["params_per_client_per_round_one_way"]
    rows = [
        (
            "accuracy before (untuned)",
            f"{100 * before['accuracy']:.1f}%  ({before.get('correct', '?')}/{before.get('total', '?')})"
            if before
            else "not evaluated (eval.initial=false)",
        ),
        (
            f"accuracy after {results['rounds_completed']} round(s)",
            f"{100 * after.get('accuracy', float('nan')):.1f}%  ({after.get('correct', '?')}/{after.get('total', '?')})",
        ),
    ]
    if before:
        rows.append(("change", f"{100 * (after.get('accuracy', math.nan) - before['accuracy']):+.1f} points"))
    rows += [
        ("parameters per client per round (one way)", f"{one_way:,}"),
        ("bytes per round (all clients, up + down)", human_bytes(per_round)),
        ("total bytes over rounds", human_bytes(ledger["totals"]["bytes_rounds"])),
        ("one-time bytes (basis broadcast)", human_bytes(ledger["totals"]["bytes_one_time"])),
        ("wall time", f"{results['timing']['total_seconds']:.1f} s"),
    ]
    privacy = results.get("privacy")
    mechanism = mechanism_named(privacy.get("mode", "none")) if privacy else None
    if mechanism is not None and mechanism.private:
        rows.append(
            (
                f"privacy epsilon ({mechanism.epsilon_scope})",
                f"{privacy['max_epsilon']:.3f} at delta <= {privacy['delta']:.2e}",
            )
        )
        rows.append(
            (
                "privacy noise",
                "REPRODUCIBLE from the run seed: the guarantee does NOT hold against a reader of the config"
                if privacy.get("reproducible_noise")
                else "secret (OS CSPRNG); losses and timings stayed on the clients",
            )
        )
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    rule = "-" * (width + 30)
    title = f"fedsb run: {results['method']} on {results['task']} with {results['model']}"
    return "\n".join([rule, title, rule, *lines, rule, f"results: {results['output_dir']}"])
