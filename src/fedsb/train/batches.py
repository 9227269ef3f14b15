"""Batches of the local training loop: their size, and epochs cycled without end (shared with DP-SGD)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

IGNORE_INDEX = -100  # label value ignored by the causal-LM loss (no prediction is scored there)

Batch = Mapping[str, torch.Tensor]


def batch_size_of(batch: Batch) -> int:
    """Examples in a batch (0 for the empty dict a Poisson draw of no example gives)."""
    return int(next(iter(batch.values())).shape[0]) if batch else 0


def cycle_epochs(make_epoch: Callable[[int], Iterable[Batch]]) -> Iterator[Batch]:
    """Batches of epoch 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        empty = True
        for batch in make_epoch(epoch):
            empty = False
            yield batch
        if empty:
            raise ValueError("the client's data loader yields no batches")
        epoch += 1
