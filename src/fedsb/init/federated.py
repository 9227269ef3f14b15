"""Federated, private LoRA-SB initialization (init.source=federated, method.md 13.2): no party but a client
sees its data.

Each sampled client i computes G_i = sum_j clip_C(g_ij) over its own n_i examples, g_ij the full
fine-tuning gradient of example j on every target weight (weight orientation, m x n per module), clipped
jointly over all modules to norm C when DP is on (privacy.mode=sample; no clipping otherwise). It releases
linear functions of G_i, each with N(0, (sigma C)^2) noise per entry from the secure noise source when DP is
on, in one of two exchanges (init.exchange):

  dense:   the noised G_i once (m n per module). The server sums them, forms dW = -eta sign(sum_i G_i) and
           takes its truncated SVD: the LoRA-SB basis of the union of the clients' data (without noise,
           exactly the pooled basis).
  sketch:  a randomized SVD of the sum, linear in each client's part (Halko et al.): with Omega (n, k)
           orthonormal columns from a shared seed (never sent), k = rank + init.oversample,
             exchange 1: Y_i = G_i Omega (m, k);     server: Q = orth(sum_i Y_i) (m, k), broadcast
             exchange 2: Z_i = Q^T G_i (k, n);       server: Z = sum_i Z_i = Q^T G,  Z = U_z S V^T,
           so G ~ (Q U_z) S V^T: the sum of sketches is the sketch of the sum, and SecAgg-style secure
           sums would suffice. k (m + n) numbers per module per client. The server never holds G, so it
           cannot take sign(G) (sign is not linear: sum_i sign(G_i) != sign(sum_i G_i)); the sketch basis is
           the truncated SVD of the UN-SIGNED step dW = -c G, c = eta sqrt(m n) / ||Z||_F (dW's RMS entry
           is eta, as for the sign step, with ||G||_F estimated by the sketch's captured ||Q^T G||_F).

B = the left singular vectors of dW (m, r), A = the right ones (r, n), R0 = S_r / s, as `lora_sb_basis`.
Sensitivity: Omega and Q have orthonormal columns, so ||g Omega||_F <= ||g||_F and ||Q^T g||_F <= ||g||_F:
every release has L2 sensitivity C per example, and a client's account composes 1 (dense) or 2 (sketch)
Gaussian releases with noise multiplier init.noise_multiplier at sampling rate 1 (`fedsb.privacy.init_charge`).
Everything the server does after the releases is post-processing. Each exchange recomputes G_i (the
per-example gradients are deterministic: dropout seeded), so a client keeps nothing between exchanges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.adapters.layer import linear_dims
from fedsb.init.basis import Basis, ModuleFactors, lora_sb_basis
from fedsb.init.exchange import exchange_lines, releases_per_client, sketch_width
from fedsb.init.grad_estimate import Batch, LossFn, batch_size, estimate_gradients
from fedsb.init.svd import random_orthonormal
from fedsb.models.quantize import is_quantized
from fedsb.privacy.noise import noise_source

Tensors = dict[str, torch.Tensor]
EXCHANGES = ("sketch", "dense")


@dataclass
class InitPrivacy:
    """Per-example clip norm C and noise multiplier sigma of the init's releases (N(0, (sigma C)^2))."""

    clip_norm: float
    noise_multiplier: float
    reproducible: bool = False
    seed: int = 0


@dataclass
class InitClient:
    """One sampled client's own data: `batches()` yields its examples, of which the first n_i are used."""

    client_id: str
    batches: Callable[[], Iterable[Batch]]
    num_samples: int


