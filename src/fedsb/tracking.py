"""Experiment tracking: the round loop's per-round figures sent to CSV, TensorBoard, W&B or MLflow.

The `report_to` setting names the backends (like transformers' `report_to`; default `[csv]`). Each
backend is one `Tracker` class: `log(metrics)` once per round (step = the round; round 0 is the untuned
model's evaluation) and `close(final, finished)` at the end. What is logged is `RoundMetrics.scalars()`
plus each client's releasable metrics as `client/<id>/<name>` (`fedsb.round_metrics`: under DP no loss
or timing of a client), so no backend can publish what the privacy rules keep on the clients.

* csv: `metrics.csv` (one row per round, a column per figure) and `client_metrics.csv` (round, client,
  metric, value) in the run directory. No dependency.
* tensorboard: event files in `<run>/tensorboard` through `torch.utils.tensorboard` (tensorboard is a
  dependency): `tensorboard --logdir <run>/tensorboard`.
* wandb: offline by default (`WANDB_MODE` overrides), files under `<run>/wandb`, project `WANDB_PROJECT`
  (default fedsb); `wandb sync` uploads them later.
* mlflow: a file store in `<run>/mlruns` unless `MLFLOW_TRACKING_URI` is set (MLflow 3 keeps its file
  store in maintenance mode: fedsb sets `MLFLOW_ALLOW_FILE_STORE=true` for it); experiment
  `MLFLOW_EXPERIMENT_NAME` (default fedsb); `mlflow ui --backend-store-uri <run>/mlruns` shows it.

A resumed run continues the same W&B / MLflow run (ids kept in `<run>/tracking.json`) and drops what an
interrupted session logged past its last checkpoint (CSV rows, TensorBoard events via `purge_step`).
W&B and MLflow are optional: not installed, they are skipped with one warning; one that fails while the
run goes on is disabled with one warning (tracking never stops training). CSV and TensorBoard errors are
raised like any other write error.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fedsb.round_metrics import RoundMetrics

log = logging.getLogger("fedsb.tracking")

#: the `report_to` names, in the order they are opened
TRACKER_NAMES = ("csv", "tensorboard", "wandb", "mlflow")
IDS_FILE = "tracking.json"  # the W&B / MLflow run ids a resumed run continues


class BackendMissing(ImportError):
    """An optional tracking backend whose package is not installed."""


class Tracker(Protocol):
    """One tracking backend, opened for one session of a run."""

    name: str

    def log(self, metrics: RoundMetrics) -> None: ...

    def close(self, final: Mapping[str, float], finished: bool) -> None: ...


def step_scalars(metrics: RoundMetrics) -> dict[str, float]:
    """Everything logged at step `metrics.round`: the round's scalars and `client/<id>/<name>`."""
    out = metrics.scalars()
    for cid, values in metrics.clients.items():
        out.update({f"client/{cid}/{k}": v for k, v in values.items()})
    return out


# ---- csv ----------------------------------------------------------------------------------------------------


GROUPS = ("round", "clients", "train", "eval", "comm", "privacy", "time")  # metrics.csv's column order


class CsvTracker:
    """metrics.csv (a row per round, columns added as figures appear) and client_metrics.csv (long form)."""

    name = "csv"

    def __init__(self, run_dir: Path, *, first_round: int, **_: Any) -> None:
        self.path = run_dir / "metrics.csv"
        self.client_path = run_dir / "client_metrics.csv"
        self.rows = [r for r in _read_csv(self.path) if _round_of(r) < first_round]
        self.columns = list(dict.fromkeys(k for r in self.rows for k in r)) or ["round"]
        kept = [r for r in _read_csv(self.client_path) if _round_of(r) < first_round]
        _write_csv(self.client_path, ["round", "client", "metric", "value"], kept)

    def log(self, metrics: RoundMetrics) -> None:
        row: dict[str, Any] = {"round": metrics.round, **metrics.scalars()}
        self.rows.append(row)
        self.columns.extend(k for k in row if k not in self.columns)
        self.columns.sort(key=lambda c: GROUPS.index(c.split("/")[0]) if c.split("/")[0] in GROUPS else 99)
        _write_csv(self.path, self.columns, self.rows)
        with open(self.client_path, "a", newline="") as f:
            writer = csv.writer(f)
            for cid, values in metrics.clients.items():
                writer.writerows([metrics.round, cid, k, v] for k, v in values.items())

    def close(self, final: Mapping[str, float], finished: bool) -> None:
        pass  # every round is on disk already


