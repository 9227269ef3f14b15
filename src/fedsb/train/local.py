"""The one local training loop, shared by every method, the simulator and the Flower client."""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsb.config import TrainConfig
from fedsb.data.tasks import IGNORE_INDEX
from fedsb.train.schedule import Schedule

Batch = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The HF model's own loss (`model(**batch).loss`)."""
    return model(**batch).loss


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens, from the last positions' logits only.

    Labels are -100 outside the answers. If the earliest labelled position in the batch is `first`, only
    logits of positions first-1 .. T-1 can matter, so the LM head runs on those T - first + 1 positions
    (`logits_to_keep`); with left-padded batches that is the answer length, not the sequence length. The
    value equals HF's loss: sum over labelled tokens / their count.
    """
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()  # (k, 1) columns holding any label
    if labelled.numel() == 0 or not _accepts_logits_to_keep(model):
        return model(**batch).loss
    first = max(1, int(labelled[0]))
    T = labels.shape[1]
    logits = model(**inputs, logits_to_keep=T - first + 1).logits  # (B, T - first + 1, V)
    pred = logits[:, :-1].float()  # (B, T - first, V): position t predicts token t + 1
    target = labels[:, first:]  # (B, T - first)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


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


def _cycle(make_epoch: Callable[[int], Iterable[Batch]]) -> Iterator[Batch]:
    epoch = 0
    while True:
        empty = True
        for batch in make_epoch(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError("the client's data loader yields no batches")
        epoch += 1


def train_local(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    make_epoch: Callable[[int], Iterable[Batch]],
    cfg: TrainConfig,
    *,
    steps: int,
    schedule: Schedule,
    step_offset: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    seed: int = 0,
    loss_fn: LossFn = causal_lm_loss,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[LocalResult, dict[str, Any]]:
    """Run `steps` optimizer steps on `params` (everything else frozen) and return (result, optimizer state).

    `make_epoch(e)` yields the batches of epoch e (its order must depend only on its own seed); batches are
    cycled until `steps * grad_accum` micro-batches were used. Loss per optimizer step is the mean of its
    micro-batch losses; gradients are clipped to `max_grad_norm` over the trained tensors; the learning
    rate of step k is `schedule.lr(step_offset + k)`. Dropout draws come from a generator forked from the
    global RNG and seeded with `seed`, so the caller's RNG state is untouched and runs are repeatable.
    """
    plist = list(params.values())
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in plist:
        p.requires_grad_(True)
    opt = make_optimizer(plist, cfg)
    if optimizer_state:
        opt.load_state_dict(optimizer_state)
    was_training = model.training
    model.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()
    result = LocalResult(steps=0, num_examples=0)
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            batches = _cycle(make_epoch)
            for k in range(steps):
                lr = schedule.lr(step_offset + k)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for _ in range(cfg.grad_accum):
                    batch = next(batches)
                    with autocast:
                        loss = loss_fn(model, batch)
                    (loss / cfg.grad_accum).backward()
                    step_loss += float(loss.detach()) / cfg.grad_accum
                    result.num_examples += int(next(iter(batch.values())).shape[0])
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"local loss became {step_loss} at step {k}; lower train.lr")
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(plist, cfg.max_grad_norm)
                opt.step()
                result.losses.append(step_loss)
                result.steps += 1
                if on_step is not None:
                    on_step(k, step_loss)
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    result.seconds = time.perf_counter() - start
    return result, opt.state_dict()


def loss_for(task: Any) -> LossFn:
    """Training loss: answer-only next-token loss for generation tasks, the head's cross-entropy otherwise."""
    return default_loss if task.kind == "classify" else causal_lm_loss
