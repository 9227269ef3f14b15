"""The job recipe: the one place that turns a `RunConfig` into the parts of a run.

`build_components(cfg, role=...)` resolves the device and dtype, loads the task, the base model and its
tokenizer (the only `load_model` call of a job), prepares the data, creates the federated method (Fed-SB:
computes or loads its basis; a client rebuilds it from the server's setup) and, on the server, the ledger with its one-time lines, the privacy
plan and the client sampler. Every entry point builds from here: `fedsb run` and `--resume`
(`fedsb.run.Run`), `fedsb eval` / `load_trained` / `export_run` of a run directory (`fedsb.trained`), the
Flower ServerApp (through `Run`) and ClientApp (`fedsb.flower.client.build_runtime`), and the benchmarks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fedsb.config import RunConfig
from fedsb.data.prepare import (
    PreparedData,
    loader_factory,
    model_task,
    prepare_client,
    prepare_data,
    task_from_config,
)
from fedsb.device import Placement, resolve_placement
from fedsb.errors import ConfigError, naming_settings
from fedsb.phases import phase
from fedsb.seeding import derive_seed
from fedsb.train.local import loss_for

log = logging.getLogger("fedsb.job")

CONFIG_FILE = "config.yaml"

#: server: everything (data, init, ledger, privacy, sampler); client: model, data and the method from the
#: server's setup; trained: model and method from a finished run's saved setup, no data
Role = Literal["server", "client", "trained"]


@dataclass
class Components:
    """The parts of a job, built once by `build_components`."""

    cfg: RunConfig
    placement: Placement
    task: Any
    loaded: Any  # fedsb.models.LoadedModel
    method: Any  # fedsb.fed.base.FederatedMethod
    data: PreparedData | None = None
    ledger: Any = None  # fedsb.fed.ledger.Ledger (server)
    privacy: Any = None  # fedsb.privacy.ledger.PrivacyLedger (server, private runs)
    sampler: Any = None  # fedsb.fed.sampling.ClientSampler (server)
    #: the init data as the method's setup used it (server; `InitReport.describe`: results' "init")
    init_info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def adapted(self) -> Any:
        return self.method.adapted

    def simulator(self, only: list[str] | None = None) -> Any:
        """The in-process executor: the clients (all, or `only` these) train on this process's one model."""
        from fedsb.console import bars_enabled
        from fedsb.fed.mixed_rank import client_ranks_of
        from fedsb.fed.simulate import InProcessExecutor

        cfg = self.cfg
        assert self.data is not None, "the simulator needs the clients' data"
        clients = self.data.clients
        return InProcessExecutor(
            self.method,
            self.adapted,
            clients if only is None else {cid: clients[cid] for cid in only},
            cfg.train,
            rounds=cfg.fed.rounds,
            seed=cfg.seed,
            wire_dtype=cfg.fed.wire_dtype,
            wire_scale=cfg.fed.wire_scale,
            error_feedback=cfg.fed.error_feedback,
            loss_fn=loss_for(self.task, per_example=cfg.privacy.mechanism.per_example_loss),
            progress=bars_enabled(cfg.progress),
            privacy=self.privacy,
            mechanism=cfg.privacy.mechanism,
            # every client of the partition, also on a Flower node that holds only its own shard
            client_ranks=client_ranks_of(
                cfg.partition.client_ranks, self.data.partition_stats.get("client_ids", list(clients))
            ),
        )


def configure_torch(cfg: RunConfig) -> None:
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # deterministic mode also fills every new tensor with NaN (a debugging aid for kernels that read
        # memory they never wrote); it costs a pass over each allocation, as much as dequantizing a 4-bit
        # weight, and changes no result of a kernel that writes what it reads
        torch.utils.deterministic.fill_uninitialized_memory = False


def placement_of(cfg: RunConfig) -> Placement:
    """The run's device, base dtype and quantization on this machine (`device`, `model.dtype`,
    `model.quantize`; ConfigError if the device is absent or the method cannot train on a quantized base)."""
    if cfg.model.quantize != "none":
        check_quantized_method(cfg)
    return resolve_placement(cfg.device, cfg.model.dtype, cfg.model.quantize)


