"""What the LoRA baselines share: injecting seeded LoRA layers, and stacking clients' factors for folds.

Stacking (FLoRA; also FedEx-LoRA's exact residual): B_st = [B_1 | ... | B_c] (m x sum r_i) and
A_st = [p_1 A_1; ...; p_c A_c] (sum r_i x n), so B_st A_st = sum_i p_i B_i A_i exactly. The stack is what
the server sends every client so each can fold the same dense update into its frozen W0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from fedsb.adapters.inject import AdaptedModel, inject_adapters, resolve_ranks, resolve_targets
from fedsb.adapters.layer import weight_in_linear_layout
from fedsb.adapters.lora import LoraLinear
from fedsb.fed.base import FederatedMethod, SetupContext, Tensors, WeightedMean
from fedsb.seeding import derive_seed

FOLD_PREFIX = "fold/"


def lora_names(path: str) -> tuple[str, str]:
    """Trainable-tensor names of a LoRA layer's A (r, n) and B (m, r)."""
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def seed_lora(adapted: AdaptedModel, seed: int, *labels: object) -> None:
    """Re-initialize every LoRA layer: A from a stable per-module seed, B = 0 (identical on every party)."""
    for path, layer in adapted.layers.items():
        layer.reset(torch.Generator().manual_seed(derive_seed(seed, "lora-A", *labels, path)))


def attach_lora(model: nn.Module, ctx: SetupContext, *, scaling: float, train_A: bool) -> AdaptedModel:
    """Inject `LoraLinear` layers at the configured targets; A seeded per module, B = 0."""
    cfg = ctx.cfg
    modules = resolve_targets(model, cfg.adapter.targets)
    ranks = resolve_ranks(modules, cfg.adapter.rank, rank_overflow=cfg.adapter.rank_overflow)

    def make(path: str, base: nn.Module, rank: int) -> nn.Module:
        return LoraLinear(base, rank, scaling=scaling, dropout=cfg.adapter.dropout, train_A=train_A)

    adapted = inject_adapters(model, modules, make, ranks, extra_trainable=cfg.adapter.extra_trainable)
    seed_lora(adapted, cfg.seed)
    return adapted


class LoraMethod(FederatedMethod):
    """FedAvg of LoRA factors (and heads); subclasses choose what trains and what the server does."""

    default_scaling: ClassVar[float] = 0.5
    train_A: ClassVar[bool] = True

    def __init__(self, adapted: AdaptedModel, *, weighting: str = "examples", seed: int = 0) -> None:
        super().__init__(adapted, weighting=weighting)
        self.seed = seed

    @classmethod
    def create(cls, model: nn.Module, ctx: SetupContext) -> LoraMethod:
        adapted = attach_lora(model, ctx, scaling=cls.scaling_of(ctx.cfg), train_A=cls.train_A)
        ctx.info.update(num_samples=0, federated=True, note="LoRA: A seeded per module, B = 0; no init data")
        return cls(adapted, weighting=ctx.cfg.fed.weighting, seed=ctx.cfg.seed)

    def untuned_state(self) -> Tensors:
        """B = 0 in every layer (the model is W0, plus any folds); heads as they are."""
        b_names = {lora_names(p)[1] for p in self.adapted.layers}
        return {k: (torch.zeros_like(v) if k in b_names else v.clone()) for k, v in self.state.items()}


