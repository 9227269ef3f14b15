"""SecAgg+ rounds for FedAvg-style methods: the server learns only the weighted mean of the updates.

Fed-SB's aggregate sum_i p_i R_i is linear, so Flower's SecAgg+ protocol (legacy workflow only in 1.42:
`SecAggPlusWorkflow` + `secaggplus_mod`) can compute it without the server seeing any R_i. Each client
scales its R_i by its quantized weight N_i / max_weight, clips to +-clipping_range, quantizes to
quantization_range levels and masks; the server unmasks the sum and divides by the total weight. The
result equals plain averaging up to that quantization (about 2 clipping_range / quantization_range per
client and entry, divided by the total weight ratio).

What changes against the plain app: no per-client validation (the server never sees an update; only the
aggregate's shape and finiteness are checked), no per-client ledger lines for uploads (the masked vectors
are integer vectors carried in ConfigRecords), and the download travels as float32 legacy Parameters.
Setup (config, basis, fingerprint) and local training are the plain app's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedsb.flower.client_app import runtime

SECAGG_STATE = "secagg_global_state.safetensors"  # the final global trainable state
SECAGG_ROUNDS = "secagg_rounds.json"

# ---- client side (reached through `fedsb.flower.client_app.secagg_router`) ---------------------------------


def secagg_train(msg: Message, context: Context) -> Message:
    """SecAgg+'s 'collect masked vectors' stage calls this: train, reply with a legacy FitRes to be masked."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config["keys"]).split(",")
    upload = str(fitins.config["upload"]).split(",")  # FedSVD downloads A and B, uploads B
    arrays = parameters_to_ndarrays(fitins.parameters)
    rt = runtime(context)
    update = rt.train(
        int(fitins.config["round"]),
        {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)},
    )
    params = [update.tensors[k].to(torch.float32).numpy() for k in upload]
    weight = update.num_examples if rt.cfg.fed.weighting == "examples" else 1
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), weight, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


# ---- server side --------------------------------------------------------------------------------------------


@dataclass
class SecAggSettings:
    """SecAgg+ parameters (Flower's names); shares and threshold as fractions of the sampled clients."""

    num_shares: float = 1.0
    reconstruction_threshold: float = 2 / 3
    max_weight: float = 1000.0  # N_i / max_weight must stay <= 1
    clipping_range: float = 8.0  # |N_i / max_weight * R_ij| must stay below this
    quantization_range: int = 2**22
    timeout: float | None = None

    def workflow(self, n: int) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(
            num_shares=n if self.num_shares >= 1 else max(2, math.ceil(self.num_shares * n)),
            reconstruction_threshold=max(2, math.ceil(self.reconstruction_threshold * n)),
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            timeout=self.timeout,
        )


class _RoundStrategy(FedAvg):
    """Legacy FedAvg over exactly the clients registered for this round; remembers who was aggregated."""

    def __init__(self, n: int, round_config: dict[str, Any]) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            on_fit_config_fn=lambda _: dict(round_config),
        )
        self.aggregated_nodes: list[int] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.aggregated_nodes = [proxy.node_id for proxy, _ in results]
        return super().aggregate_fit(server_round, results, failures)


@dataclass
class SecureRound:
    round: int
    sampled: list[str]
    aggregated: list[str] = field(default_factory=list)


