"""The Flower app over an in-process Grid: same R as the simulator, ledger = Flower bytes, faults, errors."""

from __future__ import annotations

from pathlib import Path

import torch

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.flower.client_app import app as client_app
from fedsb.flower.protocol import AppSettings
from fedsb.flower.server_app import run_flower_job
from fedsb.run import run_job
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4"]


def final_state(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}


def flower(tmp: Path, overrides: list[str], grid: LocalGrid | None = None) -> dict:
    grid = grid or LocalGrid(client_app, 2)
    settings = AppSettings(config=TINY, overrides=" ".join(BASE + overrides), output_dir=str(tmp))
    return run_flower_job(grid, settings)


def simulate(tmp: Path, overrides: list[str]) -> dict:
    cfg = resolve_config(TINY, [*BASE, *overrides, f"output_dir={tmp}"])
    return run_job(cfg, echo=lambda s: None)


def test_flower_matches_the_simulator_and_its_bytes_equal_the_ledger(tmp_path: Path) -> None:
    ref = simulate(tmp_path / "sim", [])
    res = flower(tmp_path / "flwr", [])
    a, b = final_state(tmp_path / "sim"), final_state(tmp_path / "flwr")
    assert set(a) == set(b) and any(k.endswith("lora_sb_R.weight") for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    wire = res["flower_wire"]
    ledger = res["ledger"]
    for direction in ("up", "down"):
        flwr_bytes = sum(w["bytes"] for w in wire if w["round"] > 0 and w["direction"] == direction)
        assert flwr_bytes == ledger["totals"][f"bytes_{direction}"] > 0
    setup = sum(w["bytes"] for w in wire if w["round"] == 0)
    assert setup == ledger["one_time"][0]["bytes"] > 0
    assert res["rounds_completed"] == ref["rounds_completed"] == 2
