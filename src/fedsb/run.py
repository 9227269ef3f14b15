"""A run and its stages: setup -> restore from a checkpoint (or evaluate the untuned model) -> rounds, a
checkpoint after each -> finish (export, results, manifest, plot, table).

`run_job` is what `fedsb run` calls. Every stage writes into one results directory: config.yaml,
manifest.json, results.json, metrics.csv (and the other `report_to` trackers), learning_curve.png,
basis/ (Fed-SB), checkpoints/, sessions.json (wall time per session), adapter/, and the final export
(peft/ where lossless, merged/ for methods that fold updates into W0). The parts of the job come from
the recipe (`fedsb.job.build_components`); the rounds from the one round loop (`fedsb.fed.rounds`). The
directory is created only once the checkpoint (when resuming) and the output location are checked, and a
setup that fails removes what it created.
After each round the run logs one line (`fedsb.console.round_line`) and feeds the trackers
(`fedsb.tracking`); SIGINT/SIGTERM stop it after the next checkpoint (`fedsb.interrupt`).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedsb.config import RunConfig, config_to_yaml, load_yaml
from fedsb.console import RoundClock, bars_enabled, round_line
from fedsb.device import Placement
from fedsb.errors import CheckpointError, ConfigError, FedsbError
from fedsb.fed.checkpoint import RunState, check_placement, latest_checkpoint, placement_record
from fedsb.fed.mixed_rank import client_ranks_of
from fedsb.fed.rounds import RoundRecord, Server, run_rounds
from fedsb.fed.server_opt import build_server_optimizer
from fedsb.interrupt import RunStopped, StopSignals, signal_name
from fedsb.job import CONFIG_FILE, Components, build_components, configure_torch, placement_of
from fedsb.paths import Created, make_output_dir, make_run_dir
from fedsb.privacy.release import WITHHELD_TIMING
from fedsb.results import write_json
from fedsb.round_metrics import RoundMetrics, flat_eval, round_metrics
from fedsb.seeding import derive_seed
from fedsb.tracking import Trackers

log = logging.getLogger("fedsb.run")

MakeExecutor = Callable[[Components], Any]
RUNS_ROOT = "runs"  # where runs without an output_dir go: runs/<timestamp>-<random>
RESUME_COMMAND = "fedsb run --resume {dir}"
SESSIONS_FILE = "sessions.json"  # the wall time of every session, rewritten at each checkpoint and exit
#: OS refusals of a write that the user can fix (space, permissions, a read-only mount)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def resolve_resume_config(resume: Path, overrides: list[str]) -> RunConfig:
    """The saved config of a run with the overrides `fedsb.resume` allows; refused ones raise first."""
    from fedsb.resume import resumed_config

    path = resume / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{resume} is not a fedsb run directory ({CONFIG_FILE} missing)")
    return resumed_config(load_yaml(path), overrides, resume)


def run_job(
    cfg: RunConfig,
    *,
    resume: str | Path | None = None,
    stop_after_round: int | None = None,
    echo: Callable[[str], None] = print,
    command: list[str] | None = None,
    make_executor: MakeExecutor | None = None,
    handle_signals: bool = False,
    resume_command: str = RESUME_COMMAND,
    init_parties: Callable[[list[str], list[Any]], Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federated fine-tuning job and return the results dict (also in results.json).

    `make_executor(parts)` replaces the in-process simulator with another `ClientExecutor` (the Flower
    app's) built from the job's server components (method, data, privacy ledger); it must also offer
    `state_dict()` / `load_state_dict()` for checkpoints.
    `init_parties` (init.source=federated): how the server reaches the init's clients (the Flower app's
    goes over its Grid; default: in process).
    `handle_signals`: SIGINT/SIGTERM stop the run after the next checkpoint (`fedsb.interrupt`; the CLI's
    choice, main thread only); an interrupt raises `RunStopped` naming `resume_command` (with `{dir}`).
    """
    run = Run(
        cfg, resume=resume, echo=echo, command=command, make_executor=make_executor,
        resume_command=resume_command, init_parties=init_parties,
    )  # fmt: skip
    with StopSignals(enabled=handle_signals) as stop:
        run.stop = stop
        return run.execute(stop_after_round=stop_after_round)


