"""Accumulate full fine-tuning gradients of the target weights over n samples, leaving no trace."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from fedsb.device import module_device, seeded, to_device
from fedsb.errors import FedsbError

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The HF model's own loss: `model(**batch).loss` (batch must carry `labels`)."""
    return model(**batch).loss


def batch_size(batch: Batch) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("cannot infer the batch size: the batch holds no tensor with a batch dimension")


def truncate_batch(batch: Batch, n: int) -> dict[str, torch.Tensor]:
    """The first n examples of a batch (every tensor sliced along dim 0)."""
    return {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


@contextmanager
def isolated_training_state(
    model: nn.Module, weights: Mapping[str, nn.Parameter], seed: int = 0
) -> Iterator[None]:
    """Train mode, gradients on `weights` only, existing .grad set aside, RNG forked and seeded; restored.

    Dropout inside draws from the global RNG, forked (the caller's CPU and CUDA states are untouched) and
    seeded with `seed`, so the same inputs give the same gradients in every process.
    """
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    saved_grads = {p: p.grad for p in model.parameters()}
    # dropout draws from the CPU's and the model device's RNGs, forked (restored after) and seeded
    with seeded(module_device(model), seed % (2**63)):
        try:
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for p in weights.values():
                p.requires_grad_(True)
            model.train()
            yield
        finally:
            for m, mode in modes.items():
                m.train(mode)
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = saved_grads[p]


def estimate_gradients(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[Batch] | None = None,
    *,
    num_samples: int | None = None,
    loss_fn: LossFn = default_loss,
    train_step: Callable[[nn.Module], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """G_W = sum over batches of grad_W(mean batch loss) for each weight in `weights` (fp32, same shape).

    Two ways to drive it:
      * an iterator of batches plus `num_samples`: exactly `num_samples` examples are used (the last batch is
        truncated); `loss_fn(model, batch)` returns the mean loss of a batch;
      * a `train_step(model)` callback that runs forward and backward itself, any number of times.
    Batches move to the model's device; G_W stays there (in fp32) for the SVD.
    Only the target weights get gradients (no memory for embeddings or heads). The model's train/eval modes,
    `requires_grad` flags and existing `.grad` tensors are as before afterwards; no hooks are registered.
    Dropout stays on (train mode, as the first fine-tuning step it approximates) and draws its masks from
    the RNG seeded with `seed` (`isolated_training_state`): the estimate, and so the basis fingerprint, is
    the same in every run and process. The scale of G_W does not matter for the sign step that follows.
    """
    if (batches is None) == (train_step is None):
        raise ValueError("pass either `batches` (with num_samples) or `train_step`, not both")
    if not weights:
        raise FedsbError(field="weights", value={}, fix="pass at least one target weight")
    with isolated_training_state(model, weights, seed):
        if train_step is not None:
            train_step(model)
        else:
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
                raise FedsbError(
                    field="num_samples", value=num_samples, fix="use a positive integer, e.g. 32"
                )
            seen, device = 0, module_device(model)
            for batch in batches:
                take = min(batch_size(batch), num_samples - seen)
                if take <= 0:
                    break
                loss = loss_fn(model, to_device(truncate_batch(batch, take), device))
                loss.backward()
                seen += take
                if on_batch is not None:
                    on_batch(take)
                if seen >= num_samples:
                    break
            if seen < num_samples:
                raise FedsbError(
                    field="num_samples",
                    value=num_samples,
                    what=f"is more than the init data holds ({seen} examples)",
                    fix=f"use num_samples <= {seen} or provide more init data",
                )
        grads: dict[str, torch.Tensor] = {}
        for name, p in weights.items():
            if p.grad is None:
                raise RuntimeError(f"weight {name} received no gradient; is it used in the forward pass?")
            grads[name] = p.grad.detach().to(torch.float32).clone()
    return grads
