"""Deployment on loopback: SuperLink + 2 SuperNodes as processes, TLS and node auth, a node killed mid-round.

TLS is checked by a handshake against the test CA, node authentication by a third SuperNode with an
unregistered key, which the SuperLink refuses.

One run of 2 rounds serves every check (each ClientApp message is a fresh process that imports torch, so
runs are costly): SuperNode 1 is SIGKILLed while it trains round 2, round 2 completes with client-00 alone
and the run finishes (final evaluation); the global R after each round, the final one included, equals the
in-process simulator's for the same config and seeds with client-01 dropped in round 2;
Flower's count of every ArrayRecord equals the ledger line by line. Every process is stopped by PID in
`LocalDeployment.stop`. (Later rounds without the dead node: `test_flower.py`'s silent-node test.)
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import load_checkpoint
from fedsb.flower.certs import make_node_keys
from fedsb.flower.deploy import LocalDeployment
from fedsb.run import run_job

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
OVERRIDES = [
    "threads=1",
    "progress=false",
    "export=false",
    "eval.every=100",
    "data.test_size=4",
    "fed.rounds=2",
    "fed.min_clients=1",
]


def global_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(checkpoint)
    return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}


class DropInRound:
    """The in-process simulator's executor, except that `client` never answers in round `round`."""

    def __init__(self, method: Any, data: Any, cfg: Any, round: int, client: str) -> None:
        from fedsb.fed.simulate import InProcessExecutor
        from fedsb.train.local import loss_for

        self.inner = InProcessExecutor(
            method,
            method.adapted,
            data.clients,
            cfg.train,
            rounds=cfg.fed.rounds,
            seed=cfg.seed,
            wire_dtype=cfg.fed.wire_dtype,
            loss_fn=loss_for(data.task),
        )
        self.skip = (round, client)

    def train_round(self, round: int, client_ids: list[str], download: Any) -> Iterator[Any]:
        for cid in client_ids:
            if (round, cid) != self.skip:
                yield self.inner.train_client(round, cid, download)

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, tensors: Any, meta: Any) -> None:
        self.inner.load_state_dict(tensors, meta)


def kill_node_after_round(dep: LocalDeployment, node: int, checkpoint: Path, stop: threading.Event) -> None:
    """SIGKILL SuperNode `node` as soon as `checkpoint` (the end of a round) exists: the next round's
    message then reaches a dead node. Keyed to the run's own progress, not to process counts or timing."""
    while not stop.is_set():
        if checkpoint.exists():
            dep.kill_node(node)
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_deployment_with_tls_and_auth_matches_simulator_and_survives_a_killed_supernode(
    tmp_path: Path,
) -> None:
    out = tmp_path / "flower"
    dep = LocalDeployment(2, tmp_path / "deployment")
    stop = threading.Event()
    try:
        dep.start()
        # TLS: the SuperLink speaks TLS with the certificate our test CA issued for 127.0.0.1
        ctx = ssl.create_default_context(cafile=str(dep.root / "tls" / "ca.crt"))
        with (
            socket.create_connection(("127.0.0.1", dep.port)) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        # node authentication: a SuperNode whose key was never registered is refused
        rogue_key, _ = make_node_keys(dep.root / "keys", "rogue")
        rogue = dep.add_supernode("rogue", rogue_key, partition_id=1)
        round_one = out / "checkpoints" / "round-0001"
        killer = threading.Thread(target=kill_node_after_round, args=(dep, 1, round_one, stop), daemon=True)
        killer.start()
        code, log = dep.run_app(
            {
                "config": TINY,
                "overrides": " ".join(OVERRIDES),
                "output-dir": str(out),
                "straggler-timeout": 8.0,
                "round-timeout": 300.0,
            },
            timeout=400,
        )
        assert code == 0, log[-3000:]
        assert dep.procs["supernode1"].poll() is not None, "SuperNode 1 was never killed:\n" + log[-3000:]
        assert rogue.wait(timeout=60) != 0 and "Failed to activate SuperNode" in dep.log("rogue")
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
    assert results["rounds_completed"] == 2 and results["final"] is not None
    assert sorted(rounds[0]["accepted"]) == ["client-00", "client-01"]
    assert rounds[1]["accepted"] == ["client-00"] and rounds[1]["dropped"] == ["client-01"]

    # the same job in the in-process simulator, with client-01 dropped in round 2: R equals after every round
    cfg = resolve_config(TINY, [*OVERRIDES, f"output_dir={tmp_path / 'sim'}"])
    run_job(
        cfg,
        echo=lambda s: None,
        make_executor=lambda parts: DropInRound(parts.method, parts.data, cfg, 2, "client-01"),
    )
    for rnd in ("round-0001", "round-0002"):
        ref = global_state(tmp_path / "sim" / "checkpoints" / rnd)
        got = global_state(out / "checkpoints" / rnd)
        assert any(k.endswith("lora_sb_R.weight") for k in ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)

    # Flower's byte count of every ArrayRecord = the ledger, message by message
    wire = json.loads((out / "flower_wire.json").read_text())
    ledger = results["ledger"]["entries"]
    flwr = sorted((w["round"], w["client"], w["direction"], w["bytes"]) for w in wire if w["round"] > 0)
    ours = sorted((e["round"], e["client"], e["direction"], e["bytes"]) for e in ledger)
    assert flwr == ours
    setup = [w["bytes"] for w in wire if w["round"] == 0]
    assert sum(setup) == results["ledger"]["one_time"][0]["bytes"]
