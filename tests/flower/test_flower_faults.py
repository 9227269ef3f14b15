"""Faults inside a real deployment: a ClientApp that sends malformed replies, a SuperNode killed and restarted.

The malformed replies come from the ClientApp itself (`fedsb.flower.faults`, switched on only by the
test-only `FEDSB_TEST_FAULTS` in one SuperNode's environment), so they travel the whole way: ClientApp
process, SuperNode, TLS, SuperLink, Grid. The fast tests check the switch and the parser on the in-process
Grid; the slow one is a single loopback deployment (TLS, node authentication, 3 SuperNodes, 4 rounds,
`train.keep_optimizer_state` on) that checks both faults at once:

* SuperNode 1 breaks its reply in every round (NaN, shape, basis fingerprint, stale round): each is
  rejected with the simulator's reason (`fedsb.fed.validate`) while the round completes with the others;
* SuperNode 2 is SIGKILLed after round 1 and restarted with its own key: round 2 drops it (the SuperLink
  answers for the dead node), the server sends it the setup again once it is back, and it trains the last
  round with its optimizer state started afresh (its state lived on the dead node; the ClientApp warns),
  while SuperNode 0's optimizer state is kept by its node across all rounds. SuperNode 0 holds its round-3
  training until the restarted SuperNode 2 is back (`<round>:gate`), so round 4 finds it there however slow
  the machine: keyed to the deployment's state, not to timing.

Every process is stopped by PID (`LocalDeployment.stop`).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from fedsb.flower.client_app import app as client_app
from fedsb.flower.deploy import LocalDeployment
from fedsb.flower.faults import ENV, GATE_ENV, fault_plan
from fedsb.flower.protocol import AppSettings
from fedsb.flower.server_app import run_flower_job
from flower_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["threads=1", "progress=false", "export=false", "eval.every=100", "data.test_size=4"]
FAULTS = "1:nan 2:shape 3:fingerprint 4:stale"
#: the simulator's reasons (`fedsb.fed.validate`, as `test_fed.py` checks them there)
REASONS = {
    1: "contains NaN or Inf",
    2: "has shape (5, 4), expected (4, 4)",
    3: "basis fingerprint 000000000000 does not match the server's",
    4: "update is for round 3, the server is in round 4 (stale or future)",
}


def test_a_fault_plan_names_rounds_and_known_kinds_only() -> None:
    assert fault_plan(FAULTS) == {1: "nan", 2: "shape", 3: "fingerprint", 4: "stale"}
    assert fault_plan("") == {}
    for bad in ("nan", "1:typo", "x:nan", "1-nan"):
        with pytest.raises(ValueError, match=f"{ENV}: '{bad}' is not <round>:<kind>"):
            fault_plan(bad)


def test_the_clientapp_breaks_its_replies_only_when_the_test_switch_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedsb.fed.rounds import RoundFailed

    overrides = " ".join([*BASE, "fed.min_clients=1", "fed.rounds=2", "train.local_steps=1"])
    settings = AppSettings(config=TINY, overrides=overrides, output_dir=str(tmp_path / "honest"))
    honest = run_flower_job(LocalGrid(client_app, 2), settings)
    assert all(sorted(r["accepted"]) == ["client-00", "client-01"] for r in honest["rounds"])

    monkeypatch.setenv(
        ENV, "2:nan"
    )  # in-process, every node's ClientApp sees it: round 2 has no usable update
    settings = AppSettings(config=TINY, overrides=overrides, output_dir=str(tmp_path / "faulty"))
    with pytest.raises(RoundFailed, match=r"round 2: 0 usable update.*client-00: .*contains NaN or Inf"):
        run_flower_job(LocalGrid(client_app, 2), settings)


@pytest.mark.slow
def test_malformed_replies_and_a_restarted_supernode_inside_the_deployment(tmp_path: Path) -> None:
    out = tmp_path / "flower"
    overrides = [
        *BASE,
        "partition.num_clients=3",
        "data.train_size=96",
        "fed.rounds=4",
        "fed.min_clients=1",
        "train.local_steps=1",
        "train.keep_optimizer_state=true",
    ]
    gate = tmp_path / "supernode2-is-back"  # SuperNode 0 trains round 3 once it exists
    node_env = {0: {ENV: "3:gate", GATE_ENV: str(gate)}, 1: {ENV: FAULTS}}
    dep = LocalDeployment(3, tmp_path / "deployment", node_env=node_env)
    stop, restarted = threading.Event(), threading.Event()

    def restart_after_round_one() -> None:  # keyed to the run's progress, not to timing
        while not stop.is_set():
            if (out / "checkpoints" / "round-0001").exists():
                dep.restart_node(2)  # returns once the SuperLink activated it again
                restarted.set()
                gate.touch()
                return
            time.sleep(0.05)

    try:
        dep.start()
        threading.Thread(target=restart_after_round_one, daemon=True).start()
        code, log = dep.run_app(
            {
                "config": TINY,
                "overrides": " ".join(overrides),
                "output-dir": str(out),
                "round-timeout": 300.0,
            },
            timeout=900,
        )
        assert code == 0, log[-3000:]
        assert restarted.is_set(), "SuperNode 2 was never restarted:\n" + log[-3000:]
        faulty, rejoined, gated = dep.log("supernode1"), dep.log("supernode2"), dep.log("supernode0")
    finally:
        stop.set()
        live = dep.pids()
        dep.stop()
    for pid in live:  # everything this test started is gone
        assert (
            not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
        )

    results = json.loads((out / "results.json").read_text())
    rounds = results["rounds"]
    assert results["rounds_completed"] == 4 and results["final"] is not None
    for r in rounds:  # client-01's reply is rejected with the simulator's reason, the round goes on
        assert REASONS[r["round"]] in r["rejected"]["client-01"], r["rejected"]
        assert "client-00" in r["accepted"]
    assert faulty.count("test-only fault injection") == 4
    assert "did not appear" not in gated, "SuperNode 0's round-3 gate timed out"
    assert sorted(rounds[0]["accepted"]) == ["client-00", "client-02"]
    assert rounds[1]["accepted"] == ["client-00"] and rounds[1]["dropped"] == ["client-02"]
    assert sorted(rounds[3]["accepted"]) == ["client-00", "client-02"]  # back, and trained
    assert "client-02 (re)joined on SuperNode" in log
    assert "no optimizer state on this node" in rejoined and "starts afresh" in rejoined
    # the rejected uploads did travel: on the ledger, marked as such
    entries = results["ledger"]["entries"]
    statuses = {
        (e["round"], e["status"]) for e in entries if e["client"] == "client-01" and e["direction"] == "up"
    }
    assert statuses == {(r, "rejected") for r in range(1, 5)}