def check_quantized_method(cfg: RunConfig) -> None:
    """Refuse a method that writes the frozen base (its card says why: `MethodCard.quantized_base_refusal`)."""
    from fedsb.fed import registry

    why = registry.card(cfg.fed.method).quantized_base_refusal
    if why is not None:
        able = registry.names_where(lambda c: c.adapters and c.quantized_base_refusal is None)
        raise ConfigError(
            field="model.quantize",
            value=cfg.model.quantize,
            what=f"does not work with fed.method={cfg.fed.method}: {why}",
            fix="use model.quantize=none for this method, or an adapter method that leaves W0 frozen "
            f"({', '.join(able)})",
        )


def load_base(cfg: RunConfig, task: Any, placement: Placement, *, cache_dir: Path | None = None) -> Any:
    """The base model and tokenizer, on the placement's device in its dtype (the recipe's one load); a
    quantized base has its linear layers quantized onto the device as they are read (`fedsb.models.load_model`,
    `fedsb.models.stream`); `train.gradient_checkpointing` is switched on here. `cache_dir`: where
    converted builtin checkpoints live (default the fedsb cache)."""
    from fedsb.models import load_model

    loaded = load_model(
        cfg.model.name,
        dtype=placement.dtype,
        seed=derive_seed(cfg.seed, "model") % (2**32),
        device=placement.device,
        device_map=cfg.model.device_map,
        hub=cfg.model.hub,
        cache_dir=cache_dir,
        quantize=placement.quantize,
        **model_task(task),
    )
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(loaded.model)
    return loaded


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant (no input that requires grad needed; dropout
    masks replayed from the saved RNG state, so the gradients equal those without it). Active in train
    mode only: evaluation is untouched."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(
            field="train.gradient_checkpointing",
            value=True,
            what=f"is not supported by {type(model).__name__} (transformers has no checkpointing for it)",
            fix="set train.gradient_checkpointing=false",
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_components(
    cfg: RunConfig,
    *,
    role: Role = "server",
    setup_dir: Path | None = None,
    resume: bool = False,
    setup: tuple[Mapping[str, torch.Tensor], str] | None = None,
    placement: Placement | None = None,
    partition_id: int | None = None,
    cache_dir: Path | None = None,
    echo: Callable[[str], None] = lambda _: None,
    init_parties: Callable[[list[str], list[Any]], Any] | None = None,
) -> Components:
    """Task, model and tokenizer, data, method and (server) ledger, privacy plan and sampler of `cfg`.

    `setup_dir` holds (or receives) the method's one-time setup, e.g. Fed-SB's basis/; with `resume` it is
    loaded from there instead of recomputed. `setup`: a client's (payload, fingerprint) received from the
    server, from which the method rebuilds its frozen basis (`FederatedMethod.from_setup`).
    `placement`: the device and dtype if already resolved (default: resolved from `cfg` here).
    `partition_id` (role client): prepare only that client's shard (`fedsb.data.prepare.prepare_client`).
    `cache_dir`: the converted checkpoints and the client's tokenized shard (default the fedsb cache).
    `init_parties` (init.source=federated): how the server reaches the init's clients (default: in process).
    """
    placement = placement or placement_of(cfg)
    task = task_from_config(cfg)
    with phase("model build"):
        loaded = load_base(cfg, task, placement, cache_dir=cache_dir)
    data = None
    if role != "trained":
        with phase("data preparation"):
            if role == "client" and partition_id is not None:
                data = prepare_client(cfg, task, loaded.tokenizer, partition_id, cache_dir=cache_dir)
            else:
                data = prepare_data(cfg, task, loaded.tokenizer)
        echo(
            f"clients: {len(data.clients)} with sizes {list(data.client_sizes.values())}; "
            f"evaluation examples: {len(data.test)}"
        )
    if setup is not None:
        from fedsb.fed.base import get_method_class

        with phase("basis verification"):
            method = get_method_class(cfg.fed.method).from_setup(loaded.model, cfg, *setup)
    else:
        init_data = data if role == "server" else None
        method = build_method(
            cfg, loaded.model, task, loaded.tokenizer, init_data, setup_dir, resume=resume,
            init_parties=init_parties,
        )  # fmt: skip
    parts = Components(cfg, placement, task, loaded, method, data)
    if role == "server":
        assert data is not None
        init = parts.init_info = method.init_report.describe(data.init_info)
        if method.basis_fingerprint:
            echo(
                f"basis: {init.get('method', cfg.init.method)} from {init['num_samples']} "
                f"{cfg.init.source} examples, "
                f"eta={init.get('eta')}, fingerprint {method.basis_fingerprint[:12]}"
            )
        from fedsb.fed.sampling import ClientSampler

        parts.ledger = plan_ledger(cfg, method, data, init)
        parts.privacy = plan_privacy(cfg, data, echo, init_info=init) if cfg.privacy.enabled else None
        parts.sampler = ClientSampler(
            list(data.clients), cfg.fed.clients_per_round, seed=derive_seed(cfg.seed, "sampling")
        )
    return parts


