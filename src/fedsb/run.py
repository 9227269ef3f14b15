"""A run and its stages: setup -> restore from a checkpoint (or evaluate the untuned model) -> rounds, a
checkpoint after each -> finish (export, results, manifest, plot, table).

`run_job` is what `fedsb run` calls. Every stage writes into one results directory: config.yaml,
manifest.json, results.json, learning_curve.png, basis/ (Fed-SB), checkpoints/, adapter/, and the final
export (peft/ where lossless, merged/ for methods that fold updates into W0). The parts of the job come
from the recipe (`fedsb.job.build_components`); the rounds from the one round loop (`fedsb.fed.rounds`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedsb.config import RunConfig, config_to_yaml, load_yaml
from fedsb.device import Placement
from fedsb.errors import CheckpointError, ConfigError
from fedsb.fed.checkpoint import RunState, latest_checkpoint
from fedsb.fed.rounds import RoundRecord, Server, run_rounds
from fedsb.fed.server_opt import build_server_optimizer
from fedsb.job import CONFIG_FILE, Components, build_components, configure_torch, placement_of
from fedsb.paths import make_output_dir
from fedsb.results import write_json
from fedsb.seeding import derive_seed

log = logging.getLogger("fedsb.run")

MakeExecutor = Callable[[Any, Any], Any]


def default_output_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


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
) -> dict[str, Any]:
    """Run (or resume) a federated fine-tuning job and return the results dict (also in results.json).

    `make_executor(method, data)` replaces the in-process simulator with another `ClientExecutor` (the
    Flower app's); it must also offer `state_dict()` / `load_state_dict()` for checkpoints.
    """
    run = Run(cfg, resume=resume, echo=echo, command=command, make_executor=make_executor).setup()
    run.begin()
    if run.train(stop_after_round=stop_after_round):
        return run.finish()
    return run.results()


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
    ) -> None:
        self.cfg = cfg
        self.resume = Path(resume) if resume else None
        self.echo = echo
        self.command = command or sys.argv
        self.make_executor = make_executor
        self.out = self.resume or (Path(cfg.output_dir) if cfg.output_dir else default_output_dir())
        self.ckpt_root = self.out / "checkpoints"
        self.t_start = time.perf_counter()
        self.saved: RunState | None = None  # the checkpoint a resumed run continues from
        self.latest: Path | None = None  # where it was read
        self.before: dict[str, Any] | None = None  # the untuned model's evaluation
        self.completed = 0  # the last round whose checkpoint is written
        self.export: dict[str, Any] | None = None
        self.manifest: dict[str, Any] = {}

    # ---- setup -------------------------------------------------------------------------------------------
    def setup(self) -> Run:
        """Check the directory (and, resuming, the checkpoint), write config.yaml, build the components."""
        configure_torch(self.cfg)
        placement = placement_of(self.cfg)  # a device this machine lacks is refused before any write
        if self.resume:
            self.saved = self._read_checkpoint(placement_record(self.cfg, placement))
        elif self.ckpt_root.exists() and any(self.ckpt_root.iterdir()):
            raise ConfigError(
                field="output_dir",
                value=str(self.out),
                what="already holds a run",
                fix=f"use --resume {self.out} or another output_dir",
            )
        make_output_dir(self.out)
        if not self.resume:  # a resumed run rewrites its config only once its checkpoint has loaded
            (self.out / CONFIG_FILE).write_text(config_to_yaml(self.cfg))
        self.echo(f"fedsb: {self.cfg.fed.method} run, results in {self.out}")
        self.parts = build_components(
            self.cfg,
            role="server",
            setup_dir=self.out,
            resume=bool(self.resume),
            placement=placement,
            echo=self.echo,
        )
        self.server = self._server(self.parts)
        self.executor = (
            self.make_executor(self.parts.method, self.parts.data)
            if self.make_executor is not None
            else self.parts.simulator()
        )
        return self

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
            aggregator=privacy.client_level_aggregator if privacy and privacy.mode == "client" else None,
            declared_sizes=privacy.client_sizes if privacy else None,
            server_optimizer=build_server_optimizer(cfg.fed, parts.method.state),
        )

    def _read_checkpoint(self, precision: dict[str, Any]) -> RunState:
        """The latest checkpoint, refused before anything is written if this run cannot continue it."""
        latest = latest_checkpoint(self.ckpt_root)
        if latest is None:
            raise CheckpointError(f"{self.ckpt_root} holds no checkpoint to resume from")
        state = RunState.load(latest)
        check_placement(state, precision, latest)
        self.latest = latest
        return state

    # ---- restore from a checkpoint, or start --------------------------------------------------------------
    def begin(self) -> None:
        """Continue from the checkpoint (resuming) or evaluate the untuned model; write the manifest."""
        if self.saved is not None:
            self.restore(self.saved)
        else:
            self.start()
        self.manifest = self._manifest()
        write_json(self.out / "manifest.json", self.manifest)

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
        if p.privacy is not None:
            p.privacy.load_state_dict(state.privacy)
        self.server.history = [RoundRecord(**r) for r in state.history]
        self.before = state.before
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
        method.install_global()

    def evaluate(self, _round: int) -> dict[str, Any]:
        """The global model on the evaluation split (the method installed it)."""
        from fedsb.eval.evaluate import evaluate_task

        cfg, p = self.cfg, self.parts
        assert p.data is not None
        res = evaluate_task(
            p.adapted.model,
            p.tokenizer,
            p.task,
            p.data.test,
            scorer=cfg.eval.scorer,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            max_length=cfg.data.max_length,
            normalize=cfg.eval.normalize,
            bf16=cfg.train.bf16 if cfg.eval.bf16 is None else cfg.eval.bf16,
            progress=cfg.progress,
        )
        return res.to_dict()

    # ---- rounds -----------------------------------------------------------------------------------------
    def train(self, *, stop_after_round: int | None = None) -> bool:
        """The remaining rounds, a checkpoint after each; False if stopped early (`stop_after_round`)."""
        cfg = self.cfg
        if self.completed >= cfg.fed.rounds:
            self.echo(f"all {cfg.fed.rounds} rounds are already done")
            return True

        def after_round(record: RoundRecord) -> None:
            self.save_checkpoint(record)
            if stop_after_round is not None and stop_after_round <= record.round < cfg.fed.rounds:
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
                progress=cfg.progress,
            )
        except _StopRequested as stop:
            self.echo(
                f"stopped after round {stop.round} as requested; continue with: fedsb run --resume {self.out}"
            )
            return False
        return True

    def save_checkpoint(self, record: RoundRecord) -> None:
        """Close round `record.round` (its privacy spend), write its checkpoint and the results so far."""
        p = self.parts
        if p.privacy is not None:
            record.privacy = p.privacy.end_round(record.round)
        self.state(record.round).save(self.ckpt_root, keep=self.cfg.fed.keep_checkpoints)
        self.completed = record.round
        write_json(self.out / "results.json", self.results())

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
            "init": p.data.init_info,
            "basis_fingerprint": p.method.basis_fingerprint,
            "trainable_params": p.adapted.num_trainable(),
            "device": p.placement.describe(),
            "rounds": hist,
            "rounds_completed": self.completed,
            "final": evals[-1] if evals else None,
            "ledger": {**ledger.summary(), "schemas": ledger.schemas, "entries": ledger.entries},
            "timing": _timing(hist, time.perf_counter() - self.t_start),
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
            "init": p.data.init_info,
            "federated_init": p.data.init_info["federated"],
            "partition": p.data.partition_stats,
            "resumed": self.resume is not None,
            "privacy": p.privacy.summary() if p.privacy else {"mode": "none"},
        }


# ---- what a checkpoint may be continued with -------------------------------------------------------------


def placement_record(cfg: RunConfig, placement: Placement) -> dict[str, Any]:
    """The precision a checkpoint was written under: the frozen base's dtype (and quantization, where the
    config has that setting), and the device, which is informative only (checkpoints are device-free)."""
    return {
        "device": str(placement.device),
        "model_dtype": placement.dtype_name,
        "quantize": getattr(cfg.model, "quantize", "none"),
    }


def check_placement(state: RunState, current: dict[str, Any], where: Path) -> None:
    """Refuse to continue a checkpoint under another frozen-base precision (it would change W0 mid-run).

    A different device is fine: checkpoints hold CPU tensors and every random draw is seeded per round.
    Checkpoints older than this record carry none and are accepted as they are.
    """
    saved = state.placement
    if not saved:
        return
    for key, field in (("model_dtype", "model.dtype"), ("quantize", "model.quantize")):
        if saved.get(key, current[key]) != current[key]:
            raise ConfigError(
                field=field,
                value=current[key],
                what=f"differs from the {saved[key]} base that wrote checkpoint {where} (on {saved['device']}); "
                "continuing would train the remaining rounds on a different frozen W0",
                fix=f"resume with {field}={saved[key]} (it runs on any device), or start a new run",
            )


class _StopRequested(Exception):
    def __init__(self, round: int) -> None:
        self.round = round


def _timing(history: list[dict[str, Any]], total: float) -> dict[str, Any]:
    """Wall-time split: local training (forward/backward/step), evaluation, and round-loop overhead."""
    clients = sum(r["seconds"].get("clients", 0.0) for r in history)
    evals = sum(r["seconds"].get("eval", 0.0) for r in history)
    rounds_total = sum(
        r["seconds"].get("total", 0.0) + r["seconds"].get("eval", 0.0) + r["seconds"].get("checkpoint", 0.0)
        for r in history
    )
    overhead = rounds_total - clients - evals
    return {
        "total_seconds": total,
        "rounds_seconds": rounds_total,
        "local_training_seconds": clients,
        "eval_seconds": evals,
        "round_overhead_seconds": overhead,
        "round_overhead_fraction": overhead / rounds_total if rounds_total > 0 else 0.0,
        "peak_rss_mib": peak_rss_mib(),
    }


def peak_rss_mib() -> float | None:
    """This process's resident-memory high-water mark in MiB (the whole process, so one run per process
    measures one run: `fedsb compare --isolate`); None where the platform has no `resource` module."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