def single_examples(batches: Iterable[Batch], n: int) -> Iterator[dict[str, torch.Tensor]]:
    """The first n examples of `batches`, each as a batch of one (every tensor sliced along dim 0)."""
    seen = 0
    for batch in batches:
        for j in range(batch_size(batch)):
            if seen >= n:
                return
            yield {
                k: (v[j : j + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                for k, v in batch.items()
            }
            seen += 1
    if seen < n:
        raise ValueError(f"the client holds {seen} examples, fewer than the {n} asked for")


class GradientClient:
    """A client's side of the protocol: its clipped gradient sum and its noised releases."""

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        client: InitClient,
        *,
        loss_fn: LossFn,
        privacy: InitPrivacy | None,
        dropout_seed: int,
    ) -> None:
        self.model, self.modules, self.client = model, dict(modules), client
        self.loss_fn, self.privacy, self.dropout_seed = loss_fn, privacy, dropout_seed
        self.weights = {p: m.weight for p, m in self.modules.items() if not is_quantized(m)}
        self.quantized = {p: m for p, m in self.modules.items() if is_quantized(m)}

    def gradient_sum(self) -> Tensors:
        """G_i = sum_j clip_C(g_ij) per module (m, n) in fp32 on the CPU (no clipping without DP)."""
        total: Tensors = {}
        examples = single_examples(self.client.batches(), self.client.num_samples)
        for j, example in enumerate(examples):
            g = estimate_gradients(
                self.model,
                self.weights,
                [example],
                quantized=self.quantized,
                num_samples=1,
                loss_fn=self.loss_fn,
                seed=self.dropout_seed + j,
            )
            g = {p: (t.T if isinstance(self.modules[p], Conv1D) else t).cpu() for p, t in g.items()}  # (m, n)
            if self.privacy is not None:
                norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g.values()))
                factor = min(1.0, self.privacy.clip_norm / norm) if norm > 0 else 1.0
                g = {p: t * factor for p, t in g.items()}
            for p, t in g.items():
                total[p] = total[p] + t if p in total else t.clone()
        return total

    def release(self, tensors: Mapping[str, torch.Tensor], exchange: int) -> Tensors:
        """What leaves the client: the tensors plus N(0, (sigma C)^2) per entry under DP."""
        if self.privacy is None:
            return dict(tensors)
        p = self.privacy
        noise = noise_source(
            reproducible=p.reproducible,
            seed=p.seed,
            purpose=("federated-init", self.client.client_id, exchange),
        )
        std = p.noise_multiplier * p.clip_norm
        return {k: t + noise.gaussian(t.shape, std=std, dtype=torch.float32) for k, t in tensors.items()}

    def dense(self) -> Tensors:
        return self.release(self.gradient_sum(), 0)

    def sketch(self, omega: Mapping[str, torch.Tensor]) -> Tensors:
        """Exchange 1: Y_i = G_i Omega, (m, n) @ (n, k) -> (m, k) per module."""
        return self.release({p: g @ omega[p] for p, g in self.gradient_sum().items()}, 1)

    def project(self, q: Mapping[str, torch.Tensor]) -> Tensors:
        """Exchange 2: Z_i = Q^T G_i, (k, m) @ (m, n) -> (k, n) per module."""
        return self.release({p: q[p].T @ g for p, g in self.gradient_sum().items()}, 2)

    def answer(self, exchange: int, shared: Mapping[str, torch.Tensor]) -> Tensors:
        """The release of `exchange` (0: dense G_i; 1: G_i Omega with `shared` = Omega; 2: Q^T G_i with
        `shared` = Q): what an `InitParties` transport asks of each client."""
        if exchange == DENSE:
            return self.dense()
        return self.sketch(shared) if exchange == SKETCH else self.project(shared)


#: the exchanges a client answers (`GradientClient.answer`)
DENSE, SKETCH, PROJECT = 0, 1, 2


class InitParties(Protocol):
    """How the server reaches the init's clients: in process (`LocalParties`) or over Flower
    (`fedsb.flower.init_parties`). `releases(exchange, shared)` returns every client's release, in the
    order of the protocol's clients; `shared` is Omega (exchange 1: a party that draws it from the shared
    seed itself need not send it), Q (exchange 2) or empty (dense)."""

    def releases(self, exchange: int, shared: Mapping[str, torch.Tensor]) -> list[Tensors]: ...


class LocalParties:
    """The clients as `GradientClient`s on this process's model, one after another (the simulator)."""

    def __init__(self, parties: list[GradientClient]) -> None:
        self.parties = parties

    def releases(self, exchange: int, shared: Mapping[str, torch.Tensor]) -> list[Tensors]:
        return [party.answer(exchange, shared) for party in self.parties]


# ---- the server's side ------------------------------------------------------------------------------------
def sum_releases(releases: Iterable[Mapping[str, torch.Tensor]]) -> Tensors:
    """sum_i T_i per name, accumulated in float64, returned in fp32."""
    total: dict[str, torch.Tensor] = {}
    for r in releases:
        for k, t in r.items():
            total[k] = total[k] + t.double() if k in total else t.double().clone()
    return {k: v.float() for k, v in total.items()}


def sketch_matrices(
    shapes: Mapping[str, tuple[int, int]],
    ranks: Mapping[str, int],
    oversample: int,
    generator: torch.Generator,
) -> Tensors:
    """Omega per module: (n, k) with orthonormal columns, from the shared seed (every party draws the same)."""
    return {
        p: random_orthonormal(n, sketch_width(ranks[p], oversample, (m, n)), generator)
        for p, (m, n) in shapes.items()
    }


