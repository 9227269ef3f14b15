"""The RAVAN layer: y = W0 x + b + c * sum_k s_k B_k H_k A_k x; B_k, A_k frozen, H_k (r x r) and s_k train.

The h heads' bases are stored stacked: B = [B_1 | ... | B_h] (m, h r) and A = [A_1; ...; A_h] (h r, n), so
the branch is two dense products around h small ones: B (s * H (A x)) with H = blockdiag(H_1, ..., H_h).
c is the fixed adapter scale (adapter.scaling); s_k is the trained per-head scale (RAVAN, arXiv 2506.05568).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsb.adapters.layer import AdapterLayer
from fedsb.errors import FedsbError


class HeadScales(nn.Module):
    """The per-head scales s (h,): (..., h, r) -> (..., h, r), head k multiplied by s_k.

    A module of its own so Opacus gives s per-example gradients (through its functorch fallback); the
    H_k are `nn.Linear` layers, which Opacus handles natively."""

    def __init__(self, heads: int, device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, dtype=torch.float32, device=device))  # (h,)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.weight.unsqueeze(-1)  # (..., h, r) * (h, 1)


class RavanLinear(AdapterLayer):
    """A frozen linear layer plus sum_k s_k B_k H_k A_k (scaled by c).

    Shapes (m = out_features, n = in_features, h heads of rank r, `rank` = h r):
      A: (h r, n) frozen, the heads' A_k stacked by rows      -- `ravan_A`
      B: (m, h r) frozen, the heads' B_k side by side         -- `ravan_B`
      H_k: (r, r) trainable, fp32, one `nn.Linear` per head   -- `ravan_H.<k>.weight`
      s: (h,) trainable (or frozen at 1)                       -- `ravan_s.weight`
    """

    adapter_kind = "ravan"

    def __init__(
        self,
        base_layer: nn.Module,
        head_rank: int,
        heads: int,
        *,
        scaling: float = 1.0,
        dropout: float = 0.0,
        train_scales: bool = True,
    ) -> None:
        if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
            raise FedsbError(field="ravan.heads", value=heads, fix="use a positive integer such as 4")
        super().__init__(base_layer, head_rank * heads, scaling=scaling, dropout=dropout)
        self.heads, self.head_rank = heads, head_rank
        m, n, hr = self.out_features, self.in_features, self.rank
        fp32 = self.factory_kwargs  # fp32 on the base layer's device
        self.ravan_A = nn.Parameter(torch.zeros(hr, n, **fp32), requires_grad=False)  # (hr, n)
        self.ravan_B = nn.Parameter(torch.zeros(m, hr, **fp32), requires_grad=False)  # (m, hr)
        self.ravan_H = nn.ModuleList(
            nn.Linear(head_rank, head_rank, bias=False, **fp32) for _ in range(heads)
        )
        for H in self.ravan_H:
            nn.init.zeros_(H.weight)
        self.ravan_s = HeadScales(heads, device=fp32["device"])
        self.ravan_s.weight.requires_grad_(train_scales)
        self.trainable_names = (
            *(f"ravan_H.{k}.weight" for k in range(heads)),
            *(("ravan_s.weight",) if train_scales else ()),
        )

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor, H0: torch.Tensor | None = None) -> None:
        """Install B (m, h r), A (h r, n) and optionally the starting H_k: the diagonal r x r blocks of H0."""
        hr, m, n = self.rank, self.out_features, self.in_features
        for name, t, shape in (("B", B, (m, hr)), ("A", A, (hr, n)), ("H0", H0, (hr, hr))):
            if t is not None and tuple(t.shape) != shape:
                raise FedsbError(field=name, value=tuple(t.shape), fix=f"pass a tensor of shape {shape}")
        if self.merged:
            raise RuntimeError("unmerge() the layer before replacing its factors")
        self.ravan_B.copy_(B.to(torch.float32))
        self.ravan_A.copy_(A.to(torch.float32))
        if H0 is not None:
            r = self.head_rank
            for k, H in enumerate(self.ravan_H):
                H.weight.copy_(H0[k * r : (k + 1) * r, k * r : (k + 1) * r].to(torch.float32))

    def head_products(self) -> list[torch.Tensor]:
        """s_k H_k (r, r) per head, fp32: what a client sends (s H is linear in each head's product)."""
        s = self.ravan_s.weight.detach().float()
        return [s[k] * H.weight.detach().float() for k, H in enumerate(self.ravan_H)]

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """B (s * H (A h)): (..., n) -> (..., h r) -> h x (..., r) -> (..., h, r) -> (..., m)."""
        z = F.linear(h, self.ravan_A).unflatten(-1, (self.heads, self.head_rank))  # (..., h, r)
        y = torch.stack([H(z[..., k, :]) for k, H in enumerate(self.ravan_H)], dim=-2)  # (..., h, r)
        return F.linear(self.ravan_s(y).flatten(-2), self.ravan_B)  # (..., h r) -> (..., m)

    def delta_weight(self) -> torch.Tensor:
        """c * B blockdiag(s_k H_k) A in fp32, shape (m, n)."""
        G = torch.block_diag(*self.head_products())  # (h r, h r)
        return self.scaling * (self.ravan_B.float() @ (G @ self.ravan_A.float()))  # (m, hr)(hr, hr)(hr, n)

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_B (m, h r), lora_A (h r, n)) = ([s_1 B_1 H_1 | ... | s_h B_h H_h], [A_1; ...; A_h]): one
        plain LoRA of rank h r with lora_B @ lora_A = sum_k s_k B_k H_k A_k, exactly."""
        G = torch.block_diag(*self.head_products())  # (h r, h r)
        return self.ravan_B.float() @ G, self.ravan_A.float()

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_rank={self.head_rank}, " + super().extra_repr()
