"""The Flower app over an in-process Grid: same R as the simulator, ledger = Flower bytes, faults, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.flower.client_app import app as client_app
from fedsb.flower.protocol import AppSettings
from fedsb.flower.server_app import run_flower_job
from fedsb.run import run_job
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[2]
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
    from fedsb.init.basis import Basis

    r0 = Basis.load(tmp_path / "sim" / "basis").factors
    moved = [
        (a[k] - r0[k.removesuffix(".lora_sb_R.weight")].R0).abs().max() for k in a if k.endswith("R.weight")
    ]
    assert min(moved) > 1e-6  # training moved every R, so equality is not trivial
    wire = res["flower_wire"]
    ledger = res["ledger"]
    for direction in ("up", "down"):
        flwr_bytes = sum(w["bytes"] for w in wire if w["round"] > 0 and w["direction"] == direction)
        assert flwr_bytes == ledger["totals"][f"bytes_{direction}"] > 0
    setup = sum(w["bytes"] for w in wire if w["round"] == 0)
    assert setup == ledger["one_time"][0]["bytes"] > 0
    assert res["rounds_completed"] == ref["rounds_completed"] == 2


def test_flower_fedit_bfloat16_on_the_wire_matches_the_simulator(tmp_path: Path) -> None:
    extra = ["fed.method=fedit", "fed.wire_dtype=bfloat16", "fed.rounds=1"]
    simulate(tmp_path / "sim", extra)
    res = flower(tmp_path / "flwr", extra)
    a, b = final_state(tmp_path / "sim"), final_state(tmp_path / "flwr")
    assert any("lora_A" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    up = [w["bytes"] for w in res["flower_wire"] if w["direction"] == "up"]
    params = res["ledger"]["params_per_client_per_round_one_way"]
    assert up == [2 * params, 2 * params]  # two bytes per parameter


def test_records_carry_every_wire_dtype_bit_exactly_and_count_payload_bytes() -> None:
    from flwr.app import Array, ArrayRecord

    from fedsb.flower.records import (
        PACKED,
        PACKED_STYPE,
        from_record,
        payload_bytes,
        tensor_to_array,
        to_record,
    )

    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.lora_sb_R.weight": torch.randn(4, 4, generator=g),
        "b": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c": torch.randn(7, generator=g).to(torch.float16),
    }
    record = to_record(tensors)
    back = from_record(record)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t)
    assert list(back) == list(tensors)  # the sender's order
    assert payload_bytes(record) == 16 * 4 + 15 * 2 + 7 * 2
    assert list(record.keys()) == [PACKED]  # one Array: one Flower object, whatever the tensor count
    header = record.count_bytes() - payload_bytes(record) - len(PACKED)  # names, dtypes, shapes, order
    assert 8 < header < 400
    assert from_record(to_record({})) == {} and len(to_record({})) == 0
    raw = ArrayRecord({k: tensor_to_array(t) for k, t in tensors.items()})  # one Array per tensor: read too
    assert all(torch.equal(from_record(raw)[k], t) for k, t in tensors.items())
    assert payload_bytes(raw) == payload_bytes(record)
    broken = ArrayRecord({PACKED: Array(dtype="uint8", shape=(12,), stype=PACKED_STYPE, data=b"\x05" * 12)})
    with pytest.raises(ValueError, match="packed record that cannot be read"):
        from_record(broken)


def test_a_silent_node_is_dropped_and_the_run_goes_on(tmp_path: Path) -> None:
    grid = LocalGrid(client_app, 2)
    grid.silent.add(1001)  # partition 1 answers the setup, then never again
    settings = AppSettings(
        config=TINY,
        overrides=" ".join([*BASE, "fed.min_clients=1"]),
        output_dir=str(tmp_path),
        round_timeout=0.5,
    )
    res = run_flower_job(grid, settings)
    assert res["rounds_completed"] == 2
    for r in res["rounds"]:
        assert r["accepted"] == ["client-00"] and r["dropped"] == ["client-01"]


def test_a_silent_node_below_min_clients_fails_the_round(tmp_path: Path) -> None:
    from fedsb.fed.rounds import RoundFailed

    grid = LocalGrid(client_app, 2)
    grid.silent.add(1001)
    settings = AppSettings(
        config=TINY,
        overrides=" ".join([*BASE, "fed.min_clients=2"]),
        output_dir=str(tmp_path),
        round_timeout=0.5,
    )
    with pytest.raises(RoundFailed, match="1 usable update"):
        run_flower_job(grid, settings)


def _tamper(round_to_change: dict[int, str]):  # noqa: ANN202 - returns a reply rewriter
    """A reply rewriter that breaks the update differently in each round (see the test)."""
    from fedsb.flower import protocol as P
    from fedsb.flower.faults import corrupt

    return lambda reply: corrupt(
        reply, round_to_change[int(reply.content.config_records[P.UPDATE_META]["round"])]
    )


def test_malformed_replies_are_rejected_by_the_simulators_validator(tmp_path: Path) -> None:
    kinds = {1: "nan", 2: "dtype", 3: "stale", 4: "no-count", 5: "fingerprint", 6: "extra", 7: "no-arrays"}
    reasons = {
        "nan": "contains NaN or Inf",
        "dtype": "expected the wire dtype",
        "stale": "stale or future",
        "no-count": "num_examples=None must be a positive integer",
        "fingerprint": "basis fingerprint 000000000000 does not match",
        "extra": "unexpected tensors ['smuggled']",
        "no-arrays": "missing tensors",
    }
    grid = LocalGrid(client_app, 2)
    grid.tamper[1001] = _tamper(kinds)
    overrides = [*BASE, "fed.min_clients=1", f"fed.rounds={len(kinds)}", "train.local_steps=1"]
    settings = AppSettings(config=TINY, overrides=" ".join(overrides), output_dir=str(tmp_path))
    res = run_flower_job(grid, settings)
    assert res["rounds_completed"] == len(kinds)
    for r in res["rounds"]:
        assert r["accepted"] == ["client-00"]
        assert reasons[kinds[r["round"]]] in r["rejected"]["client-01"], r["rejected"]
    # rejected uploads are on the ledger (they did travel), marked as such
    statuses = {(e["round"], e["status"]) for e in res["ledger"]["entries"] if e["client"] == "client-01"}
    assert (1, "rejected") in statuses


def test_unknown_run_config_keys_are_refused() -> None:
    from fedsb.errors import ConfigError

    with pytest.raises(ConfigError, match="round-timout"):
        AppSettings.from_run_config({"round-timout": 3.0})


def test_client_level_dp_runs_through_the_same_server_and_matches_the_simulator(tmp_path: Path) -> None:
    extra = [  # equal results need equal noise: the seeded (research) noise, not the default CSPRNG
        "privacy.reproducible_noise=true",
        "privacy.mode=client",
        "privacy.noise_multiplier=0.5",
        "privacy.clip_update=0.01",
        "fed.rounds=1",
    ]
    ref = simulate(tmp_path / "sim", extra)
    grid, replies = LocalGrid(client_app, 2), []
    for node in grid.contexts:  # what each ClientApp actually sends back over the Grid
        grid.tamper[node] = lambda reply: (replies.append(reply), reply)[1]
    res = flower(tmp_path / "flwr", extra, grid)
    a, b = final_state(tmp_path / "sim"), final_state(tmp_path / "flwr")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert res["privacy"] == ref["privacy"] and res["privacy"]["mode"] == "client"
    # nothing unnoised but the tensors the trusted server clips and noises: no loss, no timing
    from fedsb.flower import protocol as P

    assert len(replies) == 2
    for reply in replies:
        assert dict(reply.content.metric_records.get(P.METRICS, {})) == {}
    for r in (ref, res):
        assert all(set(m) == {"num_examples"} for m in r["rounds"][0]["client_metrics"].values())
