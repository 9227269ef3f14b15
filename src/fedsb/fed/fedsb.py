"""Fed-SB: clients train only R (r x r per layer); the server averages R, which is exact.

W0 + s B (sum_i p_i R_i) A = sum_i p_i (W0 + s B R_i A): R -> s B R A is linear and every party shares W0,
B, A and s, so FedAvg in R-space is FedAvg of the full weights for any weights, step counts and subset
of clients (Fed-SB, arXiv 2502.15436). Per round each client moves r^2 numbers per layer each way; B and
A travel once, with a fingerprint every update must match.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from fedsb.adapters.inject import (
    AdaptedModel,
    inject_adapters,
    lora_sb_factory,
    resolve_ranks,
    resolve_targets,
)
from fedsb.fed.base import FederatedMethod, InitReport, SetupContext, Tensors
from fedsb.init.basis import Basis, verified_basis
from fedsb.init.initialize import BasisSpec, GradientSource, attach_basis, compute_basis
from fedsb.init.integrity import live_fingerprint, verify_live_basis
from fedsb.init.svd import official_eta
from fedsb.seeding import derive_seed

if TYPE_CHECKING:
    from fedsb.config import RunConfig

log = logging.getLogger("fedsb.fed")


class BasisMethod(FederatedMethod):
    """A method whose frozen basis the server computes once and sends with a fingerprint (Fed-SB, RAVAN).

    `setup_payload` holds every layer's B and A under `payload_keys`; a Flower client rebuilds the method
    from it (`from_setup`, after checking the fingerprint) with the subclass's `attach`."""

    payload_keys: ClassVar[tuple[str, str]]

    def __init__(self, adapted: AdaptedModel, basis: Basis, *, weighting: str = "examples") -> None:
        super().__init__(adapted, weighting=weighting)
        self.basis = basis
        self._fingerprint = live_fingerprint(adapted)  # hashed from the attached B, A, once
        if self._fingerprint != basis.fingerprint:
            raise RuntimeError("the attached B and A differ from the basis they were attached from")

    @classmethod
    def attach(cls, model: nn.Module, basis: Basis, cfg: RunConfig) -> AdaptedModel:
        """Inject the method's layers built from `basis` (its R0 is the start; a received basis has R0 = 0)."""
        raise NotImplementedError

    @classmethod
    def from_setup(
        cls, model: nn.Module, cfg: RunConfig, setup: Mapping[str, torch.Tensor], fingerprint: str
    ) -> BasisMethod:
        """A client's copy from the server's B and A (checked against the announced fingerprint)."""
        b_key, a_key = cls.payload_keys
        basis = verified_basis(setup, cls.scaling_of(cfg), fingerprint, b_key=b_key, a_key=a_key)
        return cls(cls.attach(model, basis, cfg), basis, weighting=cfg.fed.weighting)

    @property
    def basis_fingerprint(self) -> str:
        """The server's reference: the hash of the B and A its model holds, taken right after attaching."""
        return self._fingerprint

    def client_fingerprint(self, adapted: AdaptedModel) -> str | None:
        """The hash of the B and A a client's model holds now (each client computes its own)."""
        return live_fingerprint(adapted)

    def verify_basis(self, before: str) -> None:
        verify_live_basis(self.adapted, self._fingerprint, before=before)

    def setup_payload(self) -> Tensors:
        """B (m, r) and A (r, n) of every adapted layer, sent once."""
        b_key, a_key = self.payload_keys
        out: Tensors = {}
        for path, f in self.basis.factors.items():
            out[f"{path}.{b_key}"] = f.B
            out[f"{path}.{a_key}"] = f.A
        return out


