"""FedEx-LoRA (Singhal et al., ACL 2025): average A and B, and fold the residual into W0. Exact.

residual = sum_i p_i B_i A_i - mean(B) mean(A) (m x n per layer). Every party sets W0 <- W0 + s * residual
with the TRAINING scale s (the official aggregator forced s = 1; pitfall P8) and continues from
(mean B, mean A): W0 + s residual + s mean(B) mean(A) = W0 + s sum_i p_i B_i A_i. The residual reaches the
clients as the stacked factors (c r (m + n) per layer), so the download grows with the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedsb.adapters.inject import AdaptedModel
from fedsb.fed.base import Tensors
from fedsb.fed.lora_base import FoldingMethod, lora_names


class FedExLoRA(FoldingMethod):
    """Trains A and B; uploads both; folds the exact residual into W0; broadcasts means + stacked factors."""

    name: ClassVar[str] = "fedex"
    exact: ClassVar[bool] = True
    train_A: ClassVar[bool] = True

    def fold_delta(
        self, path: str, B_st: torch.Tensor, A_st: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """s * (B_st A_st - mean(B) mean(A)) in fp64: (m, sum r) @ (sum r, n) - (m, r) @ (r, n)."""
        a_name, b_name = lora_names(path)
        s = self.adapted.layers[path].scaling
        return s * (B_st @ A_st - state[b_name].double() @ state[a_name].double())

    def fold_inputs(self, means: Mapping[str, torch.Tensor]) -> Tensors:
        """mean(B), mean(A) of every layer: a client catching up on this round's fold needs them."""
        return {name: means[name] for p in self.adapted.layers for name in lora_names(p)}

    def next_state(self, adapted: AdaptedModel, means: Mapping[str, torch.Tensor], round: int) -> Tensors:
        return {k: v.to(torch.float32) for k, v in means.items()}
