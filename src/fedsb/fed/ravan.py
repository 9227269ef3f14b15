"""RAVAN (Raje et al., NeurIPS 2025, arXiv 2506.05568): multi-head LoRA-SB-style heads, exact like Fed-SB.

Each adapted layer computes W0 + c * sum_k s_k B_k H_k A_k (k = 1..h) with frozen B_k (m, r), A_k (r, n) and
trained H_k (r, r) and s_k. Client i sends G_k,i = s_k,i H_k,i, one r x r matrix per head: the product is
bilinear in (s, H), but the update is LINEAR in G, so the server's weighted mean G_k = sum_i p_i G_k,i gives
  W0 + c sum_k B_k G_k A_k = sum_i p_i (W0 + c sum_k s_k,i B_k H_k,i A_k)        (exact, any subset of clients)
and every client starts the next round from H_k = G_k, s_k = 1 (the same model). Averaging H and s
separately would not be exact (mean(s) mean(H) != mean(s H)). Per round: h r^2 numbers per layer each way;
the bases travel once (h r (m + n) per layer) with a fingerprint, as Fed-SB's do.

What we follow and what we could not verify (the paper's full text was not available to us; only its
abstract, the section-14 notes in docs/method.md, and FedLLM-Factory's third-party port `alg/ravan.py`):
- Follows the abstract: frozen B_k, A_k; trained H_k and s_k; clients upload s_k H_k; exact aggregation;
  same communication as one r x r core per head. The port agrees: the server averages s_k H_k weighted by
  N_i and resets s_k to 1.
- Heads: `ravan.heads` (4 by default, the port's default; the paper's choice per experiment is unverified).
  `adapter.rank` is the rank r of EACH head: h heads of rank r cost h r^2, as much as Fed-SB at rank
  r sqrt(h) (h = 4, r = 16 matches Fed-SB r = 32).
- Initialization of B_k, A_k: unverified. The abstract says the paper ablates it. Default
  `ravan.init=random`: one random orthonormal rank-h r basis split into h heads, so the heads span mutually
  orthogonal subspaces (the effective rank of the update can reach h r). `lora-xs` (top h r singular
  vectors of W0) and `lora-sb` (LoRA-SB's gradient SVD, whose R0 blocks become the starting H_k) are
  options. The port's un-normalized `randn` bases are not offered (their scale depends on m and n). H_k
  starts at 0 (as in the port) unless the init supplies R0 blocks; s_k starts at 1.
- Scaling: c = adapter.scaling (1.0 by default, as Fed-SB); s_k trained unless `ravan.train_scales=false`.
  Head selection for compute-limited clients (the paper's heterogeneity mechanism) is not implemented:
  every client trains every head.
- The bases are computed once by the server and sent with a fingerprint (like Fed-SB) rather than
  re-drawn by every party from a seed, so no client ever runs a QR or an SVD of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fedsb.adapters.inject import AdaptedModel, inject_adapters, resolve_ranks, resolve_targets
from fedsb.adapters.ravan import RavanLinear
from fedsb.errors import FedsbError
from fedsb.fed.base import SetupContext, Tensors
from fedsb.fed.fedsb import BasisMethod, server_basis
from fedsb.init.basis import Basis, ModuleFactors

if TYPE_CHECKING:
    from fedsb.config import RunConfig


def whole_heads(basis: Basis, heads: int) -> Basis:
    """Each module's basis trimmed to a multiple of `heads` columns (a capped rank may not divide)."""
    factors = {}
    for path, f in basis.factors.items():
        r = f.rank // heads
        if r == 0:
            raise FedsbError(
                field="ravan.heads",
                value=heads,
                what=f"exceeds the rank {f.rank} that layer {path} allows",
                fix=f"use ravan.heads <= {f.rank}, or adapt other layers",
            )
        k = r * heads
        factors[path] = ModuleFactors(B=f.B[:, :k].contiguous(), A=f.A[:k].contiguous(), R0=f.R0[:k, :k])
    return Basis(factors=factors, scaling=basis.scaling, info=dict(basis.info))


def attach_ravan(model: nn.Module, basis: Basis, cfg: RunConfig) -> AdaptedModel:
    """Wrap every module of `basis` with a `RavanLinear` of `ravan.heads` heads holding its B, A and, as
    the starting H_k, the diagonal blocks of its R0."""
    heads = cfg.ravan.heads
    modules = {path: model.get_submodule(path) for path in basis.factors}

    def make(path: str, base: nn.Module, rank: int) -> nn.Module:
        return RavanLinear(
            base,
            rank // heads,
            heads,
            scaling=basis.scaling,
            dropout=cfg.adapter.dropout,
            train_scales=cfg.ravan.train_scales,
        )

    adapted = inject_adapters(model, modules, make, basis.ranks, extra_trainable=cfg.adapter.extra_trainable)
    for path, layer in adapted.layers.items():
        f = basis.factors[path]
        layer.set_factors(f.B, f.A, f.R0)
    return adapted


