"""The Flower ServerApp: `fedsb.run.run_job` with the Flower executor in place of the simulator.

Everything server-side (model, basis, sampling, validation, aggregation, ledger, evaluation, checkpoints,
resume, export) is `run_job`'s; the Grid only carries messages, plainly or through SecAgg+ (`secagg =
true`). Run config keys: see `fedsb.flower.protocol`; `resume = "<run dir>"` continues a run.
Besides the usual results the output directory gets `flower_wire.json`: Flower's own byte count of every
ArrayRecord sent or received, to check against the ledger.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsb.flower.protocol import AppSettings

log = logging.getLogger("fedsb.flower.server")

app = ServerApp()

WIRE_FILE = "flower_wire.json"


def run_flower_job(
    grid: Grid,
    settings: AppSettings,
    context: Context | None = None,
    *,
    secagg: Any = None,
    stop_after_round: int | None = None,
) -> dict[str, Any]:
    """Resolve the config (or a run to resume), refuse unsupported settings, and run the job over `grid`.

    With `settings.secagg` the rounds are securely aggregated (`fedsb.flower.secagg.SecAggExecutor`, with
    the SecAgg+ parameters `secagg`, default `SecAggSettings()`; it needs the ServerApp's `context`).
    """
    from fedsb.config import resolve_config
    from fedsb.flower.client import check_flower_config
    from fedsb.run import resolve_resume_config, run_job

    resume = Path(settings.resume) if settings.resume else None
    if resume is not None:
        cfg = resolve_resume_config(resume, settings.override_list())
    else:
        cfg = resolve_config(settings.config or None, settings.override_list())
        if settings.output_dir:
            cfg.output_dir = settings.output_dir
    cfg.progress = False
    check_flower_config(cfg, resuming=resume is not None)
    if settings.secagg:
        from fedsb.flower.secagg import check_secagg_config

        check_secagg_config(cfg)
    executors: list[Any] = []
    made_parties: list[Any] = []  # the federated init's transport, if the job's setup used one

    def init_parties(client_ids: list[str], clients: list[Any]) -> Any:
        """init.source=federated: the init's clients over the Grid (`fedsb.flower.init_parties`)."""
        from fedsb.config import config_to_yaml
        from fedsb.flower.init_parties import FlowerInitParties, connect_for_init

        ex = connect_for_init(grid, client_ids, config_to_yaml(cfg), settings)
        parties = FlowerInitParties(ex, clients, timeout=settings.round_timeout)
        made_parties.append(parties)
        return parties

    def make_executor(parts: Any) -> Any:
        ex = connected_executor(grid, cfg, parts, settings, context, secagg)
        for parties in made_parties:  # the init's messages come first on Flower's own byte count
            ex.wire[:0] = parties.wire
        executors.append(ex)
        return ex

    results = run_job(
        cfg,
        resume=resume,
        make_executor=make_executor,
        command=["flower-serverapp"],
        stop_after_round=stop_after_round,
        init_parties=init_parties,
        resume_command="flwr run ... --run-config 'resume=\"{dir}\"'",  # the app's `resume` key
    )
    if executors:
        wire = executors[0].wire
        (Path(results["output_dir"]) / WIRE_FILE).write_text(json.dumps(wire, indent=1))
        results["flower_wire"] = wire
    return results


def connected_executor(
    grid: Grid, cfg: Any, parts: Any, settings: AppSettings, context: Context | None, secagg: Any
) -> Any:
    """The run's executor over `grid` (plain or SecAgg+), built from the job's server components and
    connected: every SuperNode has its setup. Under DP-SGD it charges the server's privacy ledger."""
    from fedsb.config import config_to_yaml
    from fedsb.flower.executor import FlowerExecutor

    method, data = parts.method, parts.data
    flower = {
        "config_yaml": config_to_yaml(cfg),
        "setup": method.setup_payload(),
        "fingerprint": method.basis_fingerprint,
        "round_timeout": settings.round_timeout,
        "straggler_timeout": settings.straggler_timeout,
        "connect_timeout": settings.connect_timeout,
    }
    if settings.secagg:
        from fedsb.flower.secagg import SecAggExecutor

        if context is None:
            raise ValueError("SecAgg+ rounds need the ServerApp's Context")
        ex: Any = SecAggExecutor(grid, context, list(data.clients), settings=secagg, **flower)
    else:
        from fedsb.flower.dp import round_steps

        dp_steps = {cid: round_steps(cfg, n) for cid, n in data.client_sizes.items()}
        ex = FlowerExecutor(grid, list(data.clients), privacy=parts.privacy, dp_steps=dp_steps, **flower)
    ex.connect()
    return ex


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the job; a user error is printed as one `fedsb: error: ...` line (what `flwr log` and
    `fedsb.flower.deploy` show) and re-raised, so Flower records the run as failed."""
    from fedsb.errors import CheckpointError, FedsbError
    from fedsb.fed.rounds import RoundFailed

    try:
        run_flower_job(grid, AppSettings.from_run_config(context.run_config), context)
    except (FedsbError, CheckpointError, RoundFailed) as exc:
        print(f"fedsb: error: {exc}", file=sys.stderr, flush=True)
        raise
