"""The sign step, truncated SVD (exact or randomized, explicit generator) and the basis fingerprint."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from fedsb.errors import FedsbError


def sign_update(grad_sum: torch.Tensor, eta: float) -> torch.Tensor:
    """Approximate first full fine-tuning step: dW = -eta * sign(G) (element-wise, fp32).

    Adam's first bias-corrected step is m/sqrt(v) = g/|g| = sign(g), so dW is one Adam step of full
    fine-tuning with learning rate eta.
    """
    if not eta > 0:
        raise FedsbError(field="eta", value=eta, fix="use a positive step size, e.g. 1e-4")
    return -eta * torch.sign(grad_sum.to(torch.float32))


def official_eta(lr: float, warmup_ratio: float, num_batches: int, epochs: float = 1.0) -> float:
    """The official LoRA-SB code's eta: lr / (warmup_ratio * T), T = num_batches * epochs.

    T counts batches of the gradient-estimation loader (not optimizer steps); with warmup_ratio = 0 the
    warm-up factor is dropped (the SNLI/BERT variant: lr / T).
    """
    steps = num_batches * epochs
    if steps <= 0:
        raise FedsbError(field="num_batches", value=num_batches, fix="use a positive number of batches")
    return lr / (warmup_ratio * steps) if warmup_ratio > 0 else lr / steps


def truncated_svd(
    M: torch.Tensor,
    rank: int,
    *,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = 4,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of M (m, n) in fp32: U_r (m, r), S_r (r,), Vh_r (r, n), singular values descending.

    method="exact": `torch.linalg.svd`. method="randomized": Halko et al. range finder with q = rank +
    oversample columns and `power_iters` QR-stabilized power iterations, drawing the test matrix from
    `generator` only (the global RNG is never touched). U_r and Vh_r are orthonormal even when M is rank
    deficient (Householder QR / LAPACK complete the bases).
    """
    M = M.to(torch.float32)
    m, n = M.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(m, n):
        raise FedsbError(field="rank", value=rank, fix=f"use 1 <= rank <= {min(m, n)} for a {m} x {n} matrix")
    if method == "exact":
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)  # (m, k), (k,), (k, n); k = min(m, n)
        return U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous()
    if method != "randomized":
        raise FedsbError(field="svd", value=method, fix="use 'exact' or 'randomized'")
    if generator is None:
        raise FedsbError(field="generator", value=None, fix="pass a torch.Generator for the randomized SVD")
    q = min(rank + max(oversample, 0), min(m, n))
    # drawn on the generator's device (the CPU), then moved: the same test matrix on every device
    omega = torch.randn(n, q, generator=generator, dtype=torch.float32).to(M.device)  # (n, q)
    Q, _ = torch.linalg.qr(M @ omega)  # (m, q)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(M.T @ Q)  # (n, q)
        Q, _ = torch.linalg.qr(M @ Z)  # (m, q)
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)  # (q, q), (q,), (q, n)
    U = Q @ Ub  # (m, q)
    return U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous()


def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal columns (rows >= cols) from the QR of a Gaussian matrix."""
    G = torch.randn(rows, cols, generator=generator, dtype=torch.float32)
    Q, Rq = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(Rq)).where(torch.diagonal(Rq) != 0, torch.ones(()))  # unique sign


def fingerprint(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> str:
    """SHA-256 over sorted module names, shapes, scaling and the fp32 bytes of B and A (hex, 64 chars).

    The bytes are hashed in place (an fp32 CPU tensor is not copied), so hashing costs one SHA-256 pass.
    """
    h = hashlib.sha256()
    h.update(f"fedsb-basis-v1;scaling={float(scaling)!r};".encode())
    for name in sorted(factors):
        B, A = factors[name]
        h.update(f"{name};B{tuple(B.shape)};A{tuple(A.shape)};".encode())
        h.update(B.detach().to(torch.float32).contiguous().cpu().numpy())
        h.update(A.detach().to(torch.float32).contiguous().cpu().numpy())
    return h.hexdigest()
