"""Training losses: the model's own loss, answer-only next-token cross-entropy (token-pooled, or a mean of
per-example means for DP-SGD)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedsb.train.batches import IGNORE_INDEX, Batch

__all__ = ["LossFn", "causal_lm_loss", "default_loss", "per_example_causal_lm_loss"]

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def default_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The HF model's own loss (`model(**batch).loss`)."""
    return model(**batch).loss


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _answer_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred (B, K, V) fp32, target (B, K)): next-token logits and labels over the answer window.

    Labels are -100 outside the answers. If the earliest labelled position in the batch is `first`, only
    logits of positions first-1 .. T-1 can matter, so the LM head runs on those T - first + 1 positions
    (`logits_to_keep`); with left-padded batches that is the answer length, not the sequence length.
    """
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()  # (k, 1) columns holding any label
    first = max(1, int(labelled[0])) if labelled.numel() else 1
    T = labels.shape[1]
    if _accepts_logits_to_keep(model):
        logits = model(**inputs, logits_to_keep=T - first + 1).logits  # (B, T - first + 1, V)
    else:
        logits = model(**inputs).logits[:, first - 1 :]  # (B, T - first + 1, V)
    return logits[:, :-1].float(), labels[:, first:]  # position t predicts token t + 1


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over all labelled (answer) tokens of the batch (HF's loss)."""
    if not (batch["labels"] != IGNORE_INDEX).any():
        return model(**batch).loss
    pred, target = _answer_logits(model, batch)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)


def per_example_causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """mean_i [ sum_t CE_it m_it / max(1, sum_t m_it) ]: each example's own token mean, then the batch mean.

    DP-SGD needs this form: the batch loss is a mean of per-example losses, so each example's gradient
    depends on that example alone (HF's token-pooled loss couples the examples of a batch).
    """
    pred, target = _answer_logits(model, batch)  # (B, K, V), (B, K)
    mask = target != IGNORE_INDEX  # (B, K)
    ce = F.cross_entropy(pred.transpose(1, 2), target.clamp(min=0), reduction="none")  # (B, K)
    per_example = (ce * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_example.mean()