def head_names(path: str, heads: int) -> list[str]:
    """Names of a layer's per-head tensors on the wire (and of its H_k parameters)."""
    return [f"{path}.ravan_H.{k}.weight" for k in range(heads)]


class Ravan(BasisMethod):
    """Trains H_k, s_k (and any head); uploads s_k H_k; the server averages them; bases sent once."""

    name: ClassVar[str] = "ravan"
    exact: ClassVar[bool] = True
    default_scaling: ClassVar[float] = 1.0
    payload_keys: ClassVar[tuple[str, str]] = ("ravan_B", "ravan_A")  # B (m, h r), A (h r, n)

    def __init__(self, adapted: AdaptedModel, basis: Basis, *, weighting: str = "examples") -> None:
        super().__init__(adapted, basis, weighting=weighting)
        self.state = self.client_upload(adapted)  # the global state lives in upload space: s_k H_k

    @classmethod
    def create(cls, model: nn.Module, ctx: SetupContext) -> Ravan:
        """The server computes one rank-h r basis (ravan.init) and splits it into h heads of rank r."""
        cfg = ctx.cfg
        heads = cfg.ravan.heads
        basis, report = server_basis(
            model,
            ctx,
            rank=cfg.adapter.rank * heads,
            init=cfg.ravan.init,
            scaling=cls.scaling_of(cfg),
            adjust=lambda b: whole_heads(b, heads),
        )
        method = cls(cls.attach(model, basis, cfg), basis, weighting=cfg.fed.weighting)
        method.init_report = report
        return method

    @classmethod
    def inject(cls, model: nn.Module, cfg: RunConfig) -> AdaptedModel:
        """`RavanLinear` layers with zero factors: `ravan.heads` heads of rank adapter.rank per layer."""
        heads = cfg.ravan.heads
        modules = resolve_targets(model, cfg.adapter.targets)
        ranks = resolve_ranks(modules, cfg.adapter.rank * heads, rank_overflow=cfg.adapter.rank_overflow)

        def make(path: str, base: nn.Module, rank: int) -> nn.Module:
            return RavanLinear(base, rank // heads, heads, scaling=cls.scaling_of(cfg),
                               dropout=cfg.adapter.dropout, train_scales=cfg.ravan.train_scales)  # fmt: skip

        return inject_adapters(model, modules, make, ranks, extra_trainable=cfg.adapter.extra_trainable)

    @classmethod
    def attach(cls, model: nn.Module, basis: Basis, cfg: RunConfig) -> AdaptedModel:
        """`RavanLinear` layers of `ravan.heads` heads holding each layer's B, A and starting H_k."""
        return attach_ravan(model, basis, cfg)

    # ---- between upload space (s_k H_k, heads) and the model's parameters (H_k, s_k, heads) ------------------
    def client_upload(self, adapted: AdaptedModel) -> Tensors:
        """s_k H_k per head of every layer, plus the trained heads' tensors as they are."""
        out: Tensors = {}
        layer_tensors = set()
        for path, layer in adapted.layers.items():  # on the CPU, like every communicated tensor
            products = [t.cpu() for t in layer.head_products()]
            out.update(zip(head_names(path, layer.heads), products, strict=True))
            layer_tensors.update(f"{path}.{suffix}" for suffix in layer.trainable_names)
        out.update(adapted.get_state([k for k in adapted.trainable_names() if k not in layer_tensors]))
        return out

    def _parameters_for(self, adapted: AdaptedModel, state: Mapping[str, torch.Tensor]) -> Tensors:
        """The model's trainable tensors that compute `state`: H_k = G_k, s_k = 1, heads as given."""
        params = {k: v.to(torch.float32) for k, v in state.items()}
        for path, layer in adapted.layers.items():
            if layer.ravan_s.weight.requires_grad:
                params[f"{path}.ravan_s.weight"] = torch.ones(layer.heads)
        return params

    def client_receive(self, adapted: AdaptedModel, payload: Mapping[str, torch.Tensor], round: int) -> None:
        adapted.set_state(self._parameters_for(adapted, payload))

    def apply(self, aggregate: Tensors, round: int) -> None:
        self.state = {k: v.clone() for k, v in aggregate.items()}
        self.install_global()

    def install_global(self) -> None:
        self.adapted.set_state(self._parameters_for(self.adapted, self.state))

    def untuned_state(self) -> Tensors:
        """H_k = 0 in every head (the model is W0), s_k = 1; heads as they are (model parameters)."""
        zero = {n for p, layer in self.adapted.layers.items() for n in head_names(p, layer.heads)}
        state = {k: (torch.zeros_like(v) if k in zero else v.clone()) for k, v in self.state.items()}
        return self._parameters_for(self.adapted, state)
