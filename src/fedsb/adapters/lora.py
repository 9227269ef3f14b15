"""Plain LoRA for the baselines: y = W0 x + b + s * B (A x), PEFT layout and names (lora_A, lora_B).

A (r, n) starts Kaiming-uniform from an explicit generator (PEFT's default init), B (m, r) at zero; with
train_A=False (FFA-LoRA) A stays frozen at its seeded init.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsb.adapters.layer import AdapterLayer


class LoraLinear(AdapterLayer):
    """LoRA branch `lora_B(lora_A(x))` with fp32 factors: lora_A.weight (r, n), lora_B.weight (m, r)."""

    adapter_kind = "lora"

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        *,
        scaling: float = 0.5,
        dropout: float = 0.0,
        train_A: bool = True,
    ) -> None:
        super().__init__(base_layer, rank, scaling=scaling, dropout=dropout)
        r, m, n = self.rank, self.out_features, self.in_features
        self.lora_A = nn.Linear(n, r, bias=False, **self.factory_kwargs)  # weight (r, n)
        self.lora_B = nn.Linear(r, m, bias=False, **self.factory_kwargs)  # weight (m, r)
        nn.init.zeros_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.weight.requires_grad_(train_A)
        self.trainable_names = ("lora_A.weight", "lora_B.weight") if train_A else ("lora_B.weight",)

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """A ~ Kaiming-uniform(a = sqrt(5)) (PEFT's init: U(-1/sqrt(n), 1/sqrt(n))) from `generator`; B = 0."""
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.rand(self.lora_A.weight.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """B(A h): (..., n) -> (..., r) -> (..., m)."""
        return self.lora_B(self.lora_A(h))

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in fp32, shape (m, n)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
