"""`python -m fedsb.flower.deploy` as a user runs it: configs the Flower path cannot honour are refused before
any process starts, a failed ServerApp is a non-zero exit with its error, and SIGINT, SIGTERM, SIGHUP or an
error stop every process the deployment started (checked by PID, children and orphans included).

The fast tests replace the Flower processes by sleeping stand-ins (the signal and cleanup logic is the
real one); two slow tests run the real deployment: one whose ServerApp fails, one stopped by SIGTERM while
a ClientApp trains. Every process a test starts is stopped by PID, also when the test fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedsb.flower import deploy
from fedsb.flower.deploy import is_zombie, pids_mentioning, process_tree, stop_pid

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists() and not is_zombie(p)]


def _kill_all(pids: list[int]) -> None:
    for pid in _alive(pids):
        stop_pid(pid, signal.SIGKILL)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.mark.parametrize(
    "overrides,phrase",
    [
        ("privacy.mode=sample", "privacy.target_epsilon=None with privacy.noise_multiplier=None"),
        ("train.lr=-1", "train.lr=-1.0"),
        ("fed.method=fedex privacy.mode=client privacy.noise_multiplier=1", "privacy.mode='client' does not apply"),
        ("privacy.target_epsilon=3", "privacy.target_epsilon=3.0 has no effect"),
    ],
)  # fmt: skip
def test_configs_the_flower_path_refuses_are_refused_before_any_process(
    overrides, phrase, monkeypatch, capsys
):
    def no_start(self):  # noqa: ANN001, ANN202
        raise AssertionError("a Flower process was started for a config that cannot run")

    monkeypatch.setattr(deploy.LocalDeployment, "start", no_start)
    assert deploy.main(["--nodes", "2", "--config", TINY, "--overrides", overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsb: error: ") and phrase in err, err


def test_an_unusable_output_directory_is_refused_before_any_process(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(deploy.LocalDeployment, "start", lambda self: pytest.fail("started"))
    (tmp_path / "file").write_text("x")
    assert deploy.main(["--config", TINY, "--output", str(tmp_path / "file" / "out")]) == 2
    assert "--output=" in capsys.readouterr().err


# Stand-ins for the Flower processes: a "SuperLink" with a child of its own and a "SuperNode", all sleeping;
# run_app waits (or fails, with MODE=error) after printing READY. deploy.main is the real one.
STAND_INS = textwrap.dedent(
    """
    import os, subprocess, sys, time
    from fedsb.flower import deploy

    SLEEP = [sys.executable, "-c", "import time; time.sleep(600)"]
    PARENT = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)"]

    class StandIn(deploy.LocalDeployment):
        def start(self):
            self.logs.mkdir(parents=True, exist_ok=True)
            self._spawn("superlink", PARENT + SLEEP)
            self._spawn("supernode0", SLEEP)
            return self

        def run_app(self, run_config, **kw):
            while len(deploy.process_tree([os.getpid()])) < 4:  # main, both stand-ins, the grandchild
                time.sleep(0.05)
            print("READY", flush=True)
            if os.environ["MODE"] == "error":
                raise RuntimeError("the app crashed")
            time.sleep(600)

    deploy.LocalDeployment = StandIn
    sys.exit(deploy.main(["--nodes", "1", "--config", sys.argv[1]]))
    """
)


def _ignore_sigint() -> None:  # what a shell does to a background job: SIGINT ignored from the start
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# SIGHUP shares SIGTERM's handler; "SIGINT-background": started with SIGINT ignored, as `cmd &` is
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGINT-background", "error"])
def test_every_started_process_is_stopped_on_a_signal_or_an_error(how: str) -> None:
    env = {**_env(), "MODE": "error" if how == "error" else "wait"}
    background = how.endswith("-background")
    how = how.removesuffix("-background")
    proc = subprocess.Popen(
        [sys.executable, "-c", STAND_INS, TINY],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ignore_sigint if background else None,
    )
    started: list[int] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        started = process_tree([proc.pid])[1:]
        assert line.strip() == "READY" and len(started) == 3, (line, started)
        if how != "error":
            os.kill(proc.pid, getattr(signal, how))
        _, err = proc.communicate(timeout=60)
        if how == "error":
            assert proc.returncode == 1 and "the app crashed" in err
        else:
            assert proc.returncode == 128 + getattr(signal, how), err
            assert "every process it started was stopped" in err
        assert _alive(started) == [], [Path(f"/proc/{p}/cmdline").read_bytes() for p in _alive(started)]
    finally:
        _kill_all([proc.pid, *started])
        proc.wait(timeout=10)


@pytest.mark.slow
def test_a_failing_serverapp_is_a_non_zero_exit_with_its_error(tmp_path: Path) -> None:
    """`model.name=no-such-model` passes every check before the start and fails in the ServerApp."""
    work = tmp_path / "deployment"
    cmd = [
        sys.executable,
        "-m",
        "fedsb.flower.deploy",
        "--nodes",
        "1",
        "--config",
        TINY,
        "--workdir",
        str(work),
    ]
    cmd += ["--overrides", "threads=1 model.name=no-such-model", "--output", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        _kill_all(process_tree([proc.pid]))
    assert proc.returncode == 1, err[-3000:]
    assert "fedsb: error: the Flower run did not complete (status finished:failed)" in err, err[-3000:]
    assert "model.name='no-such-model'" in err.splitlines()[-1]
    assert pids_mentioning(str(work)) == []  # SuperLink and SuperNode (their command lines name the workdir)


@pytest.mark.slow
def test_sigterm_during_training_stops_every_process_of_the_deployment(tmp_path: Path) -> None:
    work, out = tmp_path / "deployment", tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "fedsb.flower.deploy",
        "--nodes",
        "2",
        "--config",
        TINY,
        "--workdir",
        str(work),
    ]
    cmd += ["--overrides", "threads=1 eval.initial=false export=false data.test_size=4", "--output", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:  # until a ClientApp is training
            tree = process_tree([proc.pid])
            if any(_is_clientapp(p) for p in tree):
                break
            time.sleep(0.25)
        assert proc.poll() is None and any(_is_clientapp(p) for p in tree), tree
        tree = process_tree([proc.pid])  # SuperLink, 2 SuperNodes, SuperExecs, ServerApp, ClientApp, flwr run
        assert len(tree) >= 9, [_cmdline(p)[:60] for p in tree]
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert _alive(tree) == [], [_cmdline(p)[:80] for p in _alive(tree)]
        assert pids_mentioning(str(work)) == []
    finally:
        _kill_all([proc.pid, *tree])


def _is_clientapp(pid: int) -> bool:
    """A Flower ClientApp process: a fresh `flwr-clientapp`, or a fork of the warm SuperExec (named so)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        name = ""
    return name == "flwr-clientapp" or b"flwr-clientapp" in _cmdline(pid)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""