class StackingAggregator(WeightedMean):
    """A weighted mean of everything, plus the weighted stack of each layer's (B_i, A_i)."""

    def __init__(self, weighting: str, paths: list[str], uploads_A: bool = True) -> None:
        super().__init__(weighting)
        self.paths = paths
        self.clients: list[tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []
        self.uploads_A = uploads_A

    def add(self, tensors: Mapping[str, torch.Tensor], num_examples: int) -> None:
        super().add(tensors, num_examples)
        factors = {p: (tensors[lora_names(p)[1]], tensors[lora_names(p)[0]]) for p in self.paths}
        self.clients.append((self.weight_of(num_examples), factors))

    def result(self) -> Tensors:
        """The weighted means plus, per layer, `fold/<path>.B` = B_st (m, sum r) and `fold/<path>.A` = A_st
        (sum r, n) with A_i's rows scaled by p_i (fp64), so B_st A_st = sum_i p_i B_i A_i."""
        out = super().result()
        total = sum(w for w, _ in self.clients)
        for p in self.paths:
            out[f"{FOLD_PREFIX}{p}.B"] = torch.cat(
                [f[p][0].to(torch.float64) for _, f in self.clients], dim=1
            )
            out[f"{FOLD_PREFIX}{p}.A"] = torch.cat(
                [(w / total) * f[p][1].to(torch.float64) for w, f in self.clients], dim=0
            )
        return out


def split_stacks(
    tensors: Mapping[str, torch.Tensor], paths: list[str]
) -> tuple[Tensors, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(the non-fold tensors, path -> (B_st, A_st) for the layers whose stacks are present)."""
    state = {k: v for k, v in tensors.items() if not k.startswith(FOLD_PREFIX)}
    stacks = {
        p: (tensors[f"{FOLD_PREFIX}{p}.B"].double(), tensors[f"{FOLD_PREFIX}{p}.A"].double())
        for p in paths
        if f"{FOLD_PREFIX}{p}.B" in tensors
    }
    return state, stacks


class FoldingMethod(LoraMethod):
    """LoRA methods whose server folds a dense update into W0 every round (FedEx-LoRA, FLoRA).

    `apply` folds on the server's model and keeps the stacked factors as the next round's `fold/...`
    download; `client_receive` folds them into a client's own W0 unless that model already holds the fold
    (the in-process simulator's shared model does). Checkpoints hold the folded base weights themselves, so
    a resumed run continues from bit-identical W0.
    """

    def __init__(self, adapted: AdaptedModel, *, weighting: str = "examples", seed: int = 0) -> None:
        super().__init__(adapted, weighting=weighting, seed=seed)
        self.pending: Tensors = {}  # fold/<path>.B, fold/<path>.A of the last aggregation
        self.fold_round = 0  # the round whose fold `pending` carries

    def new_aggregator(self) -> StackingAggregator:
        return StackingAggregator(self.weighting, list(self.adapted.layers))

    def fold_delta(
        self, path: str, B_st: torch.Tensor, A_st: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The dense (m, n) update to fold for one layer, given its stack and the new global state."""
        raise NotImplementedError

    def _fold_all(
        self,
        stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        state: Mapping[str, torch.Tensor],
        adapted: AdaptedModel,
        round: int,
    ) -> None:
        for path, (B_st, A_st) in stacks.items():
            delta = self.fold_delta(path, B_st, A_st, state).to(torch.float32)
            layer = adapted.layers[path]
            layer.fold(delta)
            layer.fold_round = round

    def record_fold(self, stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], round: int) -> None:
        self.pending = {}
        for path, (B_st, A_st) in stacks.items():
            self.pending[f"{FOLD_PREFIX}{path}.B"] = B_st.to(torch.float32)
            self.pending[f"{FOLD_PREFIX}{path}.A"] = A_st.to(torch.float32)
        self.fold_round = round

    def download(self) -> Tensors:
        return {**super().download(), **{k: v.clone() for k, v in self.pending.items()}}

    def apply(self, aggregate: Tensors, round: int) -> None:
        """Fold round `round`'s dense update into W0, keep the stack for the next download, set the state."""
        means, stacks = split_stacks(aggregate, list(self.adapted.layers))
        self._fold_all(stacks, means, self.adapted, round)
        self.record_fold(stacks, round)
        self.state = self.next_state(self.adapted, means, round)
        self.adapted.set_state(self.state)

    def next_state(self, adapted: AdaptedModel, means: Mapping[str, torch.Tensor], round: int) -> Tensors:
        """The global trainable state after round `round`'s fold (runs on the server and on clients)."""
        raise NotImplementedError

    def client_receive(self, adapted: AdaptedModel, payload: Mapping[str, torch.Tensor], round: int) -> None:
        """Fold the last round's stack unless this model already holds it, then install the global state."""
        state, stacks = split_stacks(payload, list(adapted.layers))
        state = {k: v.to(torch.float32) for k, v in state.items()}
        if stacks and any(layer.fold_round < round - 1 for layer in adapted.layers.values()):
            self._fold_all(stacks, state, adapted, round - 1)
        adapted.set_state(self.received_state(adapted, state, round))

    def received_state(self, adapted: AdaptedModel, state: Mapping[str, torch.Tensor], round: int) -> Tensors:
        """The full trainable state a client trains round `round` from, given what was downloaded."""
        return dict(state)

    def state_tensors(self) -> Tensors:
        """Global state, the folded base weights (W0 changed!), the pending stack and its round."""
        out = super().state_tensors()
        if self.fold_round > 0:
            for path, layer in self.adapted.layers.items():
                out[f"base/{path}"] = weight_in_linear_layout(layer.base_layer).detach().clone()
        out.update({f"pending/{k}": v.clone() for k, v in self.pending.items()})
        out["meta/fold_round"] = torch.tensor([self.fold_round], dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.fold_round = int(tensors["meta/fold_round"][0]) if "meta/fold_round" in tensors else 0
        for path, layer in self.adapted.layers.items():
            if f"base/{path}" in tensors:
                weight_in_linear_layout(layer.base_layer).copy_(tensors[f"base/{path}"])
            layer.fold_round = self.fold_round
        self.pending = {
            k.removeprefix("pending/"): v.clone() for k, v in tensors.items() if k.startswith("pending/")
        }
        super().load_state_tensors({k: v for k, v in tensors.items() if k in self.state})
