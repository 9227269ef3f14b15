"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors, fold, re-initialize. Exact.

The server stacks B_st = [B_1 | ... | B_c], A_st = [p_1 A_1; ...; p_c A_c], so B_st A_st = sum_i p_i B_i A_i;
every party folds s * B_st A_st into W0 and starts the next round from a FRESH LoRA (B = 0, A drawn from
the shared seed of that round, so it never travels). Download: the stack, c r (m + n) per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from fedsb.adapters.inject import AdaptedModel
from fedsb.fed.base import Tensors
from fedsb.fed.lora_base import FoldingMethod, lora_names, seed_lora


class FLoRA(FoldingMethod):
    """Trains a fresh LoRA each round; uploads A_i, B_i; folds the weighted stack; re-initializes."""

    name: ClassVar[str] = "flora"
    exact: ClassVar[bool] = True
    train_A: ClassVar[bool] = True

    def fold_delta(
        self, path: str, B_st: torch.Tensor, A_st: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """s * B_st A_st in fp64: (m, sum r) @ (sum r, n)."""
        return self.adapted.layers[path].scaling * (B_st @ A_st)

    def _fresh(self, adapted: AdaptedModel, after_round: int) -> None:
        if after_round == 0:
            seed_lora(adapted, self.seed)  # the initial LoRA of `create`
        else:
            seed_lora(adapted, self.seed, "flora", after_round)

    def next_state(self, adapted: AdaptedModel, means: Mapping[str, torch.Tensor], round: int) -> Tensors:
        """Fresh LoRA layers (A from round `round`'s seed, B = 0) plus the averaged heads."""
        self._fresh(adapted, round)
        fresh = adapted.get_state()
        return {k: (fresh[k] if k in self._lora_keys() else v.to(torch.float32)) for k, v in means.items()}

    def _lora_keys(self) -> set[str]:
        return {name for p in self.adapted.layers for name in lora_names(p)}

    def download(self, since: int | None = None) -> Tensors:
        """Heads and the stacks of the folds after `since`; the fresh A is drawn locally from the shared seed."""
        return {k: v for k, v in super().download(since).items() if k not in self._lora_keys()}

    def received_state(self, adapted: AdaptedModel, state: Mapping[str, torch.Tensor], round: int) -> Tensors:
        self._fresh(adapted, round - 1)
        return {**adapted.get_state(), **state}