class FedSB(BasisMethod):
    """Trains R (and any head); uploads R_i; aggregates the weighted mean of R; broadcasts B, A once."""

    name: ClassVar[str] = "fedsb"
    exact: ClassVar[bool] = True
    default_scaling: ClassVar[float] = 1.0
    payload_keys: ClassVar[tuple[str, str]] = ("lora_sb_B", "lora_sb_A")

    @classmethod
    def create(cls, model: nn.Module, ctx: SetupContext) -> FedSB:
        """The server computes the basis once from the configured init data (or loads it when resuming)."""
        cfg = ctx.cfg
        basis, report = server_basis(
            model, ctx, rank=cfg.adapter.rank, init=cfg.init.method, scaling=cls.scaling_of(cfg)
        )
        method = cls(cls.attach(model, basis, cfg), basis, weighting=cfg.fed.weighting)
        method.init_report = report
        return method

    @classmethod
    def inject(cls, model: nn.Module, cfg: RunConfig) -> AdaptedModel:
        """LoRA-SB layers with zero factors at the configured targets and (capped) ranks."""
        modules = resolve_targets(model, cfg.adapter.targets)
        ranks = resolve_ranks(modules, cfg.adapter.rank, rank_overflow=cfg.adapter.rank_overflow)
        factory = lora_sb_factory(scaling=cls.scaling_of(cfg), dropout=cfg.adapter.dropout)
        return inject_adapters(model, modules, factory, ranks, extra_trainable=cfg.adapter.extra_trainable)

    @classmethod
    def attach(cls, model: nn.Module, basis: Basis, cfg: RunConfig) -> AdaptedModel:
        """`LoraSBLinear` layers (R = R0 from the basis; a received basis has R0 = 0)."""
        return attach_basis(
            model, basis, dropout=cfg.adapter.dropout, extra_trainable=cfg.adapter.extra_trainable
        )

    def untuned_state(self) -> Tensors:
        """R = 0 in every layer (B 0 A = 0, so the model is W0); heads as they are."""
        r_names = {f"{p}.lora_sb_R.weight" for p in self.adapted.layers}
        return {k: (torch.zeros_like(v) if k in r_names else v.clone()) for k, v in self.state.items()}


def server_basis(
    model: nn.Module,
    ctx: SetupContext,
    *,
    rank: int,
    init: str,
    scaling: float,
    adjust: Callable[[Basis], Basis] | None = None,
) -> tuple[Basis, InitReport]:
    """The server's one-time basis at `rank` by `init` (lora-sb: from the init data; lora-xs, random:
    data-free), loaded from `setup_dir/basis` when resuming, else computed, passed through `adjust` (RAVAN
    trims it to whole heads) and saved there with the init's description; and its report (eta, the init
    and its time)."""
    cfg = ctx.cfg
    data_init = init == "lora-sb"
    data_free = InitReport(note=f"data-free {init} init")
    basis_dir = ctx.setup_dir / "basis" if ctx.setup_dir else None
    if ctx.resume and basis_dir is not None and basis_dir.exists():
        basis = Basis.load(basis_dir)
    else:
        eta = cfg.init.eta
        if cfg.init.eta_rule == "official":
            batches = -(-ctx.data_info.get("pool_size", ctx.num_samples or 1) // cfg.init.batch_size)
            eta = official_eta(cfg.train.lr, cfg.train.warmup_ratio, batches, cfg.train.local_epochs or 1.0)
        t0 = time.perf_counter()
        if data_init and cfg.init.source == "federated":
            from fedsb.fed.federated_init import server_federated_basis

            basis = server_federated_basis(model, ctx, rank=rank, eta=eta, scaling=scaling)
        else:
            basis = compute_basis(
                model,
                BasisSpec.from_config(cfg, rank=rank, init=init, scaling=scaling, eta=eta),
                GradientSource(
                    batches=ctx.init_batches() if data_init and ctx.init_batches else None,
                    num_samples=ctx.num_samples if data_init else None,
                    loss_fn=ctx.loss_fn,
                    dropout_seed=derive_seed(cfg.seed, "basis-dropout"),
                ),
                generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "basis")),
            )
        if adjust is not None:
            basis = adjust(basis)
        done = {
            "eta": eta,
            "eta_rule": cfg.init.eta_rule,
            "method": init,
            "seconds": time.perf_counter() - t0,
        }
        basis.info.update((InitReport(used_data=True) if data_init else data_free).describe(ctx.data_info))
        basis.info.update(done)
        if basis_dir is not None:
            basis.save(basis_dir)
    keep = ("eta", "eta_rule", "method", "seconds", "federated_init")
    done = {k: basis.info[k] for k in keep if k in basis.info}
    return basis, (InitReport(used_data=True, basis=done) if data_init else replace(data_free, basis=done))