def _round_of(row: Mapping[str, Any]) -> int:
    try:
        return int(row.get("round", -1))
    except ValueError:
        return -1


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _write_csv(path: Path, columns: list[str], rows: list[Mapping[str, Any]]) -> None:
    """Write `rows` under `columns` atomically (a temporary file renamed over `path`)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# ---- tensorboard ----------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Scalars at step = round in `<run>/tensorboard` (a resumed session purges steps >= its first)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, *, first_round: int, **_: Any) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise BackendMissing(f"tensorboard is not installed ({exc}); pip install tensorboard") from None
        self.dir = run_dir / "tensorboard"
        resumed = self.dir.is_dir() and any(self.dir.iterdir())
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=first_round if resumed else None)

    def log(self, metrics: RoundMetrics) -> None:
        for key, value in step_scalars(metrics).items():
            self.writer.add_scalar(key, value, global_step=metrics.round)
        self.writer.flush()

    def close(self, final: Mapping[str, float], finished: bool) -> None:
        self.writer.close()


# ---- wandb ----------------------------------------------------------------------------------------------------


class WandbTracker:
    """A W&B run, offline unless WANDB_MODE says otherwise; one run across resumes (its id is kept)."""

    name = "wandb"

    def __init__(self, run_dir: Path, *, config: Mapping[str, Any], **_: Any) -> None:
        try:
            import wandb
        except ImportError:
            raise BackendMissing("the wandb package is not installed (pip install wandb)") from None
        ids = _read_ids(run_dir)
        run_id = ids.get("wandb") or secrets.token_hex(4)  # W&B run ids: lowercase letters and digits
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fedsb"),
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
            config=dict(config),
            reinit="create_new",
        )
        _write_ids(run_dir, wandb=run_id)

    def log(self, metrics: RoundMetrics) -> None:
        self.run.log(step_scalars(metrics), step=metrics.round)

    def close(self, final: Mapping[str, float], finished: bool) -> None:
        self.run.summary.update(dict(final))
        self.run.finish(exit_code=0 if finished else 1)


# ---- mlflow ---------------------------------------------------------------------------------------------------


class MlflowTracker:
    """An MLflow run in `<run>/mlruns` (or MLFLOW_TRACKING_URI); one run across resumes (its id is kept)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, *, config: Mapping[str, Any], **_: Any) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise BackendMissing("the mlflow package is not installed (pip install mlflow-skinny)") from None
        self._metric = Metric
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the file store, in MLflow 3 "in maintenance mode": allowed explicitly
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        ids = _read_ids(run_dir)
        if ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedsb")
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        _write_ids(run_dir, mlflow=self.run_id)

    def log(self, metrics: RoundMetrics) -> None:
        now = int(time.time() * 1000)
        batch = [self._metric(k, v, now, metrics.round) for k, v in step_scalars(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def close(self, final: Mapping[str, float], finished: bool) -> None:
        now = int(time.time() * 1000)
        if final:
            self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, 0) for k, v in final.items()])
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_ids(run_dir: Path) -> dict[str, str]:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_ids(run_dir: Path, **ids: str) -> None:
    (run_dir / IDS_FILE).write_text(json.dumps({**_read_ids(run_dir), **ids}, indent=1))


# ---- the set of a run -----------------------------------------------------------------------------------------

TRACKERS: dict[str, type] = {
    "csv": CsvTracker,
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}
OPTIONAL = ("wandb", "mlflow")  # skipped when missing, disabled when failing


class Trackers:
    """The backends `report_to` names, opened for one session: `log` each round, `close` once."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    @classmethod
    def open(
        cls, names: list[str], run_dir: Path, *, first_round: int, config: Mapping[str, Any]
    ) -> Trackers:
        """Open each named backend; an optional one that is missing or fails to start is skipped (warned)."""
        opened: list[Any] = []
        for name in names:
            try:
                opened.append(TRACKERS[name](run_dir, first_round=first_round, config=config))
            except BackendMissing as exc:
                log.warning("report_to: %s skipped: %s", name, exc)
            except Exception as exc:
                if name not in OPTIONAL:
                    raise
                log.warning(
                    "report_to: %s skipped: it failed to start (%s: %s)", name, type(exc).__name__, exc
                )
        return cls(opened)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log(self, metrics: RoundMetrics) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "log", metrics)

    def close(self, final: Mapping[str, float], *, finished: bool) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, "close", final, finished)
        self.trackers = []

    def _call(self, tracker: Any, what: str, *args: Any) -> None:
        try:
            getattr(tracker, what)(*args)
        except Exception as exc:
            if tracker.name not in OPTIONAL:
                raise
            log.warning(
                "report_to: %s disabled: %s failed (%s: %s)", tracker.name, what, type(exc).__name__, exc
            )
            self.trackers.remove(tracker)
