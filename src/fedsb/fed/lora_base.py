"""What the LoRA baselines share: injecting seeded LoRA layers, and stacking clients' factors for folds.

Stacking (FLoRA; also FedEx-LoRA's exact residual): B_st = [B_1 | ... | B_c] (m x sum r_i) and
A_st = [p_1 A_1; ...; p_c A_c] (sum r_i x n), so B_st A_st = sum_i p_i B_i A_i exactly. The stack is what
the server sends every client so each can fold the same dense update into its frozen W0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fedsb.adapters.inject import AdaptedModel, inject_adapters, resolve_ranks, resolve_targets
from fedsb.adapters.layer import weight_in_linear_layout
from fedsb.adapters.lora import LoraLinear
from fedsb.errors import FedsbError
from fedsb.fed.base import FederatedMethod, InitReport, SetupContext, Tensors, WeightedMean
from fedsb.seeding import derive_seed

if TYPE_CHECKING:
    from fedsb.config import RunConfig

FOLD_PREFIX = "fold/"


def lora_names(path: str) -> tuple[str, str]:
    """Trainable-tensor names of a LoRA layer's A (r, n) and B (m, r)."""
    return f"{path}.lora_A.weight", f"{path}.lora_B.weight"


def seed_lora(adapted: AdaptedModel, seed: int, *labels: object) -> None:
    """Re-initialize every LoRA layer: A from a stable per-module seed, B = 0 (identical on every party)."""
    for path, layer in adapted.layers.items():
        layer.reset(torch.Generator().manual_seed(derive_seed(seed, "lora-A", *labels, path)))


def inject_lora(model: nn.Module, cfg: RunConfig, *, scaling: float, train_A: bool) -> AdaptedModel:
    """`LoraLinear` layers (A = B = 0) at the configured targets and (capped) ranks."""
    modules = resolve_targets(model, cfg.adapter.targets)
    ranks = resolve_ranks(modules, cfg.adapter.rank, rank_overflow=cfg.adapter.rank_overflow)

    def make(path: str, base: nn.Module, rank: int) -> nn.Module:
        return LoraLinear(base, rank, scaling=scaling, dropout=cfg.adapter.dropout, train_A=train_A)

    return inject_adapters(model, modules, make, ranks, extra_trainable=cfg.adapter.extra_trainable)


def attach_lora(model: nn.Module, ctx: SetupContext, *, scaling: float, train_A: bool) -> AdaptedModel:
    """Inject `LoraLinear` layers at the configured targets; A seeded per module, B = 0."""
    adapted = inject_lora(model, ctx.cfg, scaling=scaling, train_A=train_A)
    seed_lora(adapted, ctx.cfg.seed)
    return adapted


class LoraMethod(FederatedMethod):
    """FedAvg of LoRA factors (and heads); subclasses choose what trains and what the server does."""

    default_scaling: ClassVar[float] = 0.5
    train_A: ClassVar[bool] = True

    def __init__(self, adapted: AdaptedModel, *, weighting: str = "examples", seed: int = 0) -> None:
        super().__init__(adapted, weighting=weighting)
        self.seed = seed

    @classmethod
    def inject(cls, model: nn.Module, cfg: RunConfig) -> AdaptedModel:
        return inject_lora(model, cfg, scaling=cls.scaling_of(cfg), train_A=cls.train_A)

    @classmethod
    def create(cls, model: nn.Module, ctx: SetupContext) -> LoraMethod:
        adapted = attach_lora(model, ctx, scaling=cls.scaling_of(ctx.cfg), train_A=cls.train_A)
        method = cls(adapted, weighting=ctx.cfg.fed.weighting, seed=ctx.cfg.seed)
        method.init_report = InitReport(note="LoRA: A seeded per module, B = 0; no init data")
        return method

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


