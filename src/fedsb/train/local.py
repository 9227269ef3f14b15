"""The one local training loop, shared by every method, the simulator and the Flower client."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedsb.config import TrainConfig
from fedsb.device import autocast, module_device, seeded, to_device
from fedsb.train.batches import Batch, batch_size_of, cycle_epochs
from fedsb.train.losses import (  # noqa: F401 - re-exported: the loop's losses live in fedsb.train.losses
    LossFn,
    causal_lm_loss,
    default_loss,
    per_example_causal_lm_loss,
)
from fedsb.train.privatizer import Privatizer
from fedsb.train.schedule import Schedule


@dataclass
class LocalResult:
    """What one client's local training produced (besides the trained tensors in the model)."""

    steps: int
    num_examples: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over the trained tensors (fp32 master weights, so fp32 state)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def steps_for(num_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps per round: train.local_steps, or ceil(local_epochs * N / (batch * accum))."""
    if cfg.local_steps is not None:
        return cfg.local_steps
    return max(1, math.ceil(cfg.local_epochs * num_examples / (cfg.batch_size * cfg.grad_accum)))


@dataclass(frozen=True)
class StepPlan:
    """What one `train_local` call runs: `steps` optimizer steps, step k at `schedule.lr(step_offset + k)`.

    `optimizer_state` (a previous call's, `train.keep_optimizer_state`) is loaded before the first step;
    `seed` seeds the dropout draws; `on_step(k, loss)` is called after each step that had a loss.
    """

    steps: int
    schedule: Schedule
    step_offset: int = 0
    optimizer_state: dict[str, Any] | None = None
    seed: int = 0
    on_step: Callable[[int, float], None] | None = None


def train_local(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    make_epoch: Callable[[int], Iterable[Batch]],
    cfg: TrainConfig,
    plan: StepPlan,
    *,
    loss_fn: LossFn = causal_lm_loss,
    privacy: Privatizer | None = None,
) -> tuple[LocalResult, dict[str, Any]]:
    """Run `plan.steps` optimizer steps on `params` (everything else frozen); return (result, optimizer state).

    `make_epoch(e)` yields the batches of epoch e (its order must depend only on its own seed); batches are
    cycled until `steps * grad_accum` micro-batches were used. Loss per optimizer step is the mean of its
    micro-batch losses; gradients are clipped to `max_grad_norm` over the trained tensors; the learning
    rate of step k is `plan.schedule.lr(plan.step_offset + k)`. Batches move to the model's device and the
    forward runs under that device type's bf16 autocast (`train.bf16`). Dropout draws come from the CPU and
    device generators forked and seeded with `plan.seed`, so the caller's RNG states are untouched and runs
    repeatable.

    With `privacy` (a record-level mechanism's client step, `PrivacyMechanism.client_step`; DP-SGD: every
    step is one Poisson batch with per-example clipping and noise, Opacus), `loss_fn` must be a mean of
    per-example losses (`per_example_causal_lm_loss` for LMs; `PrivacyMechanism.per_example_loss`).
    """
    if privacy is not None and cfg.grad_accum != 1:
        raise ValueError("DP-SGD takes one Poisson batch per step: use grad_accum=1")
    plist = list(params.values())
    flags = _train_only(model, plist)
    opt = make_optimizer(plist, cfg)
    if plan.optimizer_state:
        opt.load_state_dict(plan.optimizer_state)
    was_training = model.training
    model.train()
    device = module_device(model)
    result = LocalResult(steps=0, num_examples=0)
    start = time.perf_counter()
    private = None
    try:
        private = privacy.attach(model, opt, plan.seed) if privacy is not None else None
        with seeded(device, plan.seed):
            batches = (
                privacy.batches(make_epoch, plan.steps, plan.seed) if privacy else cycle_epochs(make_epoch)
            )
            for k in range(plan.steps):
                for group in opt.param_groups:
                    group["lr"] = plan.schedule.lr(plan.step_offset + k)
                private.zero_grad() if private is not None else opt.zero_grad(set_to_none=True)
                step_loss = _accumulate(model, batches, loss_fn, cfg, result)
                if step_loss is None and private is not None:  # noise released all the same; no loss
                    private.noise_only_step()
                    result.steps += 1
                    continue
                _step(k, step_loss, opt, private, plist, cfg.max_grad_norm)
                result.losses.append(step_loss)  # type: ignore[arg-type]
                result.steps += 1
                if plan.on_step is not None:
                    plan.on_step(k, step_loss)  # type: ignore[arg-type]
    finally:
        if private is not None:
            private.detach()
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    result.seconds = time.perf_counter() - start
    return result, opt.state_dict()


def _train_only(model: nn.Module, trained: list[nn.Parameter]) -> dict[nn.Parameter, bool]:
    """Freeze every parameter of ``model`` but ``trained``; returns the flags to restore."""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    return flags


def _accumulate(
    model: nn.Module, batches: Iterator[Batch], loss_fn: LossFn, cfg: TrainConfig, result: LocalResult
) -> float | None:
    """Backward over ``cfg.grad_accum`` micro-batches (each loss / grad_accum); their mean loss, or None for
    an empty (Poisson) draw. Counts the examples into ``result``."""
    device = module_device(model)
    step_loss = 0.0
    for _ in range(cfg.grad_accum):
        batch = next(batches)
        if not batch:  # only a Poisson draw can be empty (DP-SGD, grad_accum = 1)
            return None
        with autocast(device, cfg.bf16):
            loss = loss_fn(model, to_device(batch, device))
        (loss / cfg.grad_accum).backward()
        step_loss += float(loss.detach()) / cfg.grad_accum
        result.num_examples += batch_size_of(batch)
    return step_loss


def _step(
    k: int,
    step_loss: float | None,
    opt: torch.optim.Optimizer,
    private: Any,
    plist: list[nn.Parameter],
    max_grad_norm: float | None,
) -> None:
    """One optimizer step after a finite loss: the private step (per-example clipping and noise replace the
    global clip), else clipping to ``max_grad_norm`` and ``opt.step()``."""
    if step_loss is None or not math.isfinite(step_loss):
        raise FloatingPointError(f"local loss became {step_loss} at step {k}; lower train.lr")
    if private is not None:
        private.step()
        return
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(plist, max_grad_norm)
    opt.step()


def loss_for(task: Any, *, per_example: bool = False) -> LossFn:
    """Training loss of the task's format (`fedsb.data.formats`): answer-only next-token loss for causal-LM
    formats, the head's cross-entropy for a classifier head; `per_example=True` (DP-SGD) a mean of
    per-example losses."""
    return task.format.loss(per_example=per_example)
