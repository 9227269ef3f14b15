"""The Flower ServerApp: `fedsb.run.run_job` with the Flower executor in place of the simulator.

Everything server-side (model, basis, sampling, validation, aggregation, ledger, evaluation, checkpoints,
export) is `run_job`'s; the Grid only carries messages. Run config keys: see `fedsb.flower.protocol`.
Besides the usual results the output directory gets `flower_wire.json`: Flower's own byte count of every
ArrayRecord sent or received, to check against the ledger.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsb.flower.protocol import AppSettings

log = logging.getLogger("fedsb.flower.server")

app = ServerApp()

WIRE_FILE = "flower_wire.json"


def run_flower_job(grid: Grid, settings: AppSettings) -> dict[str, Any]:
    """Resolve the config, refuse unsupported settings, and run the job over `grid`."""
    from fedsb.config import config_to_yaml, resolve_config
    from fedsb.flower.client import check_flower_config
    from fedsb.flower.executor import FlowerExecutor
    from fedsb.run import run_job

    cfg = resolve_config(settings.config or None, settings.override_list())
    if settings.output_dir:
        cfg.output_dir = settings.output_dir
    cfg.progress = False
    check_flower_config(cfg)
    executors: list[FlowerExecutor] = []

    def make_executor(method: Any, data: Any) -> FlowerExecutor:
        ex = FlowerExecutor(
            grid,
            list(data.clients),
            config_yaml=config_to_yaml(cfg),
            setup=method.setup_payload(),
            fingerprint=method.basis_fingerprint,
            round_timeout=settings.round_timeout,
            straggler_timeout=settings.straggler_timeout,
            connect_timeout=settings.connect_timeout,
        )
        ex.connect()
        executors.append(ex)
        return ex

    results = run_job(cfg, make_executor=make_executor, command=["flower-serverapp"])
    if executors:
        wire = executors[0].wire
        (Path(results["output_dir"]) / WIRE_FILE).write_text(json.dumps(wire, indent=1))
        results["flower_wire"] = wire
    return results


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = AppSettings.from_run_config(context.run_config)
    if settings.secagg:
        from fedsb.flower.secagg import run_secagg_job

        overrides = settings.override_list()
        if settings.output_dir:
            overrides.append(f"output_dir={settings.output_dir}")
        run_secagg_job(grid, context, settings.config or None, overrides)
    else:
        run_flower_job(grid, settings)
