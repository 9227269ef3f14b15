"""A node whose state lost the setup, or that failed the first setup, gets the setup again and takes part.

What the SmolLM2 deployment benchmark met (benchmarks/README.md, "Deployment anomaly"): a SuperNode's first
`flwr-clientapp` answered the setup, but its push of the node's context back to the SuperNode failed, so
the node's state kept no setup. Flower 1.42 then answered that node's next train message for the dead
task (`CLIENT_APP_CRASHED`, "ClientApp stopped responding."), not with the ClientApp's `NO_SETUP` error, and
the server, which re-sent the setup only on `NO_SETUP` or an offline node, never did: the client was dropped
every round. Here the node's ClientApp really loses its setup (`FEDSB_TEST_FAULTS=0:lose-setup` on that node
only) and its round-1 reply is Flower's; a node that fails its first setup (an error reply, or none) must
likewise be retried, not end the run. The setup travels to the node once more (Flower's byte count, marked
`before_round`), the client takes part from then on, and the final R equals the simulator's for the same
participation (client-01 dropped in round 1, or in no round).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from flwr.app import Error
from flwr.common.constant import ErrorCode

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import latest_checkpoint
from fedsb.flower.client_app import app as client_app
from fedsb.flower.faults import ENV
from fedsb.flower.protocol import AppSettings
from fedsb.flower.server_app import run_flower_job
from fedsb.run import run_job
from flower_grid import LocalGrid
from test_flower_deploy import DropInRound, global_state

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4"]
JOB = [*BASE, "fed.rounds=3", "fed.min_clients=1", "train.local_steps=1"]
NODE = 1001  # client-01's node


def flower_crashed_reply(reply):  # noqa: ANN001, ANN201 - a reply rewriter
    """Round 1's reply as Flower 1.42's SuperNode sends it for a ClientApp task whose heartbeat stopped."""
    if reply.metadata.group_id == "1":
        reply.__dict__["_error"] = Error(ErrorCode.CLIENT_APP_CRASHED, "ClientApp stopped responding.")
    return reply


def drop_first_setup(grid: LocalGrid) -> None:
    """The node's first setup message gets no reply at all (its ClientApp died, the reply was lost)."""
    push, dropped = grid.push_messages, []

    def push_and_lose(messages):  # noqa: ANN001, ANN202
        ids = list(push(messages))
        for msg, mid in zip(grid.pushed[-len(ids) :], ids, strict=True):
            if (
                msg.metadata.message_type == "query.setup"
                and msg.metadata.dst_node_id == NODE
                and not dropped
            ):
                dropped.append(grid.replies.pop(mid))
        return ids

    grid.push_messages = push_and_lose  # type: ignore[method-assign]


def simulate(tmp: Path, *, drop_client_01_in_round_1: bool) -> Path:
    cfg = resolve_config(TINY, [*JOB, f"output_dir={tmp}"])
    if drop_client_01_in_round_1:
        run_job(
            cfg,
            echo=lambda s: None,
            make_executor=lambda p: DropInRound(p.method, p.data, cfg, 1, "client-01"),
        )
    else:
        run_job(cfg, echo=lambda s: None)
    return tmp


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """The simulator's runs: with client-01 dropped in round 1 (True), and with every client (False)."""
    return {d: simulate(tmp_path_factory.mktemp("sim"), drop_client_01_in_round_1=d) for d in (True, False)}


