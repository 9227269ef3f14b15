"""Full fine-tuning with FedAvg of every weight: the (expensive) reference where a model is small enough.

Exact by definition (the average of the client models is what FedAvg computes), and each round moves the
whole model each way. With partition.num_clients=1 it is centralized full fine-tuning, an upper bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from torch import nn

from fedsb.adapters.inject import AdaptedModel
from fedsb.fed.base import FederatedMethod, InitReport, SetupContext

if TYPE_CHECKING:
    from fedsb.config import RunConfig


class FullFineTune(FederatedMethod):
    """Trains and averages all parameters (tied weights once)."""

    name: ClassVar[str] = "full"
    exact: ClassVar[bool] = True

    @classmethod
    def inject(cls, model: nn.Module, cfg: RunConfig) -> AdaptedModel:
        """No adapter: every module trains."""
        adapted = AdaptedModel(model=model, layers={}, extra_modules=dict(model.named_children()))
        adapted.set_trainable()
        return adapted

    @classmethod
    def create(cls, model: nn.Module, ctx: SetupContext) -> FullFineTune:
        method = cls(cls.inject(model, ctx.cfg), weighting=ctx.cfg.fed.weighting)
        method.init_report = InitReport(note="full fine-tuning: no adapter, no init data")
        return method