class Run:
    """One run: its directory, its components, its round loop and what it has done so far."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: str | Path | None = None,
        echo: Callable[[str], None] = print,
        command: list[str] | None = None,
        make_executor: MakeExecutor | None = None,
        resume_command: str = RESUME_COMMAND,
        init_parties: Callable[[list[str], list[Any]], Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.init_parties = init_parties
        self.resume = Path(resume) if resume else None
        self.echo = echo
        self.command = command or sys.argv
        self.make_executor = make_executor
        self.resume_command = resume_command
        given = self.resume or (Path(cfg.output_dir) if cfg.output_dir else None)
        self.out: Path = given or Path(RUNS_ROOT)  # the run's directory once `setup` has created it
        self.ckpt_root = self.out / "checkpoints"
        self.created: Created | None = None  # what this run created (removed if its setup fails)
        self.stop = StopSignals(enabled=False)  # `run_job` installs the signal handlers
        self.bars = bars_enabled(cfg.progress)  # tqdm bars only on a terminal
        self.t_start = time.perf_counter()
        self.started = datetime.now().isoformat(timespec="seconds")
        self.saved: RunState | None = None  # the checkpoint a resumed run continues from
        self.latest: Path | None = None  # where it was read
        self.before: dict[str, Any] | None = None  # the untuned model's evaluation
        self.completed = 0  # the last round whose checkpoint is written
        self.bytes_done = 0  # the ledger's round bytes through round `completed`
        self.first_round = 1  # the first round this session trains
        self.earlier_sessions: list[dict[str, Any]] = []  # timing of the sessions before a resume
        self.trackers = Trackers([])
        self.timed = False  # past the refusals: this session's time goes into sessions.json
        self.training = False  # in the round loop (for what a stop says)
        self.export: dict[str, Any] | None = None
        self.manifest: dict[str, Any] = {}

    def execute(self, *, stop_after_round: int | None = None) -> dict[str, Any]:
        """setup -> begin -> train -> finish, stopping at a consistent point when a signal asked for it."""
        finished = False
        try:
            self.setup()
            self._stop_if_requested()
            self.begin()
            self._stop_if_requested()
            if self.train(stop_after_round=stop_after_round):
                finished = True
                return self.finish()
            return self.results()
        except KeyboardInterrupt:
            raise self._stopped(self.stop.requested or signal.SIGINT, at_once=True) from None
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise self._unwritable(exc) from None
        finally:
            if not finished:
                self.trackers.close({}, finished=False)
            try:
                self._write_sessions()  # also the time after the last checkpoint (a stop, an error)
            except OSError:  # e.g. the full disk the error being raised names; the checkpoint keeps its own
                pass

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self) -> Run:
        """Check the checkpoint (resuming) and the directory, create it, write config.yaml, build the
        components; if building fails, what this run created is removed (a failed setup leaves nothing)."""
        configure_torch(self.cfg)
        placement = placement_of(self.cfg)  # a device this machine lacks is refused before any write
        if self.resume:
            self.saved = self._read_checkpoint(placement_record(self.cfg, placement))
        elif self.cfg.output_dir and self.ckpt_root.exists() and any(self.ckpt_root.iterdir()):
            raise ConfigError(
                field="output_dir",
                value=str(self.out),
                what="already holds a run",
                fix=f"use --resume {self.out} or another output_dir",
            )
        if not self.resume:  # a resumed run rewrites its config only once its checkpoint has loaded
            self.created = make_output_dir(self.out) if self.cfg.output_dir else make_run_dir(RUNS_ROOT)
            self.out, self.ckpt_root = self.created.path, self.created.path / "checkpoints"
        try:
            self._build(placement)
        except Exception:
            if self.created is not None:
                self.created.remove()
            raise
        return self

    def _build(self, placement: Placement) -> None:
        if not self.resume:
            (self.out / CONFIG_FILE).write_text(config_to_yaml(self.cfg))
        self.echo(f"fedsb: {self.cfg.fed.method} run, results in {self.out}")
        reuse = self.saved is not None or (self.resume is not None and _basis_saved(self.out))
        if self.resume is not None and self.saved is None:
            self.echo(
                f"no checkpoint yet in {self.ckpt_root}: starting at round 1"
                + (" (reusing the saved basis)" if reuse else "")
            )
        self.parts = build_components(
            self.cfg,
            role="server",
            setup_dir=self.out,
            resume=reuse,
            placement=placement,
            echo=self.echo,
            init_parties=self.init_parties,
        )
        self.server = self._server(self.parts)
        self.executor = (
            self.make_executor(self.parts) if self.make_executor is not None else self.parts.simulator()
        )

    def _server(self, parts: Components) -> Server:
        cfg, privacy = self.cfg, parts.privacy
        return Server(
            parts.method,
            parts.sampler,
            parts.ledger,
            wire_dtype=cfg.fed.wire_dtype,
            wire_scale=cfg.fed.wire_scale,
            min_clients=cfg.fed.min_clients,
            max_update_norm=cfg.fed.max_update_norm,
            aggregator=privacy.aggregator if privacy else None,
            declared_sizes=privacy.client_sizes if privacy else None,
            release=cfg.privacy.mechanism.release,
            server_optimizer=build_server_optimizer(cfg.fed, parts.method.state),
            client_ranks=client_ranks_of(cfg.partition.client_ranks, list(parts.data.clients)),
        )

    def _read_checkpoint(self, precision: dict[str, Any]) -> RunState | None:
        """The latest checkpoint (None: a run stopped before its first one, which starts at round 1),
        refused before anything is written if this run cannot continue it."""
        latest = latest_checkpoint(self.ckpt_root)
        if latest is None:
            return None
        state = RunState.load(latest)
        check_placement(state, precision, latest)
        if self.cfg.fed.rounds < state.round:
            raise ConfigError(
                field="fed.rounds",
                value=self.cfg.fed.rounds,
                what=f"is below the {state.round} rounds this run has already done (checkpoint {latest})",
                fix=f"resume with fed.rounds={state.round} or more (or without fed.rounds), or start a new run",
            )
        self.latest = latest
        return state

    # ---- restore from a checkpoint, or start --------------------------------------------------------------
    def begin(self) -> None:
        """Continue from the checkpoint (resuming) or evaluate the untuned model; write the manifest; open
        the trackers."""
        self.first_round = 0 if self.saved is None else self.saved.round + 1  # 0: the untuned evaluation
        if self.saved is not None:
            self.restore(self.saved)
            self.timed = True
            self._open_trackers()
        else:
            self.earlier_sessions = _read_sessions(self.out) if self.resume else []
            self.timed = True
            if self.resume:
                (self.out / CONFIG_FILE).write_text(config_to_yaml(self.cfg))  # e.g. a raised fed.rounds
            self._open_trackers()
            self.start()
        self.manifest = self._manifest()
        write_json(self.out / "manifest.json", self.manifest)
        self._write_sessions()

    def _open_trackers(self) -> None:
        self.trackers = Trackers.open(
            self.cfg.report_to, self.out, first_round=self.first_round, config=self.cfg.to_dict()
        )

    def restore(self, state: RunState) -> None:
        """Install a checkpoint: global state, client state, ledgers, history, RNG; next round after it."""
        p = self.parts
        if state.basis_fingerprint != p.method.basis_fingerprint:
            raise CheckpointError(
                f"checkpoint {self.latest} belongs to basis {state.basis_fingerprint}, "
                f"not {p.method.basis_fingerprint}"
            )
        p.method.load_state_tensors(state.global_tensors)
        self.executor.load_state_dict(state.client_tensors, state.client_meta)
        self.server.load_state_dict(state.server_tensors, state.server_meta)
        p.ledger.load_state_dict(state.ledger)
        self.bytes_done = sum(e["bytes"] for e in p.ledger.entries)
        if p.privacy is not None:
            p.privacy.load_state_dict(state.privacy)
        self.server.history = [RoundRecord(**r) for r in state.history]
        self.before = state.before
        self.earlier_sessions = _read_sessions(self.out) or list(state.sessions)
        torch.set_rng_state(torch.tensor(state.torch_rng, dtype=torch.uint8))
        (self.out / CONFIG_FILE).write_text(config_to_yaml(self.cfg))  # e.g. a raised fed.rounds
        self.completed = state.round
        self.echo(f"resuming after round {state.round} from {self.latest}")

    def start(self) -> None:
        """Round 0: evaluate the untuned model (W0) if configured, then install the global state."""
        method = self.parts.method
        if self.cfg.eval.initial:
            self.parts.adapted.set_state(method.untuned_state())  # the model computes exactly W0
            self.before = self.evaluate(0)
            b = self.before
            self.echo(f"untuned accuracy: {100 * b['accuracy']:.1f}% ({b['correct']}/{b['total']})")
            self.trackers.log(RoundMetrics(round=0, rounds=self.cfg.fed.rounds, eval=flat_eval(b)))
        method.install_global()

    def evaluate(self, _round: int) -> dict[str, Any]:
        """The global model on the evaluation split (the method installed it)."""
        from fedsb.eval.evaluate import Scoring, evaluate_task

        cfg, p = self.cfg, self.parts
        assert p.data is not None
        res = evaluate_task(
            p.adapted.model, p.tokenizer, p.task, p.data.test, Scoring.from_config(cfg, progress=self.bars)
        )
        return res.to_dict()

    # ---- rounds -----------------------------------------------------------------------------------------
    def train(self, *, stop_after_round: int | None = None) -> bool:
        """The remaining rounds, a checkpoint and a log line after each; False if stopped early as asked
        (`stop_after_round`); a signal (`self.stop`) stops it after a checkpoint with `RunStopped`."""
        cfg = self.cfg
        if self.completed >= cfg.fed.rounds:
            self.echo(f"all {cfg.fed.rounds} rounds are already done")
            return True
        clock = RoundClock(self.completed + 1, cfg.fed.rounds)
        self.training = True
        say = _tqdm_write if self.bars else self.echo  # a line between the bars, not through them

        def after_round(record: RoundRecord) -> None:
            metrics = self.save_checkpoint(record)
            say(round_line(metrics, elapsed=time.perf_counter() - self.t_start, eta=clock.eta(record.round)))
            if record.round < cfg.fed.rounds and (
                self.stop.requested or (stop_after_round is not None and stop_after_round <= record.round)
            ):
                raise _StopRequested(record.round)

        try:
            run_rounds(
                self.server,
                self.executor,
                start_round=self.completed + 1,
                rounds=cfg.fed.rounds,
                evaluate=self.evaluate,
                eval_every=cfg.eval.every,
                on_round_end=after_round,
                progress=self.bars,
            )
        except _StopRequested as stop:
            if self.stop.requested:
                raise self._stopped(self.stop.requested) from None
            self.echo(f"stopped after round {stop.round} as requested; continue with: {self._resume_hint()}")
            return False
        return True

    def save_checkpoint(self, record: RoundRecord) -> RoundMetrics:
        """Close round `record.round` (its privacy spend), log it to the trackers, write its checkpoint and
        the results so far; return its released figures."""
        p = self.parts
        if p.privacy is not None:
            record.privacy = p.privacy.end_round(record.round)
        metrics = round_metrics(
            record,
            rounds=self.cfg.fed.rounds,
            ledger=p.ledger,
            release=self.cfg.privacy.mechanism.release,
            bytes_before=self.bytes_done,
        )
        self.bytes_done = metrics.bytes_total
        self.trackers.log(metrics)  # before the checkpoint: a round repeated after a crash replaces its log
        self.state(record.round).save(self.ckpt_root, keep=self.cfg.fed.keep_checkpoints)
        self.completed = record.round
        write_json(self.out / "results.json", self.results())
        self._write_sessions()
        return metrics

    def state(self, round: int) -> RunState:
        """What a checkpoint after round `round` holds."""
        p = self.parts
        client_tensors, client_meta = self.executor.state_dict()
        server_tensors, server_meta = self.server.state_dict()
        return RunState(
            round=round,
            basis_fingerprint=p.method.basis_fingerprint,
            global_tensors=p.method.state_tensors(),
            client_tensors=client_tensors,
            client_meta=client_meta,
            history=[r.to_dict() for r in self.server.history],
            ledger=p.ledger.state_dict(),
            sampler=p.sampler.state_dict(),
            before=self.before,
            torch_rng=torch.get_rng_state().tolist(),
            privacy=p.privacy.state_dict() if p.privacy is not None else None,
            placement=placement_record(self.cfg, p.placement),
            server_tensors=server_tensors,
            server_meta=server_meta,
            sessions=self.sessions(round),
        )

    def sessions(self, through: int | None = None) -> list[dict[str, Any]]:
        """Wall time of every session of this run (the earlier ones up to their exit, as sessions.json
        recorded them; up to their last checkpoint for a run without that file); this one has trained
        rounds `first..through` (default: through the last checkpoint)."""
        last, first = self.completed if through is None else through, max(self.first_round, 1)
        now = {
            "started": self.started,
            "seconds": time.perf_counter() - self.t_start,
            "rounds": [first, last] if last >= first else [],
        }
        return [*self.earlier_sessions, now]

    def _write_sessions(self) -> None:
        """sessions.json: every session's time so far, this one's up to now (kept past the last checkpoint,
        which holds the sessions only up to itself; a resume reads this file first)."""
        if self.timed and self.out.is_dir():
            write_json(self.out / SESSIONS_FILE, self.sessions())

    # ---- stops ------------------------------------------------------------------------------------------
    def _resume_hint(self) -> str:
        return self.resume_command.format(dir=Path(os.path.abspath(self.out)))

    def _stop_if_requested(self) -> None:
        if self.stop.requested:
            raise self._stopped(self.stop.requested)

    def _stopped(self, signum: int, *, at_once: bool = False) -> RunStopped:
        """The stop by `signum` and how to continue: resume from the last checkpoint, or start over."""
        name = signal_name(signum)
        if not (self.out / CONFIG_FILE).is_file():
            return RunStopped(signum, f"stopped by {name} before anything was written; run the command again")
        if at_once:
            where = f"during round {self.completed + 1}" if self.training else "during the setup"
        else:
            where = f"after round {self.completed}'s checkpoint" if self.completed else "before round 1"
        if self.completed == 0:
            last = "no checkpoint yet: it starts at round 1" + (
                ", reusing the saved basis" if _basis_saved(self.out) else ""
            )
        else:
            last = f"the last checkpoint is round {self.completed} of {self.cfg.fed.rounds}"
        return RunStopped(signum, f"stopped by {name} {where} ({last}); continue with: {self._resume_hint()}")

    def _unwritable(self, exc: OSError) -> FedsbError:
        """A write the OS refused mid-run: one error naming the file, the reason and how to continue."""
        resumable = (self.out / CONFIG_FILE).is_file()
        return FedsbError(
            field="output_dir",
            value=str(self.out),
            what=f"cannot be written ({exc.strerror or exc}: {exc.filename or 'a file in it'})",
            fix="free space or fix its permissions, then "
            + (f"continue with: {self._resume_hint()}" if resumable else "run the command again"),
        )

    # ---- finish -----------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Export the final model, write results, manifest and learning curve, print the table."""
        from fedsb.results import final_table, plot_learning_curve
        from fedsb.trained import export_final

        p = self.parts
        p.method.install_global()
        if self.cfg.export:
            self.export = export_final(p.method, p.loaded, p.tokenizer, self.out, rounds=self.completed)
        results = self.results()
        write_json(self.out / "results.json", results)
        self.manifest["finished"] = datetime.now().isoformat(timespec="seconds")
        if p.privacy is not None:
            self.manifest["privacy"] = results["privacy"]  # the epsilons actually spent
        write_json(self.out / "manifest.json", self.manifest)
        plot_learning_curve(results, self.out / "learning_curve.png")
        self.trackers.close(final_scalars(results), finished=True)
        self.echo(final_table(results))
        return results

    def results(self) -> dict[str, Any]:
        """The results so far (what results.json holds)."""
        p = self.parts
        assert p.data is not None
        hist = [r.to_dict() for r in self.server.history]
        evals = [r["eval"] for r in hist if r.get("eval")]
        ledger = p.ledger
        out: dict[str, Any] = {
            "method": self.cfg.fed.method,
            "exact": p.method.exact,
            "task": self.cfg.data.task,
            "model": self.cfg.model.name,
            "num_clients": len(p.data.clients),
            "output_dir": str(self.out),
            "before": self.before,
            "init": p.init_info,
            "basis_fingerprint": p.method.basis_fingerprint,
            "trainable_params": p.adapted.num_trainable(),
            "device": p.placement.describe(),
            "rounds": hist,
            "rounds_completed": self.completed,
            "final": evals[-1] if evals else None,
            "ledger": {**ledger.summary(), "schemas": ledger.schemas, "entries": ledger.entries},
            "timing": _timing(hist, self.sessions(), private=self.server.release.private),
        }
        if p.privacy is not None:
            out["privacy"] = p.privacy.summary()
        if self.export is not None:
            out["export"] = self.export
        return out

    def _manifest(self) -> dict[str, Any]:
        from fedsb.results import git_state, package_versions, system_info

        cfg, p = self.cfg, self.parts
        assert p.data is not None
        adapted = p.adapted
        return {
            "command": self.command,
            "started": datetime.now().isoformat(timespec="seconds"),
            "packages": package_versions(),
            "git": git_state(),
            "system": system_info(),
            "device": p.placement.describe(),
            "seeds": {
                "seed": cfg.seed,
                "sampling": derive_seed(cfg.seed, "sampling"),
                "partition": derive_seed(cfg.seed, "partition") % (2**32),
                "init": derive_seed(cfg.seed, "init"),
                "basis": derive_seed(cfg.seed, "basis"),
            },
            "method": cfg.fed.method,
            "basis_fingerprint": p.method.basis_fingerprint,
            "model": {"name": p.loaded.name, "source": p.loaded.source, "model_type": p.loaded.model_type},
            "adapter": {
                "modules": len(adapted.layers),
                "ranks": sorted({layer.rank for layer in adapted.layers.values()}),
                "trainable": adapted.num_trainable(),
            },
            "init": p.init_info,
            "federated_init": p.init_info["federated"],
            "partition": self.server.release.partition(p.data.partition_stats),
            "resumed": self.resume is not None,
            "privacy": p.privacy.summary() if p.privacy else {"mode": "none"},
        }


