"""`flwr run` on the app with Flower's simulation runtime (Ray): the documented command, end to end.

`flwr run ... local` leaves a detached local SuperLink running; it is found by the test's private
FLWR_HOME in its command line and stopped by PID, even when the run fails. Its ports are free ones picked
here: on the default ports flwr would reuse any SuperLink already running there (a concurrent run's).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
from fedsb.flower.deploy import APP_DIR, flower_env, is_zombie, pids_mentioning, stop_local_superlink
from fedsb.run import run_job

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
OVERRIDES = ["threads=1", "progress=false", "export=false", "data.test_size=4", "fed.rounds=1"]


def global_state(out: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}


def flwr_run(tmp_path: Path, overrides: list[str], supernodes: int, timeout: float) -> Path:
    """The documented `flwr run ... local` (simulation runtime) with its own local SuperLink, stopped by PID
    afterwards whatever happened (and checked gone); the run's output directory."""
    home = tmp_path / "flwr-home"
    out = tmp_path / "flower"
    run_config = f'config="{TINY}" overrides="{" ".join(overrides)}" output-dir="{out}"'
    cmd = ["flwr", "run", str(APP_DIR), "local", "--stream", "--run-config", run_config]
    cmd += ["--federation-config", f"num-supernodes={supernodes} client-resources-num-cpus=1"]
    stopped: list[int] = []
    try:
        res = subprocess.run(
            cmd,
            env=flower_env(home, own_local_superlink=True),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
        )
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert (out / "results.json").exists(), res.stdout[-3000:] + res.stderr[-3000:]
    finally:
        stopped = stop_local_superlink(home)
    assert stopped, "flwr run left no local SuperLink behind (has Flower changed?)"
    assert not [p for p in pids_mentioning(str(home)) if not is_zombie(p)]
    return out


@pytest.mark.slow
def test_flwr_run_simulation_matches_the_in_process_simulator(tmp_path: Path) -> None:
    out = flwr_run(tmp_path, OVERRIDES, 2, timeout=300)
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["rounds"][0]["accepted"]) == ["client-00", "client-01"]
    cfg = resolve_config(TINY, [*OVERRIDES, f"output_dir={tmp_path / 'sim'}"])
    run_job(cfg, echo=lambda s: None)
    ref, got = global_state(tmp_path / "sim"), global_state(out)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)


#: FedEx-LoRA under record-level DP-SGD with kept optimizer states; seed 6 samples [00, 01], [01, 02],
#: [01, 02], [00, 02]: client-00 misses rounds 2 and 3 and catches up on their folds in round 4
STATEFUL = [
    *OVERRIDES[:-1],
    "seed=6",
    "partition.num_clients=3",
    "fed.clients_per_round=2",
    "fed.rounds=4",
    "train.local_steps=1",
    "fed.method=fedex",
    "train.keep_optimizer_state=true",
    "privacy.mode=sample",
    "privacy.target_epsilon=8",
    "privacy.accountant=rdp",
    "privacy.reproducible_noise=true",
]


@pytest.mark.slow
def test_flwr_run_simulation_keeps_client_state_across_rounds_like_the_simulator(tmp_path: Path) -> None:
    """Folded W0 with two missed rounds, optimizer states and DP accounts through Flower's own runtime
    (Ray actors, Flower-managed node contexts): the final model and the privacy ledger equal the simulator's."""
    out = flwr_run(tmp_path, STATEFUL, 3, timeout=600)
    results = json.loads((out / "results.json").read_text())
    assert results["rounds_completed"] == 4
    assert [sorted(r["accepted"]) for r in results["rounds"]] == [r["sampled"] for r in results["rounds"]]
    cfg = resolve_config(TINY, [*STATEFUL, f"output_dir={tmp_path / 'sim'}"])
    ref = run_job(cfg, echo=lambda s: None)
    assert results["privacy"] == json.loads(json.dumps(ref["privacy"]))
    _, a, _ = load_checkpoint(latest_checkpoint(tmp_path / "sim" / "checkpoints"))
    _, b, _ = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert any(k.startswith("global/base/") for k in a)
    for k in (k for k in a if k.startswith("global/") and "/folds/" not in k):
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
