"""`fedsb run --dry-run`: the run a config describes, resolved and sized, without training or writing.

The plan resolves the device and dtype (`fedsb.device`), builds the model from its config on the meta
device (no weights are read, converted or allocated: `fedsb.models.load_config`), injects the method's
adapters there (`FederatedMethod.inject`), and reports the adapted modules, the trained parameters, the
estimated peak memory of one client's training step (`fedsb.memory`) for the configured base and for
nf4 / int8 bases, the bytes per round and the one-time bytes (`fedsb.comm`'s formulas, which equal the
ledger of a real run), and, for a private run, the noise multiplier (`fedsb.privacy.ledger`).

It writes nothing. It reads no data, except that record-level DP (privacy.mode=sample) needs every
client's size: then the task's raw training split is loaded and partitioned (no tokenization, so no
tokenization cache; a hub or file dataset may fill the `datasets` cache), and the plan says so.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import torch
from torch import nn

from fedsb.config import RunConfig
from fedsb.config_audit import _basis_init
from fedsb.device import DTYPES, Placement
from fedsb.errors import ConfigError
from fedsb.job import placement_of

QUANTIZE_VARIANTS = ("none", "nf4", "int8")
WIRE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}  # int8: plus its scales


def meta_model(cfg: RunConfig, task: Any, dtype: torch.dtype) -> tuple[nn.Module, str]:
    """The configured model with meta tensors in `dtype` (nothing allocated), and where its config came from."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from fedsb.data.prepare import model_task
    from fedsb.models import load_config

    kind = model_task(task)
    config, source = load_config(cfg.model.name, hub=cfg.model.hub, **kind)
    if config.pad_token_id is None:
        config.pad_token_id = 0  # a causal LM classifies batches by its pad token; any id serves the plan
    auto = AutoModelForSequenceClassification if kind["task"] == "seq_cls" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    return model, source


def planned_placement(cfg: RunConfig) -> tuple[Placement, str | None]:
    """The run's placement; a device this machine lacks is planned for as asked (auto dtype: bfloat16 on
    CUDA), with a note, so a GPU run can be sized on a laptop."""
    try:
        return placement_of(cfg), None
    except ConfigError as exc:
        if cfg.device == "auto" or exc.field != "device":  # only a missing device is planned for
            raise
        device = torch.device(cfg.device)
        auto = torch.bfloat16 if device.type == "cuda" or cfg.model.quantize != "none" else torch.float32
        dtype = DTYPES.get(cfg.model.dtype, auto)
        note = f"{exc.what.removeprefix('is ')}: planned as if it were there"
        return Placement(device, dtype, cfg.device, cfg.model.dtype, cfg.model.quantize), note


def plan_run(cfg: RunConfig) -> dict[str, Any]:
    """Everything `--dry-run` prints, as a JSON-ready dict."""
    from fedsb.data.tasks import get_task
    from fedsb.fed.base import get_method_class
    from fedsb.memory import estimate_memory

    placement, device_note = planned_placement(cfg)
    task = get_task(cfg.data.task, **cfg.data.options)
    model, source = meta_model(cfg, task, placement.dtype)
    params = sum(p.numel() for p in model.parameters())
    adapted = get_method_class(cfg.fed.method).inject(model, cfg)
    configured = cfg.model.quantize
    memory = {
        q: estimate_memory(
            model,
            batch=cfg.train.batch_size,
            seq=cfg.data.max_length,
            classify=task.format.has_head,
            optimizer=cfg.train.optimizer,
            momentum=cfg.train.momentum,
            bf16_autocast=cfg.train.bf16,
            grad_accum=cfg.train.grad_accum,
            quantize=q,
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        ).to_dict()
        for q in dict.fromkeys((configured, *QUANTIZE_VARIANTS))
    }
    modules = sorted({path.rsplit(".", 1)[-1] for path in adapted.layers})
    return {
        "method": cfg.fed.method,
        "task": cfg.data.task,
        "model": {"name": cfg.model.name, "config": source, "parameters": params},
        "device": placement.describe(),
        "device_note": device_note,
        "quantize": configured,
        "adapter": {
            "modules": len(adapted.layers),
            "targets": modules,
            "ranks": sorted({layer.rank for layer in adapted.layers.values()}),
            "trainable": adapted.num_trainable(),
        },
        "memory": {"batch": cfg.train.batch_size, "seq": cfg.data.max_length, "by_base": memory},
        "communication": communication(cfg, adapted),
        "privacy": privacy_plan(cfg, task) if cfg.privacy.enabled else None,
        "data": "read: the raw training split, to size the clients for DP-SGD (no tokenization cache)"
        if cfg.privacy.mechanism.accounts_per_client
        else "none read",
        "written": "nothing",
    }


