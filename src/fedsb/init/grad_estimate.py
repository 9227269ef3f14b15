"""Accumulate full fine-tuning gradients of the target weights over n samples, leaving no trace.

A dense weight W gets its gradient from autograd (W.requires_grad). A 4/8-bit bitsandbytes weight cannot
require a gradient, so its layer is tapped instead (`quantized_weight_grads`): the layer computes
y = x deq(W0)^T (+ b) in its compute dtype, and its tap adds G = g^T x, with g = dL/dy (tokens, m) and x
the layer's input (tokens, n), to an fp32 (m, n) buffer. That
is exactly the gradient of the loss with respect to the dequantized weight deq(W0) the model computes
with; what is approximated is W0 itself: the first full fine-tuning step is taken from the quantized
model (the one the run trains), not from the full-precision checkpoint, and x is the layer's input before
its cast to the compute dtype (bf16 rounding of x, for a bf16 compute dtype).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

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


class _WeightGradTap(torch.autograd.Function):
    """Identity on a layer's output y (..., m); its backward adds g^T x (m, n) to the layer's buffer."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, acc: torch.Tensor) -> Any:
        ctx.save_for_backward(x)
        ctx.acc = acc
        return y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(torch.float32)  # (tokens, m)
        ctx.acc.add_(g.T @ x.reshape(-1, x.shape[-1]).to(torch.float32))  # (m, tokens) @ (tokens, n)
        return grad, None, None, None


@contextmanager
def quantized_weight_grads(layers: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """name -> fp32 (m, n) buffer collecting dL/d deq(W) of each 4/8-bit layer over every backward pass
    inside the block (forward hooks, removed on exit). A zero-dim `anchor` requiring grad makes every
    tapped output part of the graph even where nothing upstream requires a gradient."""
    if not layers:
        yield {}
        return
    device = next(iter(layers.values())).weight.device
    anchor = torch.zeros((), device=device, requires_grad=True)
    acc = {
        name: torch.zeros(m.out_features, m.in_features, dtype=torch.float32, device=device)
        for name, m in layers.items()
    }  # (m, n) each

    def tap(buffer: torch.Tensor) -> Callable[..., torch.Tensor]:
        def hook(module: nn.Module, args: tuple[Any, ...], y: torch.Tensor) -> torch.Tensor:
            return _WeightGradTap.apply(y, args[0].detach(), anchor, buffer)

        return hook

    handles = [m.register_forward_hook(tap(acc[name])) for name, m in layers.items()]
    try:
        yield acc
    finally:
        for h in handles:
            h.remove()


def estimate_gradients(
    model: nn.Module,
    weights: Mapping[str, nn.Parameter],
    batches: Iterable[Batch] | None = None,
    *,
    quantized: Mapping[str, nn.Module] | None = None,
    num_samples: int | None = None,
    loss_fn: LossFn = default_loss,
    train_step: Callable[[nn.Module], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """G_W = sum over batches of grad_W(mean batch loss) for each weight in `weights` (fp32, same shape).

    `quantized`: name -> 4/8-bit layer whose dequantized weight's gradient is wanted as well (tapped:
    `quantized_weight_grads`; the module docstring says what is approximated).
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
    quantized = quantized or {}
    if not weights and not quantized:
        raise FedsbError(field="weights", value={}, fix="pass at least one target weight")
    with isolated_training_state(model, weights, seed), quantized_weight_grads(quantized) as taps:
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
        for name, g in taps.items():
            if not g.any():
                raise RuntimeError(f"layer {name} received no gradient; is it used in the forward pass?")
            grads[name] = g
    return grads
