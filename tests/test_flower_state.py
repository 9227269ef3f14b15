"""What a client keeps between rounds, over Flower: folded W0 (FedEx-LoRA, FLoRA), optimizer state, DP-SGD.

The in-process Grid runs the real ClientApp with `fresh_processes`: every message meets an empty process
cache, as a deployed `flwr-clientapp` process does, so only the node's Context carries anything between
rounds. Each run is compared with the in-process simulator on the same job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.flower import node_state
from fedsb.flower.client_app import app as client_app
from fedsb.flower.protocol import AppSettings
from fedsb.flower.records import from_record
from fedsb.flower.server_app import run_flower_job
from fedsb.run import run_job
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4"]
#: seed 6 samples [00, 01], [01, 02], [01, 02], [00, 02]: client-00 misses rounds 2 and 3, returns in round 4
MISSES = [
    "seed=6",
    "partition.num_clients=3",
    "fed.clients_per_round=2",
    "fed.rounds=4",
    "train.local_steps=1",
]
NODE = {"client-00": 1000, "client-01": 1001, "client-02": 1002}


def checkpoint(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return tensors


def simulate(tmp: Path, overrides: list[str]) -> dict:
    cfg = resolve_config(TINY, [*BASE, *overrides, f"output_dir={tmp}"])
    return run_job(cfg, echo=lambda s: None)


def flower(tmp: Path, overrides: list[str], grid: LocalGrid) -> dict:
    grid.fresh_processes = True
    settings = AppSettings(config=TINY, overrides=" ".join(BASE + overrides), output_dir=str(tmp))
    return run_flower_job(grid, settings)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal within 1e-6; a kept fold's stack (B_st, A_st) compares as B_st A_st, since its blocks come in
    the order the replies arrived."""
    assert set(a) == set(b)
    for k in a:
        if "/folds/" in k and k.endswith(".B"):
            base = k.removesuffix(".B")
            x, y = a[k].double() @ a[base + ".A"].double(), b[k].double() @ b[base + ".A"].double()
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
        elif not ("/folds/" in k and k.endswith(".A")):
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["fedex", "flora"])
def test_folding_methods_match_the_simulator_when_a_client_misses_two_rounds(
    tmp_path: Path, method: str
) -> None:
    extra = [f"fed.method={method}", *MISSES]
    ref = simulate(tmp_path / "sim", extra)
    grid = LocalGrid(client_app, 3)
    res = flower(tmp_path / "flwr", extra, grid)
    sampled = [r["sampled"] for r in res["rounds"]]
    assert sampled == [r["sampled"] for r in ref["rounds"]]
    assert (
        "client-00" in sampled[0] and "client-00" not in sampled[1] + sampled[2] and "client-00" in sampled[3]
    )
    assert [sorted(r["accepted"]) for r in res["rounds"]] == sampled  # nobody refused: every W0 was current
    # the final model (global state, the folded base weights, the folds still kept) equals the simulator's
    a, b = checkpoint(tmp_path / "sim"), checkpoint(tmp_path / "flwr")
    assert any(k.startswith("global/base/") for k in a)
    assert_same_tensors(a, b)
    # client-00 caught up on the folds of rounds 1-3 in one download and holds the same W0 as client-02,
    # which applied them one round at a time
    w0 = {
        c: from_record(grid.contexts[NODE[c]].state.array_records[node_state.W0])
        for c in ("client-00", "client-02")
    }
    for c in w0:
        assert node_state.node_record(grid.contexts[NODE[c]])["fold-round"] == 3
    for path in w0["client-00"]:
        assert torch.equal(w0["client-00"][path], w0["client-02"][path])

    # the catch-up folds travel and are counted, as in the simulator
    def lines(r: dict) -> list[tuple]:
        return sorted(
            (e["round"], e["client"], e["direction"], e["bytes"], e["status"]) for e in r["ledger"]["entries"]
        )

    assert lines(res) == lines(ref)
    down = {e["round"]: e["bytes"] for e in res["ledger"]["entries"] if e["direction"] == "down"}
    assert down[4] > down[3]
    wire = [w["bytes"] for w in res["flower_wire"] if w["round"] == 4 and w["direction"] == "down"]
    assert wire == [down[4]] * 2


def test_a_folding_node_that_restarted_is_refused_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SuperNode that lost its W0 (and its setup) mid-run is dropped with the reason; the run goes on."""
    extra = ["fed.method=fedex", *MISSES, "fed.min_clients=1"]
    grid = LocalGrid(client_app, 3)
    restart_before = {3: NODE["client-01"]}  # client-01 trained rounds 1 and 2, then its SuperNode restarts
    push = grid.push_messages

    def push_and_restart(messages):  # noqa: ANN001, ANN202
        messages = list(messages)
        rounds = {int(m.metadata.group_id) for m in messages if m.metadata.message_type == "train"}
        for r in rounds & set(restart_before):
            grid.restart(restart_before.pop(r))
        return push(messages)

    grid.push_messages = push_and_restart  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="fedsb.flower.server"):
        res = flower(tmp_path, extra, grid)
    assert res["rounds_completed"] == 4
    assert res["rounds"][2]["dropped"] == ["client-01"] and res["rounds"][2]["accepted"] == ["client-02"]
    assert "round 3: client-01 failed" in caplog.text and "before setup" in caplog.text


def test_keep_optimizer_state_matches_the_simulator(tmp_path: Path) -> None:
    extra = ["train.keep_optimizer_state=true", "fed.rounds=3"]
    simulate(tmp_path / "sim", extra)
    grid = LocalGrid(client_app, 2)
    flower(tmp_path / "flwr", extra, grid)
    a, b = checkpoint(tmp_path / "sim"), checkpoint(tmp_path / "flwr")
    glob = {k: v for k, v in a.items() if k.startswith("global/")}
    assert_same_tensors(glob, {k: v for k, v in b.items() if k.startswith("global/")})
    # the simulator checkpoints the clients' optimizer states; over Flower they stay on the nodes, equal (a
    # node numbers its parameters in its own model's order, so states match up to that numbering)
    for cid, node in (("client-00", 1000), ("client-01", 1001)):
        kept = from_record(grid.contexts[node].state.array_records[node_state.OPTIMIZER])
        sim = {k.removeprefix("opt/"): v for k, v in a.items() if k.startswith(f"opt/{cid}/")}
        assert kept and len(kept) == len(sim)
        for k, v in kept.items():
            kind = k.rsplit("/", 1)[1]
            match = [
                j
                for j, w in sim.items()
                if j.endswith("/" + kind) and w.shape == v.shape and torch.allclose(w, v, rtol=0, atol=1e-6)
            ]
            assert match, k
            del sim[match[0]]
    # and without keeping the state the result differs (the test can fail)
    simulate(tmp_path / "plain", ["fed.rounds=3"])
    plain = checkpoint(tmp_path / "plain")
    assert any((plain[k] - glob[k]).abs().max() > 1e-6 for k in glob)


def test_resuming_node_state_over_flower_is_refused(tmp_path: Path) -> None:
    from fedsb.errors import ConfigError
    from fedsb.flower.client import check_flower_config

    for override, field in (
        ("train.keep_optimizer_state=true", "train.keep_optimizer_state"),
        ("fed.method=flora", "fed.method"),
    ):
        cfg = resolve_config(TINY, [override])
        check_flower_config(cfg)  # a new run is fine
        with pytest.raises(ConfigError, match=field) as err:
            check_flower_config(cfg, resuming=True)
        assert "fix:" in str(err.value)