#: arguments of the setup code -> the settings they come from (for the errors they raise)
METHOD_ARGS = {
    "rank": "adapter.rank",
    "scaling": "adapter.scaling",
    "init": "init.method",
    "svd": "init.svd",
    "eta": "init.eta",
    "num_samples": "init.num_samples",
}


def build_method(
    cfg: RunConfig,
    model: torch.nn.Module,
    task: Any,
    tokenizer: Any,
    data: PreparedData | None,
    setup_dir: Path | None,
    *,
    resume: bool,
    init_parties: Callable[[list[str], list[Any]], Any] | None = None,
) -> Any:
    """Create the configured method on `model` (Fed-SB computes or loads its basis here)."""
    from fedsb.fed.base import SetupContext, get_method_class

    init_batches = None
    if data is not None and data.init_data is not None:  # init.source=federated has none
        make_loader = loader_factory(cfg, task, tokenizer, cfg.init.batch_size)(data.init_data)

        def init_batches() -> Any:
            return make_loader(derive_seed(cfg.seed, "init"))

    ctx = SetupContext(
        cfg=cfg,
        init_batches=init_batches,
        num_samples=data.init_info["num_samples"] if data else None,
        loss_fn=loss_for(task),
        setup_dir=setup_dir,
        resume=resume,
        data_info=data.init_info if data else {},
        clients=data.clients if data else None,
        init_parties=init_parties,
    )
    with naming_settings(METHOD_ARGS):
        return get_method_class(cfg.fed.method).create(model, ctx)


def plan_ledger(cfg: RunConfig, method: Any, data: PreparedData, init_info: Mapping[str, Any]) -> Any:
    """The communication ledger with the run's one-time lines (the basis broadcast, the init data as the
    method's setup used it: `init_info`)."""
    from fedsb.fed.ledger import Ledger

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
            direction="none" if init_info["federated"] else "up",
            clients=0 if init_info["federated"] else len(data.clients),
            note=init_info["note"] + f"; {init_info['num_samples']} examples",
        )
        if "federated_init" in init_info:
            from fedsb.fed.federated_init import init_ledger_lines

            init_ledger_lines(ledger, init_info["federated_init"])
    return ledger


def plan_privacy(
    cfg: RunConfig,
    data: PreparedData,
    echo: Callable[[str], None],
    *,
    init_info: Mapping[str, Any] | None = None,
) -> Any:
    """The run's privacy ledger, with every account's noise multiplier solved for the whole training
    (`init_info`: the init data as the setup used it, for the note on the initialization; default: the
    data's own description)."""
    init_info = data.init_info if init_info is None else init_info
    from fedsb.privacy.ledger import PrivacyLedger
    from fedsb.train.local import steps_for

    steps = {cid: steps_for(n, cfg.train) for cid, n in data.client_sizes.items()}
    ledger = PrivacyLedger.plan(cfg, data.client_sizes, steps, init_info=init_info)
    if "federated_init" in init_info:
        from fedsb.privacy.init_charge import charge_federated_init

        charge_federated_init(ledger, init_info["federated_init"])
    summary = ledger.summary()
    lo, hi = summary["noise_multiplier_range"]
    target = cfg.privacy.target_epsilon
    echo(
        f"privacy: {ledger.mechanism.description} ({cfg.privacy.accountant}), "
        + (f"target epsilon {target:g} over all {cfg.fed.rounds} rounds, " if target else "")
        + f"sigma {lo:.3f}"
        + (f"..{hi:.3f}" if hi != lo else "")
        + f", delta <= {summary['delta']:.2e}"
    )
    if not init_info.get("federated", True):
        log.warning("privacy: %s", ledger.init_note)
    if ledger.reproducible_noise:
        from fedsb.privacy.noise import REPRODUCIBLE_WARNING

        log.warning("privacy: %s", REPRODUCIBLE_WARNING)
    return ledger
