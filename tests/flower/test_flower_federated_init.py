"""init.source=federated over Flower: the init's exchanges are `query.init` messages to the real ClientApp
(in-process Grid, a fresh process per message) and the job equals the simulator's: the same basis (B, A,
fingerprint), the same one-time ledger lines and the same epsilons (DP: reproducible noise)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.flower.client_app import app as client_app
from fedsb.flower.protocol import INIT_MESSAGE, AppSettings
from fedsb.flower.server_app import run_flower_job
from fedsb.init.basis import Basis
from fedsb.run import run_job
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = [
    "threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4", "fed.rounds=2",
    "train.local_steps=1", "init.source=federated",
]  # fmt: skip
DP = [
    "privacy.mode=sample", "privacy.accountant=rdp", "privacy.target_epsilon=8", "init.noise_multiplier=2.0",
    "init.clip_norm=0.01", "privacy.reproducible_noise=true",
]  # fmt: skip


def checkpoint(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k: v for k, v in tensors.items() if k.startswith("global/")}


def both(tmp: Path, extra: list[str]) -> tuple[dict, dict, LocalGrid]:
    cfg = resolve_config(TINY, [*BASE, *extra, f"output_dir={tmp / 'sim'}"])
    sim = run_job(cfg, echo=lambda s: None)
    grid = LocalGrid(client_app, 2)
    grid.fresh_processes = True
    settings = AppSettings(config=TINY, overrides=" ".join(BASE + extra), output_dir=str(tmp / "flwr"))
    return sim, run_flower_job(grid, settings), grid


@pytest.mark.parametrize(
    ("extra", "messages"),
    [(["init.exchange=dense"], 1), (["init.exchange=sketch"], 2), (["init.exchange=sketch", *DP], 2)],
    ids=["dense", "sketch", "sketch-dp"],
)
def test_a_federated_init_over_flower_equals_the_simulator(
    tmp_path: Path, extra: list[str], messages: int
) -> None:
    sim, flwr, grid = both(tmp_path, extra)
    # the exchanges went to the nodes as messages: one per exchange per init client
    init = [m for m in grid.pushed if m.metadata.message_type == INIT_MESSAGE]
    assert len(init) == messages * len(sim["init"]["federated_init"]["clients"])
    assert flwr["basis_fingerprint"] == sim["basis_fingerprint"]
    a, b = Basis.load(tmp_path / "sim" / "basis"), Basis.load(tmp_path / "flwr" / "basis")
    assert set(a.factors) == set(b.factors)
    for p, f in a.factors.items():
        g = b.factors[p]
        for x, y in ((f.B, g.B), (f.A, g.A), (f.R0, g.R0)):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    assert flwr["ledger"]["one_time"] == sim["ledger"]["one_time"]
    assert flwr["init"]["federated_init"] == sim["init"]["federated_init"]
    # Flower's own byte count of the init's uploads is the ledger's (fp32 payload of each release)
    up = sum(w["bytes"] for w in flwr["flower_wire"] if "init_exchange" in w and w["direction"] == "up")
    lines = [e for e in sim["ledger"]["one_time"] if e["item"].startswith("federated init")]
    ledger_up = sum(e["bytes"] for e in lines if e["direction"] == "up")
    assert ledger_up > 0 and up >= ledger_up
    if "privacy.mode=sample" in extra:
        for cid, acc in sim["privacy"]["accounts"].items():
            got = flwr["privacy"]["accounts"][cid]
            assert got["history"] == acc["history"] and got["history"][0] == [2.0, 1.0, 2]
            assert got["epsilon"] == pytest.approx(acc["epsilon"], rel=1e-9)
    # and the rounds trained on it agree: the final global state is the simulator's
    x, y = checkpoint(tmp_path / "sim"), checkpoint(tmp_path / "flwr")
    assert set(x) == set(y) and x
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-6)
