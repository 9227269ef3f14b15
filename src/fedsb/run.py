"""The main job: config -> model -> init -> clients -> rounds -> evaluate -> export, with resume.

`run_job` is what `fedsb run` calls. Every stage writes into one results directory: config.yaml,
manifest.json, results.json, learning_curve.png, basis/ (Fed-SB), checkpoints/, adapter/, and the final
export (peft/ where lossless, merged/ for methods that fold updates into W0).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedsb.config import RunConfig, config_to_yaml, load_yaml
from fedsb.data.prepare import PreparedData, loader_factory, model_task, prepare_data
from fedsb.errors import CheckpointError, ConfigError
from fedsb.seeding import derive_seed
from fedsb.train.local import loss_for

log = logging.getLogger("fedsb.run")

CONFIG_FILE = "config.yaml"


def default_output_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def configure_torch(cfg: RunConfig) -> None:
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_method(
    cfg: RunConfig,
    model: torch.nn.Module,
    task: Any,
    tokenizer: Any,
    data: PreparedData | None,
    out: Path,
    *,
    resume: bool,
) -> Any:
    """Create the configured method on `model` (Fed-SB computes or loads its basis here)."""
    from fedsb.fed.base import SetupContext, get_method_class

    init_batches = None
    if data is not None:
        make_loader = loader_factory(cfg, task, tokenizer, cfg.init.batch_size)(data.init_data)

        def init_batches() -> Any:
            return make_loader(derive_seed(cfg.seed, "init"))

    ctx = SetupContext(
        cfg=cfg,
        init_batches=init_batches,
        num_samples=data.init_info["num_samples"] if data else None,
        loss_fn=loss_for(task),
        setup_dir=out,
        resume=resume,
        info=data.init_info if data else {},
    )
    return get_method_class(cfg.fed.method).create(model, ctx)


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
    make_executor: Callable[[Any, Any], Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a federated fine-tuning job and return the results dict (also in results.json).

    `make_executor(method, data)` replaces the in-process simulator with another `ClientExecutor` (the
    Flower app's); it must also offer `state_dict()` / `load_state_dict()` for checkpoints.
    """
    from fedsb.eval.evaluate import evaluate_task
    from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from fedsb.fed.ledger import Ledger
    from fedsb.fed.rounds import RoundRecord, Server, run_rounds
    from fedsb.fed.sampling import ClientSampler
    from fedsb.fed.simulate import InProcessExecutor
    from fedsb.models import load_model
    from fedsb.results import (
        final_table,
        git_state,
        package_versions,
        plot_learning_curve,
        system_info,
        write_json,
    )
    from fedsb.trained import export_final

    t_start = time.perf_counter()
    configure_torch(cfg)
    out = Path(resume) if resume else Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    if not resume and ckpt_root.exists() and any(ckpt_root.iterdir()):
        raise ConfigError(
            field="output_dir",
            value=str(out),
            what="already holds a run",
            fix=f"use --resume {out} or another output_dir",
        )
    if not resume:  # a resumed run rewrites its config only once its checkpoint has loaded
        (out / CONFIG_FILE).write_text(config_to_yaml(cfg))
    echo(f"fedsb: {cfg.fed.method} run, results in {out}")

    # ---- model, data, method (Fed-SB: the server's one-time basis) --------------------------------------
    from fedsb.data.tasks import get_task

    task = get_task(cfg.data.task, **cfg.data.options)
    loaded = load_model(
        cfg.model.name,
        dtype=cfg.model.dtype,
        seed=derive_seed(cfg.seed, "model") % (2**32),
        **model_task(task),
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    data = prepare_data(cfg, task, tokenizer)
    echo(
        f"clients: {len(data.clients)} with sizes {list(data.client_sizes.values())}; evaluation examples: {len(data.test)}"
    )
    method = build_method(cfg, model, task, tokenizer, data, out, resume=bool(resume))
    adapted = method.adapted
    if method.basis_fingerprint:
        echo(
            f"basis: {data.init_info.get('method', cfg.init.method)} from {data.init_info['num_samples']} "
            f"{cfg.init.source} examples, "
            f"eta={data.init_info.get('eta')}, fingerprint {method.basis_fingerprint[:12]}"
        )

    # ---- ledger one-time lines, server, executor ------------------------------------------------------------
    ledger = Ledger(wire_dtype=cfg.fed.wire_dtype)
    setup = method.setup_payload()
    if setup:
        ledger.record_one_time(
            item="basis broadcast (B, A per layer, fp32, with fingerprint)",
            direction="down",
            clients=len(data.clients),
            tensors=setup,
            note="once per client; not part of the per-round figures",
        )
        ledger.record_one_time(
            item=f"initialization data ({cfg.init.source})",
            direction="none" if data.init_info["federated"] else "up",
            clients=0 if data.init_info["federated"] else len(data.clients),
            note=data.init_info["note"] + f"; {data.init_info['num_samples']} examples",
        )
    privacy = plan_privacy(cfg, data, echo) if cfg.privacy.enabled else None
    sampler = ClientSampler(
        list(data.clients), cfg.fed.clients_per_round, seed=derive_seed(cfg.seed, "sampling")
    )
    server = Server(
        method,
        sampler,
        ledger,
        wire_dtype=cfg.fed.wire_dtype,
        min_clients=cfg.fed.min_clients,
        max_update_norm=cfg.fed.max_update_norm,
        aggregator=privacy.client_level_aggregator if privacy and privacy.mode == "client" else None,
        declared_sizes=privacy.client_sizes if privacy else None,
    )
    executor = (
        make_executor(method, data)
        if make_executor is not None
        else InProcessExecutor(
            method,
            adapted,
            data.clients,
            cfg.train,
            rounds=cfg.fed.rounds,
            seed=cfg.seed,
            wire_dtype=cfg.fed.wire_dtype,
            loss_fn=loss_for(task, per_example=cfg.privacy.mode == "sample"),
            progress=cfg.progress,
            privacy=privacy if cfg.privacy.mode == "sample" else None,
            privacy_mode=cfg.privacy.mode,
        )
    )
    eval_bf16 = cfg.train.bf16 if cfg.eval.bf16 is None else cfg.eval.bf16

    def evaluate(_: int) -> dict[str, Any]:
        res = evaluate_task(
            adapted.model,
            tokenizer,
            task,
            data.test,
            scorer=cfg.eval.scorer,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            max_length=cfg.data.max_length,
            normalize=cfg.eval.normalize,
            bf16=eval_bf16,
            progress=cfg.progress,
        )
        return res.to_dict()

    # ---- resume, or evaluate the untuned model ---------------------------------------------------------------
    start_round, before = 1, None
    if resume:
        latest = latest_checkpoint(ckpt_root)
        if latest is None:
            raise CheckpointError(f"{ckpt_root} holds no checkpoint to resume from")
        rnd, tensors, state = load_checkpoint(latest)
        if state["basis_fingerprint"] != method.basis_fingerprint:
            raise CheckpointError(
                f"checkpoint {latest} belongs to basis {state['basis_fingerprint']}, not {method.basis_fingerprint}"
            )
        method.load_state_tensors(
            {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}
        )
        executor.load_state_dict(
            {k: v for k, v in tensors.items() if k.startswith("opt/")}, state["executor"]
        )
        ledger.load_state_dict(state["ledger"])
        if privacy is not None:
            privacy.load_state_dict(state["privacy"])
        server.history = [RoundRecord(**r) for r in state["history"]]
        before = state.get("before")
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        (out / CONFIG_FILE).write_text(config_to_yaml(cfg))  # e.g. a raised fed.rounds
        start_round = rnd + 1
        echo(f"resuming after round {rnd} from {latest}")
    else:
        if cfg.eval.initial:
            adapted.set_state(method.untuned_state())  # the model computes exactly W0
            before = evaluate(0)
            echo(f"untuned accuracy: {100 * before['accuracy']:.1f}% ({before['correct']}/{before['total']})")
        method.install_global()

    results: dict[str, Any] = {
        "method": cfg.fed.method,
        "exact": method.exact,
        "task": cfg.data.task,
        "model": cfg.model.name,
        "num_clients": len(data.clients),
        "output_dir": str(out),
        "before": before,
        "init": data.init_info,
        "basis_fingerprint": method.basis_fingerprint,
        "trainable_params": adapted.num_trainable(),
    }
    manifest = {
        "command": command or sys.argv,
        "started": datetime.now().isoformat(timespec="seconds"),
        "packages": package_versions(),
        "git": git_state(),
        "system": system_info(),
        "seeds": {
            "seed": cfg.seed,
            "sampling": derive_seed(cfg.seed, "sampling"),
            "partition": derive_seed(cfg.seed, "partition") % (2**32),
            "init": derive_seed(cfg.seed, "init"),
            "basis": derive_seed(cfg.seed, "basis"),
        },
        "method": cfg.fed.method,
        "basis_fingerprint": method.basis_fingerprint,
        "model": {"name": loaded.name, "source": loaded.source, "model_type": loaded.model_type},
        "adapter": {
            "modules": len(adapted.layers),
            "ranks": sorted({layer.rank for layer in adapted.layers.values()}),
            "trainable": adapted.num_trainable(),
        },
        "init": data.init_info,
        "federated_init": data.init_info["federated"],
        "partition": data.partition_stats,
        "resumed": bool(resume),
        "privacy": privacy.summary() if privacy else {"mode": "none"},
    }
    write_json(out / "manifest.json", manifest)

    def finish_results(rounds_completed: int) -> dict[str, Any]:
        hist = [r.to_dict() for r in server.history]
        evals = [r["eval"] for r in hist if r.get("eval")]
        results.update(
            rounds=hist,
            rounds_completed=rounds_completed,
            final=evals[-1] if evals else None,
            ledger={**ledger.summary(), "schemas": ledger.schemas, "entries": ledger.entries},
            timing=_timing(hist, time.perf_counter() - t_start),
        )
        if privacy is not None:
            results["privacy"] = privacy.summary()
        return results

    def on_round_end(record: RoundRecord) -> None:
        if privacy is not None:
            record.privacy = privacy.end_round(record.round)
        tensors = {f"global/{k}": v for k, v in method.state_tensors().items()}
        opt_tensors, opt_meta = executor.state_dict()
        tensors.update(opt_tensors)
        state = {
            "basis_fingerprint": method.basis_fingerprint,
            "history": [r.to_dict() for r in server.history],
            "ledger": ledger.state_dict(),
            "sampler": sampler.state_dict(),
            "executor": opt_meta,
            "before": before,
            "torch_rng": torch.get_rng_state().tolist(),
            "privacy": privacy.state_dict() if privacy is not None else None,
        }
        save_checkpoint(ckpt_root, record.round, tensors, state, keep=cfg.fed.keep_checkpoints)
        write_json(out / "results.json", finish_results(record.round))
        if (
            stop_after_round is not None
            and record.round >= stop_after_round
            and record.round < cfg.fed.rounds
        ):
            raise _StopRequested(record.round)

    last_round = start_round - 1
    if start_round <= cfg.fed.rounds:
        try:
            run_rounds(
                server,
                executor,
                start_round=start_round,
                rounds=cfg.fed.rounds,
                evaluate=evaluate,
                eval_every=cfg.eval.every,
                on_round_end=on_round_end,
                progress=cfg.progress,
            )
            last_round = cfg.fed.rounds
        except _StopRequested as stop:
            echo(f"stopped after round {stop.round} as requested; continue with: fedsb run --resume {out}")
            return finish_results(stop.round)
    else:
        echo(f"all {cfg.fed.rounds} rounds are already done")

    # ---- export and report --------------------------------------------------------------------------------------
    method.install_global()
    if cfg.export:
        results["export"] = export_final(method, loaded, tokenizer, out, rounds=last_round)
    finish_results(last_round)
    write_json(out / "results.json", results)
    manifest["finished"] = datetime.now().isoformat(timespec="seconds")
    if privacy is not None:
        manifest["privacy"] = results["privacy"]  # the epsilons actually spent
    write_json(out / "manifest.json", manifest)
    plot_learning_curve(results, out / "learning_curve.png")
    echo(final_table(results))
    return results


def plan_privacy(cfg: RunConfig, data: PreparedData, echo: Callable[[str], None]) -> Any:
    """The run's privacy ledger, with every account's noise multiplier solved for the whole training."""
    from fedsb.privacy.ledger import PrivacyLedger
    from fedsb.train.local import steps_for

    steps = {cid: steps_for(n, cfg.train) for cid, n in data.client_sizes.items()}
    ledger = PrivacyLedger.plan(cfg, data.client_sizes, steps, init_info=data.init_info)
    summary = ledger.summary()
    lo, hi = summary["noise_multiplier_range"]
    target = cfg.privacy.target_epsilon
    kind = "record-level DP-SGD in each client" if ledger.mode == "sample" else "client-level DP-FedAvg"
    echo(
        f"privacy: {kind} ({cfg.privacy.accountant}), "
        + (f"target epsilon {target:g} over all {cfg.fed.rounds} rounds, " if target else "")
        + f"sigma {lo:.3f}"
        + (f"..{hi:.3f}" if hi != lo else "")
        + f", delta <= {summary['delta']:.2e}"
    )
    if not data.init_info.get("federated", True):
        log.warning("privacy: %s", ledger.init_note)
    if ledger.reproducible_noise:
        from fedsb.privacy.noise import REPRODUCIBLE_WARNING

        log.warning("privacy: %s", REPRODUCIBLE_WARNING)
    return ledger


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