def range_bases(y: Mapping[str, torch.Tensor]) -> Tensors:
    """Q = orth(Y) per module, (m, k) (Householder QR)."""
    return {p: torch.linalg.qr(t)[0].contiguous() for p, t in y.items()}


def sketch_basis(
    q: Mapping[str, torch.Tensor],
    z: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    *,
    eta: float,
    scaling: float,
) -> Basis:
    """B, A, R0 from Q (m, k) and Z = Q^T G (k, n): the truncated SVD of dW = -c G ~ -c Q Z (module docstring)."""
    factors = {}
    for p, zp in z.items():
        m, n, r = q[p].shape[0], zp.shape[1], ranks[p]
        Uz, S, Vh = torch.linalg.svd(zp, full_matrices=False)  # (k, k), (k,), (k, n)
        energy = float(zp.norm())
        c = eta * math.sqrt(m * n) / energy if energy > 0 else 0.0
        B = -(q[p] @ Uz[:, :r])  # (m, r): the minus makes s B R0 A ~ -c G (a descent step)
        factors[p] = ModuleFactors(
            B=B.contiguous(), A=Vh[:r].contiguous(), R0=torch.diag(c * S[:r]) / scaling
        )
    return Basis(
        factors=factors, scaling=scaling, info={"init": "lora-sb", "eta": eta, "svd": "federated-sketch"}
    )


@dataclass
class FederatedInit:
    """The protocol's settings (init.exchange, the SVD settings, eta) and its clients."""

    exchange: str
    eta: float
    scaling: float = 1.0
    svd: str = "exact"
    oversample: int = 10
    power_iters: int = 4
    privacy: InitPrivacy | None = None


def federated_basis(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    ranks: Mapping[str, int],
    clients: list[InitClient],
    spec: FederatedInit,
    *,
    loss_fn: LossFn,
    generator: torch.Generator,
    dropout_seed: int = 0,
    parties: InitParties | None = None,
) -> Basis:
    """Run the exchanges with `clients` through `parties` (default: in process, one after another) and
    return the basis; its info holds what each exchange moved (`exchange_lines`) and who took part."""
    if parties is None:
        parties = LocalParties(
            [
                GradientClient(
                    model, modules, c, loss_fn=loss_fn, privacy=spec.privacy, dropout_seed=dropout_seed
                )
                for c in clients
            ]
        )
    shapes = {p: linear_dims(m) for p, m in modules.items()}  # (m, n)
    if spec.exchange == "dense":
        total = sum_releases(parties.releases(DENSE, {}))
        basis = lora_sb_basis(
            total, ranks, eta=spec.eta, scaling=spec.scaling, svd=spec.svd, oversample=spec.oversample,
            power_iters=spec.power_iters, generator=generator,
        )  # fmt: skip
    else:
        omega = sketch_matrices(shapes, ranks, spec.oversample, generator)
        q = range_bases(sum_releases(parties.releases(SKETCH, omega)))
        z = sum_releases(parties.releases(PROJECT, q))
        basis = sketch_basis(q, z, ranks, eta=spec.eta, scaling=spec.scaling)
    widths = {p: sketch_width(ranks[p], spec.oversample, s) for p, s in shapes.items()}
    basis.info["federated_init"] = federated_info(clients, spec, shapes, widths)
    return basis


def federated_info(
    clients: list[InitClient],
    spec: FederatedInit,
    shapes: Mapping[str, tuple[int, int]],
    widths: Mapping[str, int],
) -> dict[str, Any]:
    """JSON record of the init: its exchange, clients, n_i, privacy and the one-time ledger lines."""
    return {
        "exchange": spec.exchange,
        "step": "-eta sign(sum_i G_i)" if spec.exchange == "dense" else "-c sum_i G_i (un-signed: sign is not linear)",
        "clients": [c.client_id for c in clients],
        "client_samples": {c.client_id: c.num_samples for c in clients},
        "releases": releases_per_client(spec.exchange),
        "privacy": None if spec.privacy is None else {
            "clip_norm": spec.privacy.clip_norm, "noise_multiplier": spec.privacy.noise_multiplier,
            "sample_rate": 1.0,
        },
        "lines": exchange_lines(spec.exchange, len(clients), shapes, widths),
    }  # fmt: skip