#: fault -> the first round client-01 takes part in (the setup is sent again just before it)
FAULTS = {"lost-state": 2, "held-replies": 2, "setup-error": 1, "no-setup-reply": 1}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_node_without_the_setup_gets_it_again_and_takes_part(
    tmp_path: Path, reference: dict[bool, Path], fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """lost-state: the node answered its setup but kept none, and Flower answered its round-1 message as a
    crashed ClientApp: dropped in round 1; since such a SuperNode may hold back its replies, the setup goes
    with its round-2 train message. held-replies: the same, and
    from then on its SuperNode holds back each reply until it pulls the next message (Flower 1.42 after
    that crash): the setup goes with its round-2 train message, flushes release its replies, and no round
    waits its timeout. setup-error / no-setup-reply: the first setup failed, so the node is sent it again
    before round 1 and misses nothing."""
    back = FAULTS[fault]
    grid = LocalGrid(client_app, 2)
    grid.fresh_processes = True
    if fault == "lost-state":
        grid.node_env[NODE] = {ENV: "0:lose-setup"}
        grid.tamper[NODE] = flower_crashed_reply
    elif fault == "held-replies":
        grid.node_env[NODE] = {ENV: "0:lose-setup"}
        grid.crash_in_round[NODE] = 1
    elif fault == "setup-error":
        grid.node_env[NODE] = {ENV: "0:fail-setup"}
    else:
        drop_first_setup(grid)
    settings = AppSettings(
        config=TINY, overrides=" ".join(JOB), output_dir=str(tmp_path), connect_timeout=5, round_timeout=60
    )
    with caplog.at_level(logging.WARNING, logger="fedsb.flower.server"):
        res = run_flower_job(grid, settings)
    rounds = res["rounds"]
    rides = fault in ("lost-state", "held-replies")  # after CLIENT_APP_CRASHED: its replies may be held
    for r in rounds[: back - 1]:
        assert r["accepted"] == ["client-00"] and r["dropped"] == ["client-01"], r
    for r in rounds[back - 1 :]:  # sent the setup again before round `back`, and in every round from then on
        assert sorted(r["accepted"]) == ["client-00", "client-01"], r
    for r in rounds:  # nobody waited for a reply that had already come, or was held back
        assert r["seconds"]["total"] < 30, r
    if rides:
        assert f"round {back}: client-01: setup sent again with its train message" in caplog.text
        assert "SuperNode 1001 may hold back its replies" in caplog.text
    else:
        assert f"round {back}: client-01 (re)joined on SuperNode 1001" in caplog.text
    again = [w for w in res["flower_wire"] if "before_round" in w]
    # a node that may hold back replies gets the setup with its train messages until a reply says its
    # state already held it (round 3 here: its state kept round 2's)
    want = [("client-01", back), ("client-01", back + 1)] if rides else [("client-01", back)]
    assert [(w["client"], w["before_round"]) for w in again] == want
    assert again[0]["bytes"] == res["ledger"]["one_time"][0]["bytes"] // 2 > 0  # one node's setup
    setups = [
        m for m in grid.pushed if m.metadata.message_type == "query.setup" and m.metadata.dst_node_id == NODE
    ]
    assert len(setups) == (1 if rides else 2)
    ref = global_state(latest_checkpoint(reference[back > 1] / "checkpoints"))  # after round 3
    got = global_state(latest_checkpoint(tmp_path / "checkpoints"))
    assert set(got) == set(ref) and any(k.endswith("lora_sb_R.weight") for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_lost_setup_push_inside_the_deployment(tmp_path: Path, reference: dict[bool, Path]) -> None:
    """The benchmark's failure itself, in a loopback deployment (TLS, node authentication, 2 SuperNodes):
    SuperNode 1's first ClientApp answers the setup and skips its push of the node's context
    (`0:lose-push`, as when that HTTP request fails); its round-1 train message outlives Flower's 60 s task
    expiry (`1:slow`), so the SuperNode answers it as a crashed ClientApp and holds back its replies from
    then on. client-01 misses round 1 only, the rounds after it do not wait their timeout, and the final R
    equals the simulator's with client-01 dropped in round 1."""
    import json

    from fedsb.flower.deploy import LocalDeployment

    out = tmp_path / "flower"
    dep = LocalDeployment(2, tmp_path / "deployment", node_env={1: {ENV: "0:lose-push 1:slow"}})
    with dep:
        code, log = dep.run_app(
            {
                "config": TINY,
                "overrides": " ".join(JOB),
                "output-dir": str(out),
                "round-timeout": 240.0,
                "connect-timeout": 60.0,
            },
            timeout=1200,
        )
        node_log = dep.log("supernode1")
    assert code == 0, log[-3000:]
    assert "task output not pushed (test-only)" in node_log
    assert "round 1: client-01 failed: ClientApp stopped responding." in log
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert rounds[0]["accepted"] == ["client-00"] and rounds[0]["dropped"] == ["client-01"]
    for r in rounds[1:]:
        assert sorted(r["accepted"]) == ["client-00", "client-01"], r
        assert r["seconds"]["total"] < 200, r  # well below the 240 s round timeout
    ref = global_state(latest_checkpoint(reference[True] / "checkpoints"))
    got = global_state(latest_checkpoint(out / "checkpoints"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
