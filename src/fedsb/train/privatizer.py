"""What the local training loop needs from a record-level privacy mechanism's client step (DP-SGD's
`fedsb.privacy.dpsgd.DPSGD`): its batches and a step that privatizes the gradients before updating."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import torch
from torch import nn

from fedsb.train.batches import Batch


class PrivateStep(Protocol):
    """The optimizer step of one local round under the mechanism (undone with `detach`)."""

    def zero_grad(self) -> None: ...

    def step(self) -> None:
        """Privatize the accumulated gradients (DP-SGD: clip per example, add noise), step, account."""
        ...

    def noise_only_step(self) -> None:
        """A step on a batch with no example (a Poisson draw): the noise is released all the same."""
        ...

    def detach(self) -> None: ...


class Privatizer(Protocol):
    """A client's privacy for one round: the batches it trains on and the step it attaches."""

    def batches(
        self, make_epoch: Callable[[int], Iterable[Batch]], steps: int, seed: int
    ) -> Iterator[Batch]: ...

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> PrivateStep: ...
