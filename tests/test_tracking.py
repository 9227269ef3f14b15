"""Per-round figures: the log line, `report_to` trackers (CSV, TensorBoard read back with its own reader,
W&B and MLflow when installed), the privacy rules for what they publish, and the same over Flower."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import pytest

from fedsb.config import resolve_config
from fedsb.console import bars_enabled, round_line
from fedsb.errors import ConfigError
from fedsb.fed.ledger import Ledger
from fedsb.fed.rounds import RoundRecord
from fedsb.privacy.mechanism import MECHANISMS
from fedsb.round_metrics import RoundMetrics, round_metrics
from fedsb.run import run_job
from fedsb.tracking import Trackers

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
BASE = ["threads=1", "export=false", "data.test_size=4"]


def _metrics(round: int, loss: float, acc: float, clients: int = 2) -> RoundMetrics:
    return RoundMetrics(
        round=round,
        rounds=4,
        sampled=clients,
        accepted=clients,
        loss=loss if round else None,
        eval={"accuracy": acc, "correct": acc * 4, "total": 4.0},
        bytes_round=100 if round else 0,
        bytes_total=100 * round,
        clients={f"c{i}": {"loss": loss + i, "num_examples": 8.0} for i in range(clients)} if round else {},
    )


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in <run>/tensorboard, read by TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---- the log line -------------------------------------------------------------------------------------------


def test_the_round_line_says_round_clients_loss_accuracy_bytes_time_and_eta() -> None:
    m = _metrics(2, 1.25, 0.5)
    m.rejected, m.dropped = 1, 1
    line = round_line(m, elapsed=65, eta=130)
    assert line == (
        "round 2/4 | clients 2 accepted, 1 rejected, 1 dropped | loss 1.25 | accuracy 50.0% (2/4) | "
        "100 B this round, 200 B total | elapsed 0:01:05, ETA 0:02:10"
    )
    last = _metrics(4, 1.0, 0.75)
    assert "ETA" not in round_line(
        last, elapsed=1, eta=0
    ) and "clients 2 accepted, 0 rejected |" in round_line(last, elapsed=1, eta=0)


def test_under_dp_the_server_logs_no_client_loss_or_timing() -> None:
    ledger = Ledger()
    record = RoundRecord(round=1, sampled=["a", "b"], accepted=["a", "b"], train_loss=0.7)
    # a client metric the privacy rules keep on the client, as if it had reached the server anyway
    record.client_metrics = {
        c: {"num_examples": 8, "loss": 0.7, "seconds": 1.5, "epsilon": 0.4} for c in "ab"
    }
    record.privacy = {"round": 1, "max_epsilon": 0.4, "epsilon": {"a": 0.4, "b": 0.4}}
    m = round_metrics(record, rounds=3, ledger=ledger, release=MECHANISMS["sample"].release)
    assert m.loss is None and m.loss_withheld and m.epsilon == 0.4
    assert m.clients == {c: {"epsilon": 0.4, "num_examples": 8.0} for c in "ab"}
    assert "train/loss" not in m.scalars() and m.scalars()["privacy/epsilon"] == 0.4
    line = round_line(m, elapsed=1, eta=2)
    assert "loss withheld (DP)" in line and "epsilon 0.4" in line and "0.7" not in line
    plain = round_metrics(record, rounds=3, ledger=ledger, release=MECHANISMS["none"].release)
    assert plain.loss == 0.7 and plain.clients["a"]["loss"] == 0.7 and plain.epsilon is None


def test_bars_are_drawn_only_on_a_terminal(tmp_path: Path) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    with open(tmp_path / "log", "w") as redirected:
        assert not bars_enabled(True, redirected)
    assert bars_enabled(True, Tty()) and not bars_enabled(False, Tty())  # type: ignore[arg-type]


# ---- the setting --------------------------------------------------------------------------------------------


def test_report_to_is_a_validated_list_defaulting_to_csv() -> None:
    assert resolve_config(TINY).report_to == ["csv"]
    assert resolve_config(TINY, ["report_to=tensorboard"]).report_to == ["tensorboard"]
    assert resolve_config(TINY, ["report_to=[]"]).report_to == []
    assert resolve_config(TINY, ["report_to=none"]).report_to == []
    with pytest.raises(ConfigError, match=r"report_to=\['csv', 'tensorbord'\] names an unknown tracker"):
        resolve_config(TINY, ["report_to=[csv,tensorbord]"])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        resolve_config(TINY, ["report_to=[csv,csv]"])


# ---- the backends -------------------------------------------------------------------------------------------


def test_csv_and_tensorboard_hold_every_round_and_a_resume_replaces_what_came_after_its_checkpoint(
    tmp_path: Path,
) -> None:
    first = Trackers.open(["csv", "tensorboard"], tmp_path, first_round=0, config={})
    for r in range(4):  # rounds 0..3 logged, but say the run was killed before round 3's checkpoint
        first.log(_metrics(r, 2.0 - 0.1 * r, 0.25))
    first.close({}, finished=False)
    second = Trackers.open(["csv", "tensorboard"], tmp_path, first_round=3, config={})
    for r in (3, 4):
        second.log(_metrics(r, 9.0 + r, 0.5))
    second.close({"final/accuracy": 0.5}, finished=True)

    rows = _csv(tmp_path / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3, 4]
    assert [r["train/loss"] for r in rows] == ["", "1.9", "1.8", "12.0", "13.0"]
    assert list(rows[0])[:2] == ["round", "clients/sampled"]  # grouped columns, whatever came first
    clients = _csv(tmp_path / "client_metrics.csv")
    assert [(r["round"], r["client"], r["metric"]) for r in clients][:2] == [
        ("1", "c0", "loss"),
        ("1", "c0", "num_examples"),
    ]
    assert [float(r["value"]) for r in clients if r["metric"] == "loss" and r["round"] == "3"] == [12.0, 13.0]

    events = _events(tmp_path)
    assert events["train/loss"] == [(1, pytest.approx(1.9)), (2, pytest.approx(1.8)), (3, 12.0), (4, 13.0)]
    assert [s for s, _ in events["eval/accuracy"]] == [0, 1, 2, 3, 4]
    assert events["client/c1/loss"][-1] == (4, 14.0)
    assert events["comm/bytes_total"][-1] == (4, 400.0)


def test_a_missing_optional_backend_is_skipped_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with caplog.at_level(logging.WARNING, logger="fedsb.tracking"):
        trackers = Trackers.open(["csv", "wandb", "mlflow"], tmp_path, first_round=0, config={})
    assert trackers.names == ["csv"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "report_to: wandb skipped: the wandb package is not installed (pip install wandb)",
        "report_to: mlflow skipped: the mlflow package is not installed (pip install mlflow-skinny)",
    ]


def test_wandb_runs_offline_in_the_run_directory_and_continues_its_run_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for rounds, first in (((0, 1), 0), ((2,), 2)):
        t = Trackers.open(["wandb"], tmp_path, first_round=first, config={"fed": {"rounds": 2}})
        assert t.names == ["wandb"]
        for r in rounds:
            t.log(_metrics(r, 1.0, 0.5))
        t.close({"final/accuracy": 0.5}, finished=r == 2)
    run_id = json.loads((tmp_path / "tracking.json").read_text())["wandb"]
    offline = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # one directory per session, both of the same W&B run
    assert all(list(d.glob("*.wandb")) for d in offline)  # the records `wandb sync` uploads


def test_mlflow_writes_a_file_store_in_the_run_directory_and_continues_its_run_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for rounds, first in (((0, 1), 0), ((2,), 2)):
        t = Trackers.open(["mlflow"], tmp_path, first_round=first, config={"fed": {"rounds": 2}})
        assert t.names == ["mlflow"]
        for r in rounds:
            t.log(_metrics(r, 1.0 + r, 0.5))
        t.close({"final/accuracy": 0.5}, finished=r == 2)
    run_id = json.loads((tmp_path / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 3.0)]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["fed.rounds"] == "2"


# ---- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_logs_a_line_per_round_and_fills_its_trackers(tmp_path: Path, capsys) -> None:
    cfg = resolve_config(TINY, [*BASE, "fed.rounds=3", "eval.every=2", "report_to=[csv,tensorboard]"])
    cfg.output_dir = str(tmp_path)
    results = run_job(cfg)
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if x.startswith("round ")]
    assert [x.split(" | ")[0] for x in lines] == ["round 1/3", "round 2/3", "round 3/3"]
    per_round = results["ledger"]["rounds"]
    assert f"{per_round[0]['bytes_total']} B this round" in lines[0] or "KB this round" in lines[0]
    assert "accuracy" not in lines[0] and "accuracy" in lines[1] and "accuracy" in lines[2]
    loss = results["rounds"][0]["train_loss"]
    assert f"loss {loss:.4g}" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[2]
    rows = _csv(tmp_path / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[1]["train/loss"]) == pytest.approx(loss)
    assert [int(r["comm/bytes_total"]) for r in rows[1:]] == [
        sum(x["bytes_total"] for x in per_round[: i + 1]) for i in range(3)
    ]
    events = _events(tmp_path)
    assert [s for s, _ in events["eval/accuracy"]] == [0, 2, 3]
    assert events["client/client-00/loss"][0][1] == pytest.approx(
        results["rounds"][0]["client_metrics"]["client-00"]["loss"]
    )


@pytest.mark.slow
def test_client_level_dp_tracks_epsilon_and_no_client_loss_over_flower_as_in_the_simulator(
    tmp_path: Path, capsys
) -> None:
    from fedsb.flower.client_app import app as client_app
    from fedsb.flower.protocol import AppSettings
    from fedsb.flower.server_app import run_flower_job
    from flower_grid import LocalGrid

    extra = [
        *BASE,
        "eval.every=100",
        "report_to=[csv,tensorboard]",
        "privacy.reproducible_noise=true",
        "privacy.mode=client",
        "privacy.noise_multiplier=0.5",
        "privacy.clip_update=0.01",
    ]
    cfg = resolve_config(TINY, extra)
    cfg.output_dir = str(tmp_path / "sim")
    run_job(cfg)
    sim_out = capsys.readouterr().out
    settings = AppSettings(config=TINY, overrides=" ".join(extra), output_dir=str(tmp_path / "flwr"))
    run_flower_job(LocalGrid(client_app, 2), settings)
    flwr_out = capsys.readouterr().out
    for out in (sim_out, flwr_out):
        lines = [x for x in out.splitlines() if x.startswith("round ")]
        assert len(lines) == 2 and all("loss withheld (DP)" in x and "epsilon " in x for x in lines)
    tables = {}
    for engine in ("sim", "flwr"):
        rows = _csv(tmp_path / engine / "metrics.csv")
        assert "train/loss" not in rows[0] and float(rows[2]["privacy/epsilon"]) > float(
            rows[1]["privacy/epsilon"]
        )
        metrics = {r["metric"] for r in _csv(tmp_path / engine / "client_metrics.csv")}
        assert metrics == {"num_examples"}  # no loss, no timing of a private client
        client_tags = {t for t in _events(tmp_path / engine) if t.startswith("client/")}
        assert client_tags == {"client/client-00/num_examples", "client/client-01/num_examples"}
        tables[engine] = [
            {k: v for k, v in r.items() if not k.startswith(("time/", "eval/seconds"))} for r in rows
        ]
    assert tables["sim"] == tables["flwr"]
