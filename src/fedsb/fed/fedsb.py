"""Fed-SB: clients train only R (r x r per layer); the server averages R, which is exact.

W0 + s B (sum_i p_i R_i) A = sum_i p_i (W0 + s B R_i A): R -> s B R A is linear and every party shares W0,
B, A and s, so FedAvg in R-space is FedAvg of the full weights for any weights, step counts and subset
of clients (Fed-SB, arXiv 2502.15436). Per round each client moves r^2 numbers per layer each way; B and
A travel once, with a fingerprint every update must match.
"""

from __future__ import annotations

from typing import ClassVar

from fedsb.adapters.inject import AdaptedModel
from fedsb.fed.base import FederatedMethod, Tensors
from fedsb.init.basis import Basis


class FedSB(FederatedMethod):
    """Trains R (and any head); uploads R_i; aggregates the weighted mean of R; broadcasts B, A once."""

    name: ClassVar[str] = "fedsb"
    exact: ClassVar[bool] = True

    def __init__(self, adapted: AdaptedModel, basis: Basis, *, weighting: str = "examples") -> None:
        super().__init__(adapted, weighting=weighting)
        self.basis = basis

    @property
    def basis_fingerprint(self) -> str:
        return self.basis.fingerprint

    def setup_payload(self) -> Tensors:
        """B (m, r) and A (r, n) of every adapted layer, sent once."""
        out: Tensors = {}
        for path, f in self.basis.factors.items():
            out[f"{path}.lora_sb_B"] = f.B
            out[f"{path}.lora_sb_A"] = f.A
        return out
