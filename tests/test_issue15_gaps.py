"""Issue 15 gaps found by the audit (/work/coord/issue15-audit.md): a second signal while a stopped run
exits, the time a session spent after its last checkpoint, `datasets` noise when reading a user file, the
wire dtype `fedsb comm` defaults to. Every process a test starts is stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsb.cli import main
from fedsb.data.tasks import get_task
from fedsb.errors import FedsbError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
FAST = ["threads=1", "data.test_size=4", "export=false"]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_while_a_stopped_run_exits_keeps_its_exit_code(sig: int, tmp_path: Path) -> None:
    """The first signal stops the run after round 1's checkpoint; the second arrives once the stop message
    is printed, while the process exits: before, SIGINT printed a KeyboardInterrupt traceback from the
    interpreter's teardown and SIGTERM killed the process (exit -15)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsb", "run", "--config", TINY, "--output", str(out), *FAST, "fed.rounds=3"],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        sent = 0
        for line in proc.stdout:
            lines.append(line)
            if sent == 0 and line.startswith("round 1/"):
                proc.send_signal(sig)
                sent = 1
            elif sent == 1 and "continue with: fedsb run --resume" in line:
                proc.send_signal(sig)  # the process is exiting now
                sent = 2
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()  # by its PID
        proc.wait(timeout=60)
    text = "".join(lines)
    assert sent == 2, text[-2000:]
    assert proc.returncode == 128 + sig, (proc.returncode, text[-2000:])
    assert "Traceback" not in text and "Exception ignored" not in text, text[-2000:]


def _sessions_of_checkpoint(out: Path) -> list[dict]:
    from fedsb.fed.checkpoint import RunState, latest_checkpoint

    latest = latest_checkpoint(out / "checkpoints")
    return RunState.load(latest).sessions if latest is not None else []


@pytest.mark.parametrize("stop_in_round", [1, 2])  # before the first checkpoint; after round 1's
def test_total_time_includes_what_a_session_spent_after_its_last_checkpoint(
    stop_in_round: int, tmp_path: Path, monkeypatch, capsys
) -> None:
    from fedsb.fed.simulate import InProcessExecutor

    real = InProcessExecutor.train_client

    def slow_then_interrupted(self, round: int, cid: str, download):
        if round == stop_in_round:
            time.sleep(1.0)
            raise KeyboardInterrupt  # a second Ctrl-C, one second into the round
        return real(self, round, cid, download)

    monkeypatch.setattr(InProcessExecutor, "train_client", slow_then_interrupted)
    out = tmp_path / "run"
    assert (
        main(["run", "--config", TINY, "--output", str(out), "--no-progress", *FAST, "fed.rounds=2"]) == 130
    )
    in_checkpoint = _sessions_of_checkpoint(out)
    monkeypatch.setattr(InProcessExecutor, "train_client", real)
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    timing = json.loads((out / "results.json").read_text())["timing"]
    first, last = timing["sessions"]
    assert first["rounds"] == ([] if stop_in_round == 1 else [1, 1]) and last["rounds"] == [stop_in_round, 2]
    checkpointed = in_checkpoint[0]["seconds"] if in_checkpoint else 0.0
    assert first["seconds"] >= checkpointed + 1.0  # the interrupted second counts
    assert timing["total_seconds"] == pytest.approx(first["seconds"] + last["seconds"])
    assert json.loads((out / "sessions.json").read_text())[:1] == [first]


def test_a_full_disk_is_still_one_error_when_sessions_json_cannot_be_written(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import errno

    import fedsb.run

    real = fedsb.run.write_json

    def full_disk(path: Path, data) -> None:
        if Path(path).name == "sessions.json" or (
            Path(path).name == "results.json" and data["rounds_completed"] == 2
        ):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(fedsb.run, "write_json", full_disk)
    out = tmp_path / "run"
    assert main(["run", "--config", TINY, *FAST, "--output", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "sessions.json" in err and "No space left on device" in err  # the first refused write


def test_reading_a_user_file_draws_no_bar_and_logs_no_datasets_error(tmp_path: Path, capfd) -> None:
    good, broken = tmp_path / "good.jsonl", tmp_path / "broken.jsonl"
    good.write_text('{"text": "a fine film", "label": "pos"}\n')
    broken.write_text('{"text": "a fine film", "label": "pos"}\n{"text": broken\n')
    assert (
        len(
            get_task("classify", data_files={"test": str(good)}, label_names=["neg", "pos"]).load(
                "test", None, 0
            )
        )
        == 1
    )
    with pytest.raises(FedsbError, match="has an invalid row at line 2"):
        get_task("classify", data_files={"test": str(broken)}, label_names=["neg", "pos"]).load(
            "test", None, 0
        )
    err = capfd.readouterr().err
    assert "\r" not in err and "Generating" not in err and "Failed to load JSON" not in err, err


def test_comm_defaults_to_the_wire_dtype_of_a_run() -> None:
    from fedsb.cli import build_parser
    from fedsb.config import RunConfig

    args = build_parser().parse_args(["comm", "--model", "bert-base", "--clients", "2"])
    assert args.dtype == RunConfig().fed.wire_dtype