def secure_mean(
    grid: Grid,
    context: Context,
    nodes: dict[str, int],
    round: int,
    download: dict[str, torch.Tensor],
    settings: SecAggSettings,
    upload_spec: dict[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, torch.Tensor], SecureRound]:
    """One SecAgg+ round over the clients in `nodes` (client id -> node id): the weighted mean of uploads
    (name -> shape `upload_spec`; default: the same tensors as the download)."""
    keys = list(download)
    spec = upload_spec if upload_spec is not None else {k: tuple(v.shape) for k, v in download.items()}
    n = len(nodes)
    strategy = _RoundStrategy(n, {"round": round, "keys": ",".join(keys), "upload": ",".join(spec)})
    manager = SimpleClientManager()
    for node in nodes.values():
        manager.register(GridClientProxy(node, grid, context.run_id))
    legacy = LegacyContext(context, strategy=strategy, client_manager=manager)
    params = ndarrays_to_parameters([download[k].to(torch.float32).numpy() for k in keys])
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, True)
    settings.workflow(n)(grid, legacy)
    by_node = {v: k for k, v in nodes.items()}
    record = SecureRound(round, list(nodes), [by_node[i] for i in strategy.aggregated_nodes])
    if not record.aggregated:
        raise RuntimeError(f"round {round}: secure aggregation halted (too few clients answered every stage)")
    out = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    )
    mean = {
        k: torch.from_numpy(np.asarray(a, dtype=np.float32)).reshape(spec[k])
        for k, a in zip(spec, out, strict=True)
    }
    bad = [k for k, t in mean.items() if not torch.isfinite(t).all()]
    if bad:
        raise RuntimeError(f"round {round}: the secure aggregate of {bad[:3]} is not finite")
    return mean, record


def run_secagg_job(
    grid: Grid,
    context: Context,
    config: str | None,
    overrides: list[str],
    settings: SecAggSettings | None = None,
) -> dict[str, Any]:
    """Server, basis and sampling as in `run_job`; each round's mean from SecAgg+. Returns R and the rounds."""
    from fedsb.config import config_to_yaml, resolve_config
    from fedsb.data.prepare import model_task, prepare_data
    from fedsb.data.tasks import get_task
    from fedsb.fed.rounds import encode
    from fedsb.fed.sampling import ClientSampler
    from fedsb.flower.client import check_flower_config
    from fedsb.flower.executor import FlowerExecutor
    from fedsb.models import load_model
    from fedsb.run import build_method, configure_torch, default_output_dir
    from fedsb.seeding import derive_seed

    settings = settings or SecAggSettings()
    cfg = resolve_config(config, overrides)
    check_flower_config(cfg)
    if cfg.privacy.mode != "none":
        from fedsb.errors import ConfigError

        raise ConfigError(
            field="privacy.mode",
            value=cfg.privacy.mode,
            what="is not supported with SecAgg+ here (the server never sees single updates to clip)",
            fix="set privacy.mode=none, or run without secagg",
        )
    configure_torch(cfg)
    out = Path(cfg.output_dir) if cfg.output_dir else default_output_dir()
    task = get_task(cfg.data.task, **cfg.data.options)
    loaded = load_model(
        cfg.model.name,
        dtype=cfg.model.dtype,
        seed=derive_seed(cfg.seed, "model") % (2**32),
        **model_task(task),
    )
    data = prepare_data(cfg, task, loaded.tokenizer)
    method = build_method(cfg, loaded.model, task, loaded.tokenizer, data, out, resume=False)
    setup_ex = FlowerExecutor(
        grid,
        list(data.clients),
        config_yaml=config_to_yaml(cfg),
        setup=method.setup_payload(),
        fingerprint=method.basis_fingerprint,
    )
    nodes = setup_ex.connect()
    sampler = ClientSampler(
        list(data.clients), cfg.fed.clients_per_round, seed=derive_seed(cfg.seed, "sampling")
    )
    rounds = []
    for t in range(1, cfg.fed.rounds + 1):
        sampled = sampler.sample(t)
        download = encode(method.download(), torch.float32)
        mean, record = secure_mean(
            grid, context, {c: nodes[c] for c in sampled}, t, download, settings, method.upload_spec()
        )
        if len(record.aggregated) < cfg.fed.min_clients:
            raise RuntimeError(
                f"round {t}: {len(record.aggregated)} client(s) in the secure aggregate, "
                f"fed.min_clients={cfg.fed.min_clients}"
            )
        method.apply(mean, t)
        rounds.append(record)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in method.state.items()}, str(out / SECAGG_STATE))
    summary = [{"round": r.round, "sampled": r.sampled, "aggregated": r.aggregated} for r in rounds]
    (out / SECAGG_ROUNDS).write_text(json.dumps({"fingerprint": method.basis_fingerprint, "rounds": summary}))
    return {"state": {k: v.clone() for k, v in method.state.items()}, "rounds": rounds, "method": method}
