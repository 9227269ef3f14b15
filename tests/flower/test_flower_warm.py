"""The warm SuperExec (`fedsb.flower.warm`): ClientApps forked from one launcher per SuperNode.

The deployment with it (the default) ends with the in-process simulator's R, bit for bit; every ClientApp
message ran in its own fork of its SuperNode's launcher, with torch already imported; stopping the
deployment leaves no process behind. Without it (`warm=False`, Flower's fresh process a message) R is the
same. `ForkExecutor` reaps and stops its children, and a launcher that dies takes its children with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsb.config import resolve_config
from fedsb.fed.checkpoint import load_checkpoint
from fedsb.flower.deploy import LocalDeployment, is_zombie
from fedsb.flower.timing import ENV
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
]


def global_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    _, tensors, _ = load_checkpoint(checkpoint)
    return {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}


def gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or is_zombie(pid)


@pytest.mark.slow
@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_deployment_equals_simulator_and_forks_every_clientapp_from_the_launcher(
    tmp_path: Path, warm: bool
) -> None:
    out, timing = tmp_path / "flower", tmp_path / "timing.jsonl"
    dep = LocalDeployment(2, tmp_path / "deployment", warm=warm)
    dep.env[ENV] = str(timing)
    try:
        dep.start()
        launchers = dep.superexec_pids()
        code, log = dep.run_app(
            {"config": TINY, "overrides": " ".join(OVERRIDES), "output-dir": str(out)}, timeout=400
        )
        assert code == 0, log[-3000:]
        live = dep.pids()
    finally:
        dep.stop()
    lines = [json.loads(x) for x in timing.read_text().splitlines()]
    assert sorted(x["type"] for x in lines) == ["query.setup"] * 2 + ["train"] * 4
    assert len({x["pid"] for x in lines}) == 6  # one process per message: Flower's execution model
    assert all(x["fresh_process"] for x in lines)
    if warm:
        assert sorted(launchers) == [0, 1]
        for x in lines:  # forked by its own SuperNode's launcher, torch imported before the handler ran
            assert x["forked_from"] == launchers[x["partition"]] and x["preloaded"], x
    else:
        assert launchers == {} and all(x["forked_from"] is None for x in lines)
    for pid in [*live, *launchers.values(), *(x["pid"] for x in lines)]:
        assert gone(pid), f"process {pid} left behind"

    cfg = resolve_config(TINY, [*OVERRIDES, f"output_dir={tmp_path / 'sim'}"])
    run_job(cfg, echo=lambda s: None)
    for rnd in ("round-0001", "round-0002"):
        ref = global_state(tmp_path / "sim" / "checkpoints" / rnd)
        got = global_state(out / "checkpoints" / rnd)
        assert any(k.endswith("lora_sb_R.weight") for k in ref)
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{rnd} {k}: max |dR| {float((got[k] - ref[k]).abs().max())}"


LAUNCHER = """
import sys, time
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec
from fedsb.flower.warm import ForkExecutor

ex = ForkExecutor()
spec = ExecutionSpec(
    task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:{port}", token="t0k3n", insecure=True,
    root_certificates_path=None, runtime_dependency_install=False, parent_pid=None, suppress_output=True,
    task_id=7,
)
ex.launch(spec)
print(*ex.children, flush=True)
if sys.argv[1] == "close":
    time.sleep(1.0)
    ex.close()
    print(ex.exit_codes, flush=True)
else:
    time.sleep(600)
"""


def unused_port() -> int:
    from fedsb.flower.deploy import free_port

    return free_port()


def launcher(mode: str) -> subprocess.Popen[str]:
    code = LAUNCHER.replace("{port}", str(unused_port()))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, "-c", code, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_fork_executor_stops_and_reaps_its_children() -> None:
    """A ClientApp whose Runtime API never answers (Flower retries) is stopped and reaped by `close`."""
    proc = launcher("close")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    child_line, codes_line = out.strip().splitlines()
    child = int(child_line)
    assert gone(child)
    assert codes_line.startswith("{7: ")  # the task's process was reaped and its exit status kept


def test_children_die_with_a_killed_launcher() -> None:
    """SIGKILL of the launcher (a machine's SuperNode side dying) ends its forked ClientApps too."""
    proc, child = launcher("sleep"), 0
    try:
        child = int(proc.stdout.readline())  # type: ignore[union-attr]
        assert not gone(child)
        assert (
            f"PPid:\t{proc.pid}\n" in Path(f"/proc/{child}/status").read_text()
        )  # a fork, not a new program
        deadline = time.monotonic() + 30
        while "Name:\tflwr-clientapp\n" not in Path(f"/proc/{child}/status").read_text():
            assert time.monotonic() < deadline, "the fork never named itself flwr-clientapp"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(child)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if child and not gone(child):
            os.kill(child, signal.SIGKILL)