def communication(cfg: RunConfig, adapted: Any) -> dict[str, Any]:
    """Per client per round (up, down), per round (all sampled clients) and one-time bytes, by the
    `fedsb.comm` formulas where the method has one, else the trained tensors both ways (FedAvg); mixed
    ranks, int8 scales and the federated init by `fedsb.comm.extras` (as `fedsb comm` counts them)."""
    from fedsb import comm
    from fedsb.adapters.layer import linear_dims
    from fedsb.comm import extras

    clients = cfg.partition.num_clients
    per_round = cfg.expected_clients_per_round() if clients is not None else None
    width = WIRE_BYTES[cfg.fed.wire_dtype]
    formula = comm.METHODS.get(cfg.fed.method)
    basis = 0
    head = sum(p.numel() for m in adapted.extra_modules.values() for p in m.parameters())
    if formula is not None and adapted.layers:
        shapes = [(path, *linear_dims(layer.base_layer)) for path, layer in adapted.layers.items()]
        res = formula(shapes, cfg.adapter.rank, per_round or 1, head)
        up, down, basis = res.upload, res.download, res.basis
    else:
        up = down = adapted.num_trainable()
    scales = int8_scale_bytes(cfg, adapted) if cfg.fed.wire_dtype == "int8" else 0
    by_rank = mixed_rank_uploads(cfg, adapted)
    exact_up = Fraction(up)
    if by_rank:  # the expected upload of a sampled client (every client equally likely)
        exact_up = extras.mean_upload(by_rank, cfg.partition.client_ranks)
        up = int(exact_up) if exact_up.denominator == 1 else float(exact_up)
    round_bytes = None if per_round is None else extras.round_bytes(per_round, exact_up, down, width, scales)
    out: dict[str, Any] = {
        "wire_dtype": cfg.fed.wire_dtype,
        "clients": clients,
        "clients_per_round": per_round,
        "params_up_per_client": up,
        "params_down_per_client": down,
        "bytes_per_round": round_bytes,
        "bytes_rounds": None if round_bytes is None else cfg.fed.rounds * round_bytes,
        "basis_params_per_client": basis,
        "bytes_one_time": None if clients is None else clients * basis * 4,  # the basis travels in fp32
    }
    if by_rank:
        out["params_up_by_client_rank"] = by_rank
    if cfg.init.source == "federated" and _basis_init(cfg) == "lora-sb" and basis and per_round is not None:
        init = federated_init_bytes(cfg, adapted, per_round)
        out["federated_init_bytes"] = init
        out["bytes_one_time"] += init
    notes = []
    if formula is None:
        notes.append(f"{cfg.fed.method}: the trained tensors both ways (no comm formula for this method)")
    if cfg.fed.wire_dtype == "int8" and per_round is not None and clients is not None and per_round < clients:
        notes.append(
            "int8 under partial participation: a download carries one entry per round since its least "
            "recent sampled client last took part, so the bytes per round are a lower bound"
        )
    if notes:
        out["note"] = "; ".join(notes)
    return out


def mixed_rank_uploads(cfg: RunConfig, adapted: Any) -> dict[int, int]:
    """partition.client_ranks: r_i -> numbers a client of rank r_i uploads per round, sum over modules of
    min(r_i, r_m)^2 plus the head (`fedsb.comm.extras.mixed_rank_uploads`); {} without mixed ranks.
    Downloads stay the full R."""
    from fedsb.comm.extras import mixed_rank_uploads as uploads

    ranks = cfg.partition.client_ranks
    if not ranks or not adapted.layers:
        return {}
    head = sum(p.numel() for m in adapted.extra_modules.values() for p in m.parameters())
    return uploads([layer.rank for layer in adapted.layers.values()], ranks, head)


def federated_init_bytes(cfg: RunConfig, adapted: Any, clients: int) -> int:
    """The federated init's one-time fp32 bytes, as its ledger lines count them (`fedsb.init.exchange`):
    dense m n per module per client up; sketch m k up, m k down (Q), k n up, k = rank + init.oversample."""
    from fedsb.adapters.layer import linear_dims
    from fedsb.comm.extras import INIT_BYTES, federated_init_params

    shapes = {p: linear_dims(layer.base_layer) for p, layer in adapted.layers.items()}
    ranks = {p: layer.rank for p, layer in adapted.layers.items()}
    per_client = federated_init_params(cfg.init.exchange, shapes, ranks, cfg.init.oversample)
    return INIT_BYTES * clients * per_client


def int8_scale_bytes(cfg: RunConfig, adapted: Any) -> int:
    """fp32 scale bytes in one int8 message: one per sent tensor (fed.wire_scale=tensor) or per row of a
    2-D one (row); the sent tensors are the trained ones (RAVAN: its products s_k H_k, not the scales s_k)."""
    from fedsb.comm.extras import int8_scale_bytes as scale_bytes

    shapes = [
        tuple(p.shape) for k, p in adapted.trainable_parameters().items() if not k.endswith("ravan_s.weight")
    ]
    return scale_bytes(shapes, cfg.fed.wire_scale)


