"""A run's directory and its life: unique names under concurrency, nothing left by a failed setup, stops by
SIGINT/SIGTERM after a checkpoint with the exact resume command, restarts of runs killed before their
first checkpoint, refused resumes, write errors, time over sessions. Real subprocesses and signals; every
process a test starts is stopped by its PID."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedsb.cli import main
from fedsb.interrupt import StopNow, StopSignals
from fedsb.paths import make_run_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["threads=1", "data.test_size=4"]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedsb", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(proc: subprocess.Popen[str], prefix: str, timeout: float = 240) -> list[str]:
    """The process's output lines up to (and with) the first starting with `prefix`."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line starting with {prefix!r} (exit {proc.poll()}):\n{''.join(lines)[-3000:]}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()  # by its PID
    proc.wait(timeout=60)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _files(root: Path) -> dict[Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- run directories ------------------------------------------------------------------------------------------


def test_run_directory_names_are_unique_even_within_one_second(tmp_path: Path, monkeypatch) -> None:
    import fedsb.paths as paths

    tokens = iter(["aaaaaa", "aaaaaa", "bbbbbb"])
    monkeypatch.setattr(paths.secrets, "token_hex", lambda n: next(tokens))
    first = make_run_dir(tmp_path / "runs")
    second = make_run_dir(tmp_path / "runs")  # the same name drawn again: os.mkdir refuses, another is drawn
    assert first.path.name.endswith("-aaaaaa") and second.path.name.endswith("-bbbbbb")
    assert first.path.is_dir() and second.path.is_dir()
    assert first.top == tmp_path / "runs" and second.top == second.path  # what each created (for cleanup)


CONCURRENT = """
import sys, time
import fedsb.job, fedsb.run  # the heavy imports before the start signal
from fedsb.cli import main
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_two_runs_started_at_the_same_instant_get_their_own_directories(tmp_path: Path) -> None:
    start = math.ceil(time.time()) + 25.1  # both past their imports, then both create a directory at once
    args = ["run", "--config", TINY, *FAST, "export=false", "fed.rounds=1"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = []
    try:
        for lr, log in zip(("0.001", "0.05"), logs, strict=True):
            with open(log, "w") as f:  # redirected output: no bars, a line per round
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", CONCURRENT, str(start), *args, f"train.lr={lr}"],
                        cwd=tmp_path,
                        env=_env(),
                        stdout=f,
                        stderr=subprocess.STDOUT,
                    )  # fmt: skip
                )
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2, dirs
    assert {_results(d)["output_dir"] for d in dirs} == {str(Path("runs") / d.name) for d in dirs}
    assert sorted(_config_lr(d) for d in dirs) == [0.001, 0.05]  # each run's files are its own
    for text in texts:
        assert "\r" not in text and "\x1b[" not in text  # no progress-bar control codes in a log file
        assert any(
            line.startswith("round 1/1 | clients 2 accepted, 0 rejected | loss ")
            for line in text.splitlines()
        )


def _config_lr(run_dir: Path) -> float:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"]


# ---- validation before anything is written -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,phrase",
    [
        ("model.name=tiny-lama", "did you mean 'tiny-llama'"),  # the model load
        ("adapter.targets=[nonexistent]", "matches no adaptable layer"),  # the adapters
        ("partition.min_size=40", "partition.min_size=40"),  # the partition (2 clients of 32 examples)
    ],
)
def test_a_setup_that_fails_leaves_no_directory(
    override: str, phrase: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--config", TINY, "--no-progress", override]) == 2  # default: runs/<stamp>-<random>
    assert phrase in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # not even runs/
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("kept")
    assert (
        main(["run", "--config", TINY, "--no-progress", "--output", str(mine / "sub" / "run"), override]) == 2
    )
    assert main(["run", "--config", TINY, "--no-progress", "--output", str(mine), override]) == 2
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]  # only what the run created is removed


def test_resume_refuses_fewer_rounds_than_done_and_changes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", "--config", TINY, *FAST, "--output", str(out), "--no-progress"]) == 0
    before = _files(out)
    assert main(["run", "--resume", str(out), "--no-progress", "fed.rounds=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsb: error: fed.rounds=1 is below the 2 rounds this run has already done")
    assert "fed.rounds=2 or more" in err and "Traceback" not in err
    assert _files(out) == before


def test_a_write_the_os_refuses_mid_run_is_one_error_with_the_resume_command(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import fedsb.run

    real = fedsb.run.write_json

    def full_disk(path: Path, data) -> None:
        if Path(path).name == "results.json" and data["rounds_completed"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(fedsb.run, "write_json", full_disk)
    out = tmp_path / "run"
    assert main(["run", "--config", TINY, *FAST, "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"output_dir='{out}' cannot be written (No space left on device: {out / 'results.json'})" in err
    assert f"continue with: fedsb run --resume {out.resolve()}" in err


# ---- stops and restarts ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,when,times",
    [
        (signal.SIGINT, "round 1/", 1),  # Ctrl-C: the round in progress ends, its checkpoint is written
        (signal.SIGTERM, "round 1/", 1),  # a scheduler's stop: the same
        (signal.SIGTERM, "clients:", 1),  # during the setup: stops before round 1, restartable
        (signal.SIGINT, "fedsb: fedsb run, results in", 2),  # twice: at once, during the setup; restartable
    ],
)
def test_signals_stop_at_a_checkpoint_and_print_the_exact_resume_command(
    sig: int, when: str, times: int, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    proc = _start(
        ["run", "--config", TINY, "--output", str(out), *FAST, "fed.rounds=3", "export=false"], tmp_path
    )
    try:
        lines = _read_until(proc, when)
        for _ in range(times):
            proc.send_signal(sig)
            time.sleep(0.05)  # the first one handled, the second one still before the setup's end
        rest, _ = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    text = "".join(lines) + rest
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, text
    assert f"{name} received: stopping after the current round's checkpoint" in text
    assert text.rstrip().endswith(f"continue with: fedsb run --resume {out.resolve()}"), text[-2000:]
    assert "Traceback" not in text
    done = _results(out)["rounds_completed"] if (out / "results.json").exists() else 0
    basis = "reusing the saved basis"
    if times == 2:  # at once, in the middle of the setup (the basis may not be saved yet)
        assert (
            done == 0
            and f"stopped by {name} during the setup (no checkpoint yet: it starts at round 1" in text
        )
    elif when == "clients:":  # the first consistent point: the setup done, the basis saved
        assert (
            done == 0
            and f"stopped by {name} before round 1 (no checkpoint yet: it starts at round 1, {basis})" in text
        )
    else:
        assert 1 <= done < 3 and f"stopped by {name} after round {done}'s checkpoint" in text
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert _results(out)["rounds_completed"] == 3
    resumed = capsys.readouterr().out
    assert (f"resuming after round {done}" in resumed) if done else ("starting at round 1" in resumed)


def test_a_second_signal_that_lands_in_a_weakref_callback_still_stops_at_once(capsys) -> None:
    """Python drops an exception raised in a weakref callback (it prints "Exception ignored"): the second
    signal's interrupt is delivered again, in ordinary code, and nothing is printed."""

    class Thing:
        pass

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    try:
        with StopSignals(notify=lambda _text: None) as stop:
            signal.raise_signal(signal.SIGINT)  # the first: a stop is requested
            assert stop.requested == signal.SIGINT
            thing = Thing()
            second = signal.getsignal(signal.SIGINT)
            ref = weakref.ref(thing, lambda _ref: second(signal.SIGINT, None))
            with pytest.raises(StopNow):
                del thing  # the callback raises StopNow, which Python cannot let out of it
                for _ in range(500):  # the re-delivered signal comes from a thread, within a few ms
                    time.sleep(0.01)
            assert ref() is None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert sys.unraisablehook is hook
    assert "Exception ignored" not in capsys.readouterr().err


def test_an_interrupt_in_the_middle_of_a_round_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from fedsb.fed.simulate import InProcessExecutor

    real = InProcessExecutor.train_client

    def interrupted(self, round: int, cid: str, download):
        if round == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a second signal) while round 2 trains
        return real(self, round, cid, download)

    monkeypatch.setattr(InProcessExecutor, "train_client", interrupted)
    out = tmp_path / "run"
    assert (
        main(["run", "--config", TINY, "--output", str(out), "--no-progress", *FAST, "fed.rounds=3"]) == 130
    )
    err = capsys.readouterr().err
    assert err == (
        "fedsb: stopped by SIGINT during round 2 (the last checkpoint is round 1 of 3); "
        f"continue with: fedsb run --resume {out.resolve()}\n"
    )
    monkeypatch.setattr(InProcessExecutor, "train_client", real)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert _results(out)["rounds_completed"] == 3


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_restarts_with_resume(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    proc = _start(
        ["run", "--config", TINY, "--output", str(out), *FAST, "fed.rounds=1", "export=false"], tmp_path
    )
    try:
        _read_until(proc, "fedsb: fedsb run, results in")
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=60)
    finally:
        _stop(proc)
    assert not (out / "checkpoints").exists() and (out / "config.yaml").is_file()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert "no checkpoint yet in" in capsys.readouterr().out
    assert _results(out)["rounds_completed"] == 1


