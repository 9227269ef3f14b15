"""The frozen basis (B, A per module) and the starting R0: LoRA-SB, LoRA-XS and random initializations.

LoRA-SB (arXiv 2411.19557): dW = -eta * sign(G_W) ~ U_r S_r V_r^T (fp32 SVD in weight orientation, dW is
m x n); B = U_r (m, r), A = V_r^T (r, n), R0 = S_r / s, so s * B R0 A = trunc_r(dW). W0 is never modified.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedsb.errors import CheckpointError, FedsbError
from fedsb.init.svd import fingerprint, random_orthonormal, sign_update, truncated_svd

BASIS_TENSORS = "basis.safetensors"
BASIS_META = "basis.json"
INIT_KINDS = ("lora-sb", "lora-xs", "random")


@dataclass
class ModuleFactors:
    """B (m, r) with orthonormal columns, A (r, n) with orthonormal rows, R0 (r, r); all fp32."""

    B: torch.Tensor
    A: torch.Tensor
    R0: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.R0.shape[0])


@dataclass
class Basis:
    """One frozen basis for every party: module path -> factors, the scale s, and how it was made."""

    factors: dict[str, ModuleFactors]
    scaling: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the B/A bytes, shapes, module names and scale (R0 is not part of the basis)."""
        return fingerprint({k: (f.B, f.A) for k, f in self.factors.items()}, self.scaling)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: f.rank for k, f in self.factors.items()}

    def cpu(self) -> Basis:
        """The same basis with every factor on the CPU, where it is saved, hashed and sent."""
        factors = {k: ModuleFactors(f.B.cpu(), f.A.cpu(), f.R0.cpu()) for k, f in self.factors.items()}
        return Basis(factors=factors, scaling=self.scaling, info=self.info)

    def num_basis_parameters(self) -> int:
        """r(m + n) summed over modules: the one-time download of B and A."""
        return sum(f.B.numel() + f.A.numel() for f in self.factors.values())

    def save(self, directory: str | Path) -> Path:
        """Write basis.safetensors (B, A, R0 per module) and basis.json (scale, info, fingerprint)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for name, f in self.factors.items():
            tensors[f"{name}.B"] = f.B.contiguous()
            tensors[f"{name}.A"] = f.A.contiguous()
            tensors[f"{name}.R0"] = f.R0.contiguous()
        save_file(tensors, str(d / BASIS_TENSORS))
        meta = {
            "format": "fedsb-basis",
            "version": 1,
            "fingerprint": self.fingerprint,
            "scaling": self.scaling,
            "modules": list(self.factors),
            "ranks": self.ranks,
            "info": self.info,
        }
        (d / BASIS_META).write_text(json.dumps(meta, indent=2, default=str))
        return d

    @classmethod
    def load(cls, directory: str | Path, *, expected_fingerprint: str | None = None) -> Basis:
        """Read a saved basis and check that its bytes still match the stored fingerprint."""
        d = Path(directory)
        if not (d / BASIS_META).is_file() or not (d / BASIS_TENSORS).is_file():
            raise CheckpointError(f"{d} holds no basis ({BASIS_META} and {BASIS_TENSORS} expected)")
        meta = json.loads((d / BASIS_META).read_text())
        tensors = load_file(str(d / BASIS_TENSORS))
        try:
            factors = {
                name: ModuleFactors(tensors[f"{name}.B"], tensors[f"{name}.A"], tensors[f"{name}.R0"])
                for name in meta["modules"]
            }
        except KeyError as exc:
            raise CheckpointError(f"basis in {d} is incomplete: missing tensor {exc}") from None
        basis = cls(factors=factors, scaling=float(meta["scaling"]), info=meta.get("info", {}))
        if basis.fingerprint != meta["fingerprint"]:
            raise CheckpointError(
                f"basis in {d} is corrupted: its tensors hash to {basis.fingerprint[:12]}, "
                f"the file says {meta['fingerprint'][:12]}"
            )
        if expected_fingerprint is not None and basis.fingerprint != expected_fingerprint:
            raise CheckpointError(
                f"basis fingerprint mismatch: {d} has {basis.fingerprint[:12]}, expected "
                f"{expected_fingerprint[:12]}; every party must use the server's basis"
            )
        return basis


def lora_sb_basis(
    grads: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    *,
    eta: float,
    scaling: float = 1.0,
    svd: str = "exact",
    oversample: int = 10,
    power_iters: int = 4,
    generator: torch.Generator | None = None,
) -> Basis:
    """LoRA-SB factors from accumulated gradients G (m, n) per module (weight orientation)."""
    _check_scaling(scaling)
    factors: dict[str, ModuleFactors] = {}
    for name, G in grads.items():
        delta = sign_update(G, eta)  # (m, n)
        U, S, Vh = truncated_svd(
            delta,
            ranks[name],
            method=svd,
            oversample=oversample,
            power_iters=power_iters,
            generator=generator,
        )
        factors[name] = ModuleFactors(B=U, A=Vh, R0=torch.diag(S) / scaling)  # (m, r), (r, n), (r, r)
    info = {"init": "lora-sb", "eta": eta, "svd": svd}
    if svd == "randomized":
        info.update(oversample=oversample, power_iters=power_iters)
    return Basis(factors=factors, scaling=scaling, info=info)


def lora_xs_basis(
    weights: Mapping[str, torch.Tensor],
    ranks: Mapping[str, int],
    *,
    scaling: float = 1.0,
    r_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> Basis:
    """LoRA-XS-style: B, A from the SVD of W0 (m, n); R0 ~ N(0, r_std^2) (zero by default). For ablations."""
    _check_scaling(scaling)
    factors: dict[str, ModuleFactors] = {}
    for name, W in weights.items():
        r = ranks[name]
        U, _, Vh = truncated_svd(W, r)
        R0 = torch.zeros(r, r)
        if r_std > 0:
            if generator is None:
                raise FedsbError(field="generator", value=None, fix="pass a torch.Generator when r_std > 0")
            R0 = r_std * torch.randn(r, r, generator=generator)
        factors[name] = ModuleFactors(B=U, A=Vh, R0=R0)
    return Basis(factors=factors, scaling=scaling, info={"init": "lora-xs", "r_std": r_std})


def random_basis(
    shapes: Mapping[str, tuple[int, int]],
    ranks: Mapping[str, int],
    *,
    generator: torch.Generator,
    scaling: float = 1.0,
) -> Basis:
    """Random orthonormal B (m, r) and A (r, n) from QR of Gaussians, R0 = 0. For ablations; data-free."""
    _check_scaling(scaling)
    factors: dict[str, ModuleFactors] = {}
    for name, (m, n) in shapes.items():
        r = ranks[name]
        B = random_orthonormal(m, r, generator)  # (m, r)
        A = random_orthonormal(n, r, generator).T.contiguous()  # (r, n)
        factors[name] = ModuleFactors(B=B, A=A, R0=torch.zeros(r, r))
    return Basis(factors=factors, scaling=scaling, info={"init": "random"})


def basis_from_payload(
    payload: Mapping[str, torch.Tensor], scaling: float, *, b_key: str, a_key: str
) -> Basis:
    """A `Basis` from a setup message's `<path>.<b_key>` (m, r) and `<path>.<a_key>` (r, n); R0 = 0 (the
    trained state is downloaded every round). The layers keep the payload's order, the server model's: a
    client's trained tensors then come in the server's order, and so do the random draws (DP-SGD noise) and
    the optimizer state that follow it."""
    paths = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in payload))
    factors = {}
    for p in paths:
        B = payload[f"{p}.{b_key}"].to(torch.float32)  # (m, r)
        A = payload[f"{p}.{a_key}"].to(torch.float32)  # (r, n)
        factors[p] = ModuleFactors(B=B, A=A, R0=torch.zeros(B.shape[1], B.shape[1]))
    return Basis(factors=factors, scaling=scaling)


def verified_basis(
    payload: Mapping[str, torch.Tensor], scaling: float, fingerprint: str, *, b_key: str, a_key: str
) -> Basis:
    """The received basis, or an error if its B, A do not hash to the fingerprint the server announced."""
    basis = basis_from_payload(payload, scaling, b_key=b_key, a_key=a_key)
    if basis.fingerprint != fingerprint:
        raise FedsbError(
            field="basis fingerprint",
            value=basis.fingerprint[:12],
            what=f"does not match the server's {fingerprint[:12]} (corrupted or foreign setup message)",
            fix="restart the run so every SuperNode receives the same basis",
        )
    return basis


def _check_scaling(scaling: float) -> None:
    if not isinstance(scaling, int | float) or isinstance(scaling, bool) or not scaling > 0:
        raise FedsbError(field="scaling", value=scaling, fix="use a positive number, usually 1.0 (alpha = r)")