class _StopRequested(Exception):
    """Raised from the round loop's callback to leave it after round `round`'s checkpoint."""

    def __init__(self, round: int) -> None:
        self.round = round


def _timing(
    history: list[dict[str, Any]], sessions: list[dict[str, Any]], *, private: bool = False
) -> dict[str, Any]:
    """Wall-time split: local training (forward/backward/step), evaluation, and round-loop overhead;
    `total_seconds` over every session of the run (a resumed run adds its earlier sessions, each counted
    up to its exit: sessions.json), `session_seconds` this one's.

    Under DP the rounds hold no client or total times (`ReleaseRules.round_seconds`): the split is withheld.
    """
    total = {
        "total_seconds": sum(s["seconds"] for s in sessions),
        "session_seconds": sessions[-1]["seconds"],
        "sessions": sessions,
    }
    if private:
        return {
            **total,
            "rounds_seconds": None,
            "local_training_seconds": None,
            "eval_seconds": sum(r["seconds"].get("eval", 0.0) for r in history),
            "round_overhead_seconds": None,
            "round_overhead_fraction": None,
            "withheld": WITHHELD_TIMING,
            "peak_rss_mib": peak_rss_mib(),
        }
    clients = sum(r["seconds"].get("clients", 0.0) for r in history)
    evals = sum(r["seconds"].get("eval", 0.0) for r in history)
    rounds_total = sum(
        r["seconds"].get("total", 0.0) + r["seconds"].get("eval", 0.0) + r["seconds"].get("checkpoint", 0.0)
        for r in history
    )
    overhead = rounds_total - clients - evals
    return {
        **total,
        "rounds_seconds": rounds_total,
        "local_training_seconds": clients,
        "eval_seconds": evals,
        "round_overhead_seconds": overhead,
        "round_overhead_fraction": overhead / rounds_total if rounds_total > 0 else 0.0,
        "peak_rss_mib": peak_rss_mib(),
    }


def final_scalars(results: dict[str, Any]) -> dict[str, float]:
    """What the trackers keep as the run's summary: final evaluation, bytes, time, epsilon."""
    out = {f"final/{k}": v for k, v in flat_eval(results.get("final")).items()}
    out["final/bytes_rounds"] = results["ledger"]["totals"]["bytes_rounds"]
    out["final/total_seconds"] = results["timing"]["total_seconds"]
    if "privacy" in results:
        out["final/max_epsilon"] = results["privacy"]["max_epsilon"]
    return out


def _read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    """The sessions a run's sessions.json lists ([] if absent or unreadable: the checkpoint's are used)."""
    import json

    try:
        sessions = json.loads((run_dir / SESSIONS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return sessions if isinstance(sessions, list) else []


def _basis_saved(run_dir: Path) -> bool:
    """A complete saved basis (basis.json is written last) that a restarted run can reuse."""
    from fedsb.init.basis import BASIS_META

    return (run_dir / "basis" / BASIS_META).is_file()


def _tqdm_write(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text)


def peak_rss_mib() -> float | None:
    """This process's resident-memory high-water mark in MiB (the whole process, so one run per process
    measures one run: `fedsb compare --isolate`); None where the platform has no `resource` module."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
