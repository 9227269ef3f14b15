"""SecAgg+ rounds for FedAvg-style methods: the server learns only the weighted mean of the updates.

Fed-SB's aggregate sum_i p_i R_i is linear, so Flower's SecAgg+ protocol (legacy workflow only in 1.42:
`SecAggPlusWorkflow` + `secaggplus_mod`) can compute it without the server seeing any R_i. Each client
scales its R_i by its quantized weight N_i / max_weight, clips to +-clipping_range, quantizes to
quantization_range levels and masks; the server unmasks the sum and divides by the total weight. The
result equals plain averaging up to that quantization (about 2 clipping_range / quantization_range per
client and entry, divided by the total weight ratio).

It is an executor of the one run (`SecAggExecutor`): sampling, the ledger's download lines, applying the
mean, evaluation, checkpoints, resume and export are the run's. What changes against the plain app: no
per-client validation (the server never sees an update; only the aggregate's shape and finiteness are
checked), no per-client ledger lines for uploads (the masked vectors are integer vectors carried in
ConfigRecords), no per-client losses, and the download travels as float32 legacy Parameters (so
fed.wire_dtype must be float32). Setup (config, basis, fingerprint) and local training are the plain app's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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

from fedsb.flower import node_state
from fedsb.flower.executor import FlowerExecutor
from fedsb.flower.node import restored_client

# ---- client side (reached through `fedsb.flower.client_app.secagg_router`) ---------------------------------


def secagg_train(msg: Message, context: Context) -> Message:
    """SecAgg+'s 'collect masked vectors' stage calls this: train, reply with a legacy FitRes to be masked."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = str(fitins.config["keys"]).split(",")
    upload = str(fitins.config["upload"]).split(",")  # FedSVD downloads A and B, uploads B
    arrays = parameters_to_ndarrays(fitins.parameters)
    rt = restored_client(context)  # with what it kept from earlier rounds (its optimizer state)
    folds_before = rt.fold_round()
    update = rt.train(
        int(fitins.config["round"]),
        {k: torch.from_numpy(a.copy()) for k, a in zip(keys, arrays, strict=True)},
    )
    node_state.keep(rt, context, fold_round_before=folds_before)
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


def secure_mean(
    grid: Grid,
    context: Context,
    nodes: dict[str, int],
    round: int,
    download: dict[str, torch.Tensor],
    settings: SecAggSettings,
    upload_spec: dict[str, tuple[int, ...]] | None = None,
) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """One SecAgg+ round over the clients in `nodes` (client id -> node id): (the weighted mean of their
    uploads, name -> shape `upload_spec`, default the download's tensors; the clients in it); (None, [])
    when the protocol halted (too few clients answered a stage)."""
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
    aggregated = [by_node[i] for i in strategy.aggregated_nodes]
    if not aggregated:
        return None, []
    out = parameters_to_ndarrays(
        compat.arrayrecord_to_parameters(legacy.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    )
    mean = {
        k: torch.from_numpy(np.asarray(a, dtype=np.float32)).reshape(spec[k])
        for k, a in zip(spec, out, strict=True)
    }
    return mean, aggregated


class SecAggExecutor(FlowerExecutor):
    """The run's executor when rounds are securely aggregated: setup as in the plain app (config, basis,
    fingerprint once per node), then each round's weighted mean from SecAgg+ (`Server` checks its shapes
    and finiteness, applies it, checkpoints, evaluates and exports as in any run)."""

    secure_aggregation = True
    strict_setup = True  # SecAgg+ rounds go to the nodes of the first setup only (no rejoin)

    def __init__(
        self,
        grid: Grid,
        context: Context,
        client_ids: list[str],
        *,
        settings: SecAggSettings | None = None,
        **flower: Any,
    ) -> None:
        super().__init__(grid, client_ids, **flower)
        self.context = context
        self.settings = settings or SecAggSettings()

    def aggregate_round(
        self,
        round: int,
        client_ids: list[str],
        download: dict[str, torch.Tensor],
        upload_spec: dict[str, tuple[int, ...]],
    ) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
        if not self.nodes:
            self.connect()
        nodes = {c: self.nodes[c] for c in client_ids}
        return secure_mean(self.grid, self.context, nodes, round, download, self.settings, upload_spec)


def check_secagg_config(cfg: Any) -> None:
    """Refuse what SecAgg+ cannot honour: the server never sees a single update, and the masked vectors
    are float32 legacy parameters."""
    from fedsb.errors import ConfigError
    from fedsb.fed import registry

    if not registry.card(cfg.fed.method).mean_aggregate:
        raise ConfigError(
            field="fed.method",
            value=cfg.fed.method,
            what="does not apply with SecAgg+: its aggregate is not a weighted mean of the sent tensors, and "
            "SecAgg+ computes only that mean",
            fix=f"use fed.method {', '.join(registry.names_where(lambda c: c.mean_aggregate))}, or run without secagg",
        )
    if cfg.init.source == "federated":
        raise ConfigError(
            field="init.source",
            value="federated",
            what="is not securely aggregated here: the init's releases would reach the server one by one, "
            "outside SecAgg+",
            fix="use init.source=server (or pooled) with secagg, or run the federated init without secagg",
        )
    if cfg.privacy.enabled:
        raise ConfigError(
            field="privacy.mode",
            value=cfg.privacy.mode,
            what="is not supported with SecAgg+ here (the server never sees single updates to clip)",
            fix="set privacy.mode=none, or run without secagg",
        )
    if cfg.fed.wire_dtype != "float32":
        raise ConfigError(
            field="fed.wire_dtype",
            value=cfg.fed.wire_dtype,
            what="does not apply with SecAgg+ (its masked vectors are quantized from float32 parameters"
            + (
                "; int8 changes carry a scale per client and tensor, so a masked sum of their integers is "
                "not the sum of the changes)"
                if cfg.fed.wire_dtype == "int8"
                else ")"
            ),
            fix="set fed.wire_dtype=float32, or run without secagg",
        )
    if cfg.partition.client_ranks is not None:
        raise ConfigError(
            field="partition.client_ranks",
            value=cfg.partition.client_ranks,
            what="does not work with SecAgg+ (the masked vectors of clients at different ranks have different "
            "sizes, and the server must fill each client's entries outside its block before the sum)",
            fix="set partition.client_ranks=null, or run without secagg",
        )
    if cfg.fed.max_update_norm is not None:
        raise ConfigError(
            field="fed.max_update_norm",
            value=cfg.fed.max_update_norm,
            what="cannot be checked with SecAgg+ (the server never sees a single update)",
            fix="set fed.max_update_norm=null (SecAgg+ clips each entry to its clipping_range instead)",
        )