def privacy_plan(cfg: RunConfig, task: Any) -> dict[str, Any]:
    """The noise multiplier(s) the run would use for its whole planned training."""
    from fedsb.privacy.ledger import PrivacyLedger
    from fedsb.train.local import steps_for

    if cfg.privacy.mechanism.accounts_per_client:  # each account from its client's size N_i
        sizes = client_sizes(cfg, task)
    else:  # one account over the clients (client-level DP) needs only their number
        n = cfg.partition.num_clients
        if n is None:
            return {
                "mode": cfg.privacy.mode,
                "note": "the number of clients is known once the data is loaded",
            }
        sizes = {f"client-{i}": 1 for i in range(n)}
    steps = {cid: steps_for(size, cfg.train) for cid, size in sizes.items()}
    summary = PrivacyLedger.plan(cfg, sizes, steps, init_info={}).summary()
    return {
        "mode": summary["mode"],
        "accountant": summary["accountant"],
        "noise_multiplier_range": summary["noise_multiplier_range"],
        "delta": summary["delta"],
        "target_epsilon": cfg.privacy.target_epsilon,
    }


def client_sizes(cfg: RunConfig, task: Any) -> dict[str, int]:
    """Every client's number of raw training examples (before tokenization drops over-long ones)."""
    from fedsb.data.prepare import partition_rows

    parts, _ = partition_rows(cfg, task)
    width = max(2, len(str(len(parts) - 1)))
    return {f"client-{i:0{width}d}": len(p) for i, p in enumerate(parts)}


def format_plan(plan: dict[str, Any]) -> str:
    """The dry run's text report."""
    from fedsb.comm import format_bytes

    def gib(n: float) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    dev, ad, com, mem = plan["device"], plan["adapter"], plan["communication"], plan["memory"]
    own = mem["by_base"][plan["quantize"]]
    lines = [
        f"fedsb run --dry-run: {plan['method']} on {plan['task']} with {plan['model']['name']} "
        "(nothing trained, nothing written)",
        f"device             {dev['device']} (requested {dev['requested']}; "
        + (f"{plan['device_note']})" if plan["device_note"] else f"{dev['name']})"),
        f"base model         {plan['model']['parameters']:,} parameters in {dev['model_dtype']} "
        f"(requested {dev['requested_model_dtype']}), quantize {plan['quantize']}; config from {plan['model']['config']}",
        f"adapted modules    {ad['modules']} ({', '.join(ad['targets']) or 'none: full fine-tuning'}; "
        f"ranks {ad['ranks'] or '-'})",
        f"trained parameters {ad['trainable']:,}",
        f"memory, one client at batch {mem['batch']} x {mem['seq']} tokens (estimate; excludes the CUDA "
        "context, allocator slack and evaluation):",
        f"  weights          {gib(own['weights'])} (frozen base {gib(own['frozen_weights'])}, adapter "
        f"{gib(own['adapter_weights'])}, trained {gib(own['trained_weights'])}, autocast copies "
        f"{gib(own['autocast_copies'])})",
        f"  optimizer        {gib(own['optimizer'])}; gradients {gib(own['gradients'])}",
        f"  activations      {gib(own['activations'])} (saved for backward {gib(own['saved_activations'])})",
        f"  peak             {gib(own['total'])}",
        "  by base          "
        + ", ".join(
            f"{q}: {gib(m['total'])} (weights {gib(m['weights'])})" for q, m in mem["by_base"].items()
        ),
    ]
    per_round = com["bytes_per_round"]
    lines.append(
        f"communication      per client per round: {com['params_up_per_client']:,} up, "
        f"{com['params_down_per_client']:,} down ({com['wire_dtype']}); per round "
        + (
            f"{format_bytes(per_round)} over {com['clients_per_round']} clients"
            if per_round is not None
            else "?"
        )
        + (
            f"; one-time {format_bytes(com['bytes_one_time'])}"
            if com["bytes_one_time"]
            else "; one-time none"
        )
    )
    priv = plan["privacy"]
    if priv is None:
        lines.append("privacy            none")
    elif "noise_multiplier_range" in priv:
        lo, hi = priv["noise_multiplier_range"]
        sigma = f"{lo:.3f}" if lo == hi else f"{lo:.3f}..{hi:.3f}"
        lines.append(
            f"privacy            {priv['mode']}: noise multiplier {sigma}, delta <= {priv['delta']:.2e}"
        )
    else:
        lines.append(f"privacy            {priv['mode']}: {priv['note']}")
    lines.append(f"data               {plan['data']}; written: {plan['written']}")
    return "\n".join(lines)
