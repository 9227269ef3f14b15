"""FedSVD (Lee et al., NeurIPS 2025, arXiv 2505.12805): train B only; the server re-factorizes B A by SVD.

Round t: every client receives the round's A (r, n) and B (m, r), trains only B (A frozen, as in FFA-LoRA)
and sends B_i (r m per layer). The server averages, B = sum_i p_i B_i, which is exact for that round
because all clients share A: s B A = sum_i p_i s B_i A. It then re-factorizes the product:
  B A = U S V^T (rank <= r),   A <- V^T (orthonormal rows),   B <- U S,
so the global model W0 + s B A is unchanged (the test checks the product after re-factorization against
the mean of the clients' products) and the next round trains B against an orthonormal A aligned with the
aggregate's principal directions. Download per round: A and B, r (m + n) per layer; upload r m.

The SVD of the (m, n) product is taken without forming it: A^T = Q R (QR, Q n x r), B R^T = U S W^T
(an m x r SVD), so B A = U S (Q W)^T with A_new = (Q W)^T, in fp64, O((m + n) r^2) per layer.

What we follow: the official code (github.com/seanie12/fed-svd): FFA-style clients (`--model ffa`), after
each aggregation `reinit_lora` sets A = Vh[:r], B = U[:, :r] diag(S[:r]) from the SVD of B @ A, every
round (`recalculate_svd_period=1`, `svd_warmup_steps=0` in its scripts), and clients then load both A and
B. The first A is PEFT's Kaiming-uniform init, as for our FFA-LoRA (per-module seeds). Not followed: the
official scripts use alpha = r (s = 1) and freeze the classifier for RoBERTa; here s and the head follow
the other LoRA baselines (adapter.scaling, default 0.5; the head trains and is averaged). Not verified:
whether the paper re-factorizes every round in every experiment (the code's default does), and the
paper's text beyond its abstract. FedLLM-Factory's port (`alg/fedsvd.py`) takes `V[:r, :]` of
`torch.svd`, whose V is not transposed; we do not follow it there.

Privacy: A is computed from the averaged (under DP: noised) B only, so it is post-processing; DP-SGD
(per-example gradients of B) and client-level DP (a mean of the sent B_i) both apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import nn

from fedsb.adapters.inject import AdaptedModel
from fedsb.fed.base import SetupContext, Tensors
from fedsb.fed.lora_base import LoraMethod, lora_names
from fedsb.fed.validate import WIRE_DTYPES

A_PREFIX = "A/"  # checkpoint names of the current A per layer


def refactorize(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U S (m, r), V^T (r, n)) with U S V^T = B A, V^T with orthonormal rows; fp64 in, fp64 out."""
    Q, R = torch.linalg.qr(A.T)  # (n, r), (r, r): A = R^T Q^T
    U, S, Wh = torch.linalg.svd(B @ R.T, full_matrices=False)  # (m, r), (r,), (r, r)
    return U * S, Wh @ Q.T  # B A = B R^T Q^T = U S Wh Q^T


class FedSVD(LoraMethod):
    """Trains B only; uploads B_i; averages B, then re-factorizes B A by SVD; broadcasts A and B."""

    name: ClassVar[str] = "fedsvd"
    exact: ClassVar[bool] = True
    train_A: ClassVar[bool] = False
    wire_dtype: torch.dtype = torch.float32  # the A the clients train with is the server's A on the wire

    @classmethod
    def create(cls, model: nn.Module, ctx: SetupContext) -> FedSVD:
        method = super().create(model, ctx)
        assert isinstance(method, FedSVD)
        method.wire_dtype = WIRE_DTYPES[ctx.cfg.fed.wire_dtype]
        return method

    def _a_names(self, adapted: AdaptedModel) -> dict[str, str]:
        return {path: lora_names(path)[0] for path in adapted.layers}

    def download(self, since: int | None = None) -> Tensors:
        """The global B (and heads) plus every layer's current A (it changes every round; `since` is moot:
        this round's A and B are the whole server state)."""
        a = {
            name: self.adapted.layers[path].lora_A.weight.detach().float().clone()
            for path, name in self._a_names(self.adapted).items()
        }
        return {**super().download(since), **a}

    @torch.no_grad()
    def client_receive(self, adapted: AdaptedModel, payload: Mapping[str, torch.Tensor], round: int) -> None:
        """Install the round's A into the frozen lora_A, then the trained state."""
        a_names = self._a_names(adapted)
        for path, name in a_names.items():
            adapted.layers[path].lora_A.weight.copy_(payload[name].to(torch.float32))
        names = set(a_names.values())
        adapted.set_state({k: v.to(torch.float32) for k, v in payload.items() if k not in names})

    @torch.no_grad()
    def apply(self, aggregate: Tensors, round: int) -> None:
        """The averaged B, re-factorized with the round's A into (U S, V^T): same product, orthonormal A.

        The round's A is the one the clients trained with: the server's A as the wire dtype carried it."""
        state = {k: v.clone() for k, v in aggregate.items()}
        for path, layer in self.adapted.layers.items():
            b_name = lora_names(path)[1]
            sent_A = layer.lora_A.weight.to(self.wire_dtype).double()  # (r, n)
            B, A = refactorize(state[b_name].double(), sent_A)
            layer.lora_A.weight.copy_(A.to(torch.float32))
            state[b_name] = B.to(torch.float32)
        self.state = state
        self.adapted.set_state(self.state)

    def state_tensors(self) -> Tensors:
        """The global state and every layer's current A (a resumed run continues from the same A)."""
        a = {
            f"{A_PREFIX}{p}": layer.lora_A.weight.detach().clone() for p, layer in self.adapted.layers.items()
        }
        return {**super().state_tensors(), **a}

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for path, layer in self.adapted.layers.items():
            if f"{A_PREFIX}{path}" in tensors:
                layer.lora_A.weight.copy_(tensors[f"{A_PREFIX}{path}"].to(torch.float32))
        super().load_state_tensors({k: v for k, v in tensors.items() if not k.startswith(A_PREFIX)})
