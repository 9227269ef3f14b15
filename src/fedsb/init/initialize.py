"""Compute a basis for a model (without changing it) and attach LoRA-SB layers built from a basis."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.adapters.inject import (
    DEFAULT_EXCLUDE,
    AdaptedModel,
    check_model_dtype,
    inject_adapters,
    lora_sb_factory,
    resolve_ranks,
    resolve_targets,
)
from fedsb.adapters.layer import LoraSBLinear, dense_weight, linear_dims
from fedsb.errors import FedsbError
from fedsb.init.basis import INIT_KINDS, Basis, lora_sb_basis, lora_xs_basis, random_basis
from fedsb.init.grad_estimate import Batch, LossFn, default_loss, estimate_gradients
from fedsb.models.quantize import is_quantized

if TYPE_CHECKING:
    from fedsb.config import RunConfig

log = logging.getLogger("fedsb.init")


@dataclass(frozen=True)
class BasisSpec:
    """Which basis `compute_basis` computes: at which modules (`targets` minus `exclude`, PEFT's matching)
    and rank (capped at min(m, n) per module, or an error with rank_overflow='error'), by which `init`.

    init='lora-sb': dW = -eta * sign(G_W) and its truncated SVD (`svd` 'exact', or 'randomized' with
    `oversample` extra columns and `power_iters` power iterations); 'lora-xs': the SVD of W0; 'random':
    random orthonormal bases. Every basis carries the scale s = `scaling`."""

    rank: int
    targets: Sequence[str] | str = "auto"
    exclude: Sequence[str] = DEFAULT_EXCLUDE
    rank_overflow: str = "cap"
    init: str = "lora-sb"
    eta: float = 1e-4
    scaling: float = 1.0
    svd: str = "exact"
    oversample: int = 10
    power_iters: int = 4

    @classmethod
    def from_config(cls, cfg: RunConfig, *, rank: int, init: str, scaling: float, eta: float) -> BasisSpec:
        """adapter.targets, adapter.rank_overflow, init.svd, init.oversample and init.power_iters of `cfg`;
        the rank, init, scale and eta as the method resolved them (RAVAN: h heads x adapter.rank, ravan.init)."""
        return cls(
            rank=rank,
            targets=cfg.adapter.targets,
            rank_overflow=cfg.adapter.rank_overflow,
            init=init,
            eta=eta,
            scaling=scaling,
            svd=cfg.init.svd,
            oversample=cfg.init.oversample,
            power_iters=cfg.init.power_iters,
        )


@dataclass(frozen=True)
class GradientSource:
    """What init='lora-sb' estimates G_W from: exactly `num_samples` examples of `batches` through
    `loss_fn`, or whatever `train_step(model)` runs; dropout masks seeded by `dropout_seed`; `on_batch(n)`
    is told the size of every batch used (`fedsb.init.grad_estimate.estimate_gradients`)."""

    batches: Iterable[Batch] | None = None
    num_samples: int | None = None
    loss_fn: LossFn = default_loss
    train_step: Callable[[nn.Module], None] | None = None
    dropout_seed: int = 0
    on_batch: Callable[[int], None] | None = None


def compute_basis(
    model: nn.Module,
    spec: BasisSpec,
    data: GradientSource | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Basis:
    """The frozen basis and R0 for `model` as `spec` says; the model itself is left exactly as it was.

    `data` feeds the gradient estimate of init='lora-sb' (the data-free inits ignore it). `generator`
    drives every random draw (randomized SVD, random bases), so with `data.dropout_seed` the basis is
    reproducible. The gradient estimate and the SVD run on the model's device; the basis is on the CPU.
    """
    init, data = spec.init, data or GradientSource()
    if init not in INIT_KINDS:
        raise FedsbError(field="init", value=init, fix=f"use one of {', '.join(INIT_KINDS)}")
    check_model_dtype(model)
    modules = resolve_targets(model, spec.targets, spec.exclude)
    ranks = resolve_ranks(modules, spec.rank, rank_overflow=spec.rank_overflow)
    if init == "lora-sb":
        weights = {path: m.weight for path, m in modules.items() if not is_quantized(m)}
        quantized = {path: m for path, m in modules.items() if is_quantized(m)}  # tapped: dL/d deq(W0)
        grads = estimate_gradients(
            model,
            weights,
            data.batches,
            quantized=quantized,
            num_samples=data.num_samples,
            loss_fn=data.loss_fn,
            train_step=data.train_step,
            on_batch=data.on_batch,
            seed=data.dropout_seed,
        )
        # Conv1D stores its weight (n, m): turn gradients into weight orientation (m, n)
        grads = {p: (g.T if isinstance(modules[p], Conv1D) else g) for p, g in grads.items()}
        basis = lora_sb_basis(
            grads,
            ranks,
            eta=spec.eta,
            scaling=spec.scaling,
            svd=spec.svd,
            oversample=spec.oversample,
            power_iters=spec.power_iters,
            generator=generator,
        )
        basis.info["num_samples"] = data.num_samples
    elif init == "lora-xs":
        w = {p: dense_weight(m) for p, m in modules.items()}  # (m, n) fp32, dequantized for a 4/8-bit base
        basis = lora_xs_basis(w, ranks, scaling=spec.scaling, generator=generator)
    else:
        if generator is None:
            raise FedsbError(field="generator", value=None, fix="pass a torch.Generator for init='random'")
        basis = random_basis(
            {p: linear_dims(m) for p, m in modules.items()}, ranks, generator=generator, scaling=spec.scaling
        )
    basis = basis.cpu()  # computed on the model's device; kept, saved and sent from the CPU
    log.info(
        "basis %s: %d modules, %s init, fingerprint %s",
        basis.info["init"],
        len(modules),
        init,
        basis.fingerprint[:12],
    )
    return basis


def attach_basis(
    model: nn.Module,
    basis: Basis,
    *,
    dropout: float = 0.0,
    extra_trainable: Sequence[str] | str = "auto",
) -> AdaptedModel:
    """Wrap every module named in `basis` with a `LoraSBLinear` holding B, A and R = R0."""
    try:
        modules = {path: model.get_submodule(path) for path in basis.factors}
    except AttributeError as exc:
        raise FedsbError(
            field="basis", value=str(exc), fix="use a basis computed for this model architecture"
        ) from None
    adapted = inject_adapters(
        model,
        modules,
        lora_sb_factory(scaling=basis.scaling, dropout=dropout),
        basis.ranks,
        extra_trainable=extra_trainable,
    )
    for path, layer in adapted.layers.items():
        f = basis.factors[path]
        assert isinstance(layer, LoraSBLinear)
        layer.set_factors(f.B, f.A, f.R0)
    return adapted


def r_parameter_names(adapted: AdaptedModel) -> dict[str, str]:
    """Module path -> name of its R parameter (``<path>.lora_sb_R.weight``)."""
    return {path: f"{path}.lora_sb_R.weight" for path in adapted.layers}
