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

ROOT = Path(__file__).resolve().parents[2]
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


def restart_before(grid: LocalGrid, schedule: dict[int, int]) -> None:
    """Restart node `schedule[r]` just before round r's train messages go out."""
    push = grid.push_messages

    def push_and_restart(messages):  # noqa: ANN001, ANN202
        messages = list(messages)
        rounds = {int(m.metadata.group_id) for m in messages if m.metadata.message_type == "train"}
        for r in rounds & set(schedule):
            grid.restart(schedule.pop(r))
        return push(messages)

    grid.push_messages = push_and_restart  # type: ignore[method-assign]


def test_a_folding_node_that_restarted_rejoins_and_refuses_its_stale_w0(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """client-01 trains rounds 1-2, its SuperNode restarts (losing setup and W0) before round 3: dropped
    in round 3 with the reason, sent the setup again before round 4, and in round 5 it refuses the
    download (the folds of rounds 2-4 on top of a W0 without round 1's) rather than train on a stale W0."""
    extra = ["fed.method=fedex", *MISSES, "fed.rounds=5", "fed.min_clients=1"]
    grid = LocalGrid(client_app, 3)
    restart_before(grid, {3: NODE["client-01"]})
    with caplog.at_level(logging.WARNING, logger="fedsb.flower.server"):
        res = flower(tmp_path, extra, grid)
    assert res["rounds_completed"] == 5
    r3, r5 = res["rounds"][2], res["rounds"][4]
    assert r3["dropped"] == ["client-01"] and r3["accepted"] == ["client-02"]
    assert "round 3: client-01 failed" in caplog.text and "holds no setup" in caplog.text
    assert "round 4: client-01 (re)joined on SuperNode 1001" in caplog.text
    assert r5["dropped"] == ["client-01"] and r5["accepted"] == ["client-00"]
    assert "round 5: client-01 failed" in caplog.text and "leaves this client's W0 stale" in caplog.text
    again = [w for w in res["flower_wire"] if w.get("before_round") == 4]
    assert [w["client"] for w in again] == ["client-01"]


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


DP = [  # equal results need equal noise: the seeded (research) noise, not the default CSPRNG
    "privacy.reproducible_noise=true",
    "privacy.mode=sample",
    "privacy.target_epsilon=8",
    "privacy.accountant=rdp",
    "privacy.max_grad_norm=0.5",
]


def test_record_level_dp_matches_the_simulator_and_the_server_ledger_is_the_accountant(
    tmp_path: Path,
) -> None:
    from fedsb.flower import protocol as P

    ref = simulate(tmp_path / "sim", DP)
    grid, replies = LocalGrid(client_app, 2), []
    for node in grid.contexts:  # what each ClientApp actually sends back over the Grid
        grid.tamper[node] = lambda reply: (replies.append(reply), reply)[1]
    res = flower(tmp_path / "flwr", DP, grid)
    sent = [m for m in grid.pushed if m.metadata.message_type == "train"]
    a, b = checkpoint(tmp_path / "sim"), checkpoint(tmp_path / "flwr")
    glob = {k: v for k, v in a.items() if k.startswith("global/")}
    assert_same_tensors(glob, {k: v for k, v in b.items() if k.startswith("global/")})
    # the server's ledger, every epsilon and the per-round maxima equal the simulator's
    assert res["privacy"] == ref["privacy"] and res["privacy"]["mode"] == "sample"
    steps = res["privacy"]["accounts"]["client-00"]["steps"]
    assert steps == 2 * 2 and res["privacy"]["rounds"][-1]["max_epsilon"] > 0
    for r, q in zip(res["rounds"], ref["rounds"], strict=True):
        assert r["client_metrics"] == q["client_metrics"]
    # each train message carried the account as the server held it before the round
    import json

    held = [json.loads(str(m.content.config_records[P.PRIVACY]["account"]))["history"] for m in sent]
    assert [sum(int(x[2]) for x in h) for h in held] == [0, 0, 2, 2]
    # nothing unnoised leaves a client: the DP-SGD tensors, the planned size and the accountant's state
    assert len(replies) == 4
    for reply in replies:
        assert set(reply.content.metric_records[P.METRICS]) == {"epsilon", "noise_multiplier", "dp_steps"}
    # the node counted its own steps too, equal to the server's
    for node in grid.contexts:
        assert node_state.node_record(grid.contexts[node])["dp-steps"] == steps


def test_a_client_refuses_an_account_that_is_not_its_plan_or_past_its_budget() -> None:
    import json

    from fedsb.errors import FedsbError
    from fedsb.flower.dp import account_message, client_account, round_steps
    from fedsb.privacy.accounting import PrivacyAccount

    cfg = resolve_config(TINY, DP)
    n = 32
    planned = cfg.fed.rounds * round_steps(cfg, n)
    from fedsb.privacy.accounting import plan_account
    from fedsb.privacy.ledger import resolve_delta

    account = plan_account(
        unit="client-00",
        target_epsilon=8.0,
        noise_multiplier=None,
        delta=resolve_delta(cfg.privacy, n, of="test"),
        sample_rate=cfg.train.batch_size / n,
        planned_steps=planned,
        accountant="rdp",
    )
    ok = client_account(cfg, "client-00", n, account_message(account))
    assert ok.noise_multiplier == account.noise_multiplier and ok.steps == 0

    def forged(**change: object) -> dict[str, str]:
        d = {**account.to_dict(with_epsilon=False), **change}
        return {"account": json.dumps(d)}

    cases = {
        "weaker noise": (
            forged(noise_multiplier=account.noise_multiplier / 2),
            {},
            "above privacy.target_epsilon",
        ),
        "another q": (forged(sample_rate=0.5), {}, "sample_rate=0.5"),
        "another unit": (forged(unit="client-01"), {}, "unit='client-01'"),
        "budget spent": (
            forged(history=[[account.noise_multiplier, account.sample_rate, planned]]),
            {},
            "planned steps left",
        ),
        "server lost steps": (forged(history=[]), {"node_steps": 2}, "the server's ledger lost steps"),
        "no account": ({}, {}, "is missing from the train message"),
    }
    for name, (sent, kw, phrase) in cases.items():
        with pytest.raises(FedsbError, match=phrase):
            client_account(cfg, "client-00", n, sent, **kw)  # type: ignore[arg-type]
        assert name
    assert isinstance(ok, PrivacyAccount)


def test_a_dp_node_that_restarts_rejoins_with_its_account_from_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The restarted node has lost everything (its setup and its own step count): it is dropped with the
    reason, sent the setup again, and trains round 3 under the account the server's ledger kept, which
    charged round 2 too (sent, so counted)."""
    grid = LocalGrid(client_app, 2)
    restart_before(grid, {2: 1001})
    with caplog.at_level(logging.WARNING, logger="fedsb.flower.server"):
        res = flower(tmp_path, [*DP, "fed.min_clients=1", "fed.rounds=3"], grid)
    assert res["rounds"][1]["dropped"] == ["client-01"] and "holds no setup" in caplog.text
    assert sorted(res["rounds"][2]["accepted"]) == ["client-00", "client-01"]
    accounts = res["privacy"]["accounts"]
    assert accounts["client-01"]["steps"] == accounts["client-00"]["steps"] == 6
    assert node_state.node_record(grid.contexts[1001])["dp-steps"] == 6
    assert res["rounds"][2]["client_metrics"]["client-01"]["dp_steps"] == 6