@dataclass
class Fold:
    """One round's dense update of W0 as every party computes it: per layer the stack (B_st, A_st), and the
    state tensors `fold_delta` reads (FedEx-LoRA: that round's mean factors; FLoRA: none)."""

    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    inputs: Tensors = field(default_factory=dict)

    def tensors(self, prefix: str, *, with_inputs: bool) -> Tensors:
        """`<prefix><path>.B`, `<prefix><path>.A` (and `<prefix>in/<name>`) as one flat mapping."""
        out: Tensors = {}
        for path, (B, A) in self.stacks.items():
            out[f"{prefix}{path}.B"], out[f"{prefix}{path}.A"] = B.clone(), A.clone()
        if with_inputs:
            out.update({f"{prefix}in/{k}": v.clone() for k, v in self.inputs.items()})
        return out

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Inverse of `tensors` for one key without its prefix."""
        if key.startswith("in/"):
            self.inputs[key.removeprefix("in/")] = tensor
            return
        path, which = key.rsplit(".", 1)
        B, A = self.stacks.get(path, (None, None))
        self.stacks[path] = (tensor, A) if which == "B" else (B, tensor)  # type: ignore[assignment]


_OLDER_FOLD = re.compile(r"r(\d+)/(.+)")


def split_folds(payload: Mapping[str, torch.Tensor], round: int) -> tuple[Tensors, dict[int, Fold]]:
    """A download for round `round` as (the state, round -> fold). `fold/<path>.B|A` is the fold of round
    `round - 1` (its inputs are the state itself); `fold/r<k>/...` the folds of earlier rounds k, with their
    inputs under `fold/r<k>/in/<name>` (what a client that missed rounds needs to catch up)."""
    state: Tensors = {}
    folds: dict[int, Fold] = {}
    for key, tensor in payload.items():
        if not key.startswith(FOLD_PREFIX):
            state[key] = tensor
            continue
        rest = key.removeprefix(FOLD_PREFIX)
        older = _OLDER_FOLD.fullmatch(rest)
        k, rest = (int(older.group(1)), older.group(2)) if older else (round - 1, rest)
        folds.setdefault(k, Fold()).add(rest, tensor)
    return state, folds


def _held(adapted: AdaptedModel) -> int:
    """The last round whose fold every layer of `adapted` holds."""
    return min((layer.fold_round for layer in adapted.layers.values()), default=0)


class FoldingMethod(LoraMethod):
    """LoRA methods whose server folds a dense update into W0 every round (FedEx-LoRA, FLoRA).

    Every party must apply every round's fold, in order. The server keeps each round's `Fold` until every
    client is known to hold it (`release_history`); a download `since` round j carries the folds of rounds
    j+1 .. t-1, the last one as `fold/<path>.B|A`, older ones under `fold/r<k>/` with their inputs, so a
    client that missed rounds catches up (and the ledger counts those bytes). `client_receive` applies the
    folds its model does not hold yet (a repeat or the simulator's shared model applies none) and refuses,
    with a `FedsbError`, a download that would leave its W0 stale. Checkpoints hold the folded base weights
    themselves and the folds still needed, so a resumed run continues from bit-identical W0.
    """

    def __init__(self, adapted: AdaptedModel, *, weighting: str = "examples", seed: int = 0) -> None:
        super().__init__(adapted, weighting=weighting, seed=seed)
        self.folds: dict[int, Fold] = {}  # round -> its fold, while some client may still need it
        self.fold_round = 0  # the last round folded into the server's W0

    def new_aggregator(self) -> StackingAggregator:
        return StackingAggregator(self.weighting, list(self.adapted.layers))

    def fold_delta(
        self, path: str, B_st: torch.Tensor, A_st: torch.Tensor, state: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The dense (m, n) update to fold for one layer, given its stack and the new global state."""
        raise NotImplementedError

    def fold_inputs(self, means: Mapping[str, torch.Tensor]) -> Tensors:
        """The tensors of a round's new global state that `fold_delta` reads (none by default)."""
        return {}

    def _fold_all(
        self,
        stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        state: Mapping[str, torch.Tensor],
        adapted: AdaptedModel,
        round: int,
    ) -> None:
        """Fold round `round` into every layer of `adapted` that does not hold it yet."""
        for path, (B_st, A_st) in stacks.items():
            layer = adapted.layers[path]
            if layer.fold_round >= round:
                continue
            delta = self.fold_delta(path, B_st.double(), A_st.double(), state).to(torch.float32)
            layer.fold(delta)
            layer.fold_round = round

    def download(self, since: int | None = None) -> Tensors:
        """The global state plus every fold after round `since` (None: only the last round's fold)."""
        out = super().download()
        since = self.fold_round - 1 if since is None else since
        for k in range(max(since, 0) + 1, self.fold_round + 1):
            if k not in self.folds:
                raise RuntimeError(f"the fold of round {k} was released, but a client still needs it")
            latest = k == self.fold_round
            out.update(
                self.folds[k].tensors(
                    FOLD_PREFIX if latest else f"{FOLD_PREFIX}r{k}/", with_inputs=not latest
                )
            )
        return out

    def release_history(self, applied_by_all: int) -> None:
        """Forget the folds of rounds <= `applied_by_all` (every client holds them); keep the last one."""
        for k in [k for k in self.folds if k <= applied_by_all and k != self.fold_round]:
            del self.folds[k]

    def apply(self, aggregate: Tensors, round: int) -> None:
        """Fold round `round`'s dense update into W0, keep the fold for the downloads, set the state."""
        means, stacks = split_stacks(aggregate, list(self.adapted.layers))
        self._fold_all(stacks, means, self.adapted, round)
        self.folds[round] = Fold(
            {p: (B.to(torch.float32), A.to(torch.float32)) for p, (B, A) in stacks.items()},
            {k: v.to(torch.float32).clone() for k, v in self.fold_inputs(means).items()},
        )
        self.fold_round = round
        self.state = self.next_state(self.adapted, means, round)
        self.adapted.set_state(self.state)

    def next_state(self, adapted: AdaptedModel, means: Mapping[str, torch.Tensor], round: int) -> Tensors:
        """The global trainable state after round `round`'s fold (runs on the server and on clients)."""
        raise NotImplementedError

    def client_receive(self, adapted: AdaptedModel, payload: Mapping[str, torch.Tensor], round: int) -> None:
        """Apply, in order, every downloaded fold this model does not hold, then install the global state."""
        state, folds = split_folds(payload, round)
        state = {k: v.to(torch.float32) for k, v in state.items()}
        for k in sorted(folds):
            held = _held(adapted)
            if k > held + 1:  # a gap: folding k now would skip round held + 1 for good
                break
            self._fold_all(folds[k].stacks, state if k == round - 1 else folds[k].inputs, adapted, k)
        held = _held(adapted)
        if held < round - 1:
            raise FedsbError(
                field=f"download for round {round}",
                value=f"folds of rounds {sorted(folds)}",
                what=f"leaves this client's W0 stale: it holds the folds up to round {held}, round {round} "
                f"trains on W0 after round {round - 1}",
                fix="send every fold after the client's last round (download(since=...)), or rebuild the "
                "client from the server's checkpoint",
            )
        adapted.set_state(self.received_state(adapted, state, round))

    def received_state(self, adapted: AdaptedModel, state: Mapping[str, torch.Tensor], round: int) -> Tensors:
        """The full trainable state a client trains round `round` from, given what was downloaded."""
        return dict(state)

    def state_tensors(self) -> Tensors:
        """Global state, the folded base weights (W0 changed!), the folds still needed and the last round."""
        out = super().state_tensors()
        if self.fold_round > 0:
            for path, layer in self.adapted.layers.items():
                out[f"base/{path}"] = weight_in_linear_layout(layer.base_layer).detach().clone()
        for k, fold in self.folds.items():
            out.update(fold.tensors(f"folds/{k}/", with_inputs=True))
        out["meta/fold_round"] = torch.tensor([self.fold_round], dtype=torch.int64)
        return out

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.fold_round = int(tensors["meta/fold_round"][0]) if "meta/fold_round" in tensors else 0
        for path, layer in self.adapted.layers.items():
            if f"base/{path}" in tensors:
                weight_in_linear_layout(layer.base_layer).copy_(tensors[f"base/{path}"])
            layer.fold_round = self.fold_round
        self.folds = {}
        for key, tensor in tensors.items():
            if key.startswith("folds/"):
                k, rest = key.removeprefix("folds/").split("/", 1)
                self.folds.setdefault(int(k), Fold()).add(rest, tensor.clone())
            elif key.startswith(f"pending/{FOLD_PREFIX}"):  # checkpoints before fold histories
                self.folds.setdefault(self.fold_round, Fold()).add(key.split("/", 2)[2], tensor.clone())
        super().load_state_tensors({k: v for k, v in tensors.items() if k in self.state})
