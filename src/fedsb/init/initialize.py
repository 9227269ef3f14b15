"""Compute a basis for a model (without changing it) and attach LoRA-SB layers built from a basis."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

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

log = logging.getLogger("fedsb.init")


def compute_basis(
    model: nn.Module,
    *,
    rank: int,
    targets: Sequence[str] | str = "auto",
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    rank_overflow: str = "cap",
    init: str = "lora-sb",
    batches: Iterable[Batch] | None = None,
    num_samples: int | None = None,
    loss_fn: LossFn = default_loss,
    train_step: Callable[[nn.Module], None] | None = None,
    eta: float = 1e-4,
    scaling: float = 1.0,
    svd: str = "exact",
    oversample: int = 10,
    power_iters: int = 4,
    generator: torch.Generator | None = None,
    on_batch: Callable[[int], None] | None = None,
    dropout_seed: int = 0,
) -> Basis:
    """The frozen basis and R0 for `model`; the model itself is left exactly as it was.

    init='lora-sb' estimates G_W over `num_samples` examples of `batches` (or via `train_step`), then takes
    dW = -eta * sign(G_W) and its truncated SVD. 'lora-xs' uses the SVD of W0; 'random' random orthonormal
    bases (both data-free). `generator` drives every random draw (randomized SVD, random bases);
    `dropout_seed` seeds the dropout masks of the gradient estimate, so the basis is reproducible. The
    gradient estimate and the SVD run on the model's device; the returned basis is on the CPU.
    """
    if init not in INIT_KINDS:
        raise FedsbError(field="init", value=init, fix=f"use one of {', '.join(INIT_KINDS)}")
    check_model_dtype(model)
    modules = resolve_targets(model, targets, exclude)
    ranks = resolve_ranks(modules, rank, rank_overflow=rank_overflow)
    if init == "lora-sb":
        weights = {path: m.weight for path, m in modules.items() if not is_quantized(m)}
        quantized = {path: m for path, m in modules.items() if is_quantized(m)}  # tapped: dL/d deq(W0)
        grads = estimate_gradients(
            model,
            weights,
            batches,
            quantized=quantized,
            num_samples=num_samples,
            loss_fn=loss_fn,
            train_step=train_step,
            on_batch=on_batch,
            seed=dropout_seed,
        )
        # Conv1D stores its weight (n, m): turn gradients into weight orientation (m, n)
        grads = {p: (g.T if isinstance(modules[p], Conv1D) else g) for p, g in grads.items()}
        basis = lora_sb_basis(
            grads,
            ranks,
            eta=eta,
            scaling=scaling,
            svd=svd,
            oversample=oversample,
            power_iters=power_iters,
            generator=generator,
        )
        basis.info["num_samples"] = num_samples
    elif init == "lora-xs":
        w = {p: dense_weight(m) for p, m in modules.items()}  # (m, n) fp32, dequantized for a 4/8-bit base
        basis = lora_xs_basis(w, ranks, scaling=scaling, generator=generator)
    else:
        if generator is None:
            raise FedsbError(field="generator", value=None, fix="pass a torch.Generator for init='random'")
        basis = random_basis(
            {p: linear_dims(m) for p, m in modules.items()}, ranks, generator=generator, scaling=scaling
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