def test_a_restart_without_checkpoint_reuses_the_basis_and_ends_as_an_uninterrupted_run(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert main(["run", "--config", TINY, *FAST, "--output", str(out), "--no-progress"]) == 0
    reference = load_file(str(out / "adapter" / "adapter.safetensors"))
    basis = (out / "basis" / "basis.safetensors").read_bytes()
    for name in ("checkpoints", "adapter", "peft", "results.json", "manifest.json", "metrics.csv"):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()  # as if killed before round 1
    capsys.readouterr()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert (
        f"no checkpoint yet in {out / 'checkpoints'}: starting at round 1 (reusing the saved basis)" in text
    )
    assert (out / "basis" / "basis.safetensors").read_bytes() == basis
    again = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in again)


def test_total_time_counts_every_session_of_a_resumed_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--config", TINY, "--output", str(out), "--no-progress", *FAST, "export=false"]
    assert main([args[0], "--stop-after-round", "1", *args[1:]]) == 0
    first = _results(out)["timing"]
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    timing = _results(out)["timing"]
    sessions = timing["sessions"]
    assert [s["rounds"] for s in sessions] == [[1, 1], [2, 2]]
    assert sessions[0]["seconds"] == pytest.approx(first["session_seconds"], rel=0.5)
    assert timing["total_seconds"] == pytest.approx(sum(s["seconds"] for s in sessions))
    assert timing["total_seconds"] > timing["session_seconds"] == sessions[1]["seconds"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["round", "0", "1", "2"]  # the CSV continues across sessions
