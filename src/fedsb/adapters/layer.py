"""The LoRA-SB layer: y = W0 x + b + s * B (R (A x)); B and A frozen, only the r x r matrix R trains.

`AdapterLayer` holds what every low-rank adapter shares (a frozen base layer, the scale, dropout, the
fp32/autocast forward, merge/unmerge, folding a dense update into W0); `LoraSBLinear` adds B, R, A.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.errors import FedsbError
from fedsb.models.quantize import dequantized_weight, is_quantized, quantization_of

log = logging.getLogger("fedsb.adapters")

SUPPORTED_BASE_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(out_features m, in_features n) of an `nn.Linear` or a GPT-2 `Conv1D` (weight stored n x m)."""
    if isinstance(base, Conv1D):
        n, m = base.weight.shape
        return int(m), int(n)
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    raise FedsbError(
        field="target_modules",
        value=type(base).__name__,
        fix="target only nn.Linear or transformers Conv1D layers",
        what="module type is not adaptable",
    )


def weight_in_linear_layout(base: nn.Module) -> torch.Tensor:
    """The base weight as an (m, n) view in `nn.Linear` layout (a transpose view for Conv1D)."""
    return base.weight.T if isinstance(base, Conv1D) else base.weight


def dense_weight(base: nn.Module) -> torch.Tensor:
    """W0 as a dense fp32 (m, n) tensor: the dequantized weight of a 4/8-bit layer, else a copy."""
    if is_quantized(base):
        return dequantized_weight(base)
    return weight_in_linear_layout(base).detach().float()


def base_device(base: nn.Module) -> torch.device:
    """The device of a base layer's weight: where its adapter's tensors are created."""
    return base.weight.device


def _check_rank(rank: object, m: int, n: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise FedsbError(field="rank", value=rank, fix="use a positive integer such as 32")
    if rank > min(m, n):
        raise FedsbError(
            field="rank",
            value=rank,
            fix=f"use rank <= {min(m, n)} for this {m} x {n} layer (or rank_overflow='cap')",
            what="is larger than the layer allows",
        )
    return rank


class AdapterLayer(nn.Module):
    """A frozen base linear layer plus a low-rank update s * delta; subclasses define the branch.

    The branch is computed in fp32 (the adapter's tensors are fp32 whatever the base dtype) and cast to
    the base output's dtype, or in the autocast dtype under autocast, where fp32 master weights stay fp32.
    """

    adapter_kind = "adapter"
    trainable_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, rank: int, *, scaling: float, dropout: float) -> None:
        super().__init__()
        m, n = linear_dims(base_layer)
        self.rank = _check_rank(rank, m, n)
        if (
            isinstance(scaling, bool)
            or not isinstance(scaling, int | float)
            or not torch.isfinite(torch.tensor(float(scaling)))
        ):
            raise FedsbError(
                field="scaling", value=scaling, fix="use a finite number, usually 1.0 (alpha = r)"
            )
        if not 0.0 <= dropout < 1.0:
            raise FedsbError(field="dropout", value=dropout, fix="use a probability in [0, 1)")
        self.base_layer = base_layer
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.out_features, self.in_features = m, n
        #: adapter tensors are fp32 on the base layer's device, whatever the base's dtype
        self.factory_kwargs = {"dtype": torch.float32, "device": base_device(base_layer)}
        self.scaling = float(scaling)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.fold_round = 0  # the last federated round whose dense fold this layer's W0 holds

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """The low-rank update applied to the (dropped-out) input, without the scale: (..., n) -> (..., m)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """s * (the update) in fp32, shape (m, n) in `nn.Linear` layout."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = base(x) + s * branch(dropout(x)); x: (..., n) -> y: (..., m)."""
        result = self.base_layer(x)
        if self.merged:
            return result
        h = self.adapter_dropout(x)
        if x.device.type != "meta" and torch.is_autocast_enabled(
            x.device.type
        ):  # meta: planning, no autocast
            update = self.branch(h)
        else:
            update = self.branch(h.to(torch.float32)).to(result.dtype)
        if self.scaling != 1.0:
            update = update * self.scaling
        return result + update

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + delta (computed in fp32, cast to W0's dtype); forward then skips the branch."""
        if self.merged:
            raise RuntimeError("layer is already merged")
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise FloatingPointError("adapter delta weight has NaN/Inf entries; refusing to merge")
        self._add_to_base(delta)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - delta; inverse of `merge` up to rounding in W0's dtype."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self._add_to_base(-self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def fold(self, delta: torch.Tensor) -> None:
        """W0 <- W0 + delta for a dense (m, n) update (FedEx-LoRA residuals, FLoRA stacks)."""
        if self.merged:
            raise RuntimeError("unmerge the layer before folding an update into it")
        if is_quantized(self.base_layer):
            self._add_to_base(delta)  # refused with the reason
        w = weight_in_linear_layout(self.base_layer)
        if w.dtype != torch.float32:
            log.warning("folding into a %s base weight loses precision; load the model in float32", w.dtype)
        self._add_to_base(delta)

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if is_quantized(self.base_layer):
            raise FedsbError(
                field="model.quantize",
                value=quantization_of(self.base_layer),
                what="gives a 4/8-bit W0, which cannot hold a merged or folded update without requantizing it",
                fix="keep the adapter unmerged (a merged export dequantizes W0: export_merged), or use a base "
                "with model.quantize=none",
            )
        w = weight_in_linear_layout(self.base_layer)
        w.copy_((w.float() + delta.to(w.device, torch.float32)).to(w.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling}, merged={self.merged}"


class LoraSBLinear(AdapterLayer):
    """A frozen linear layer plus the LoRA-SB update s * B R A.

    Shapes (weight orientation, m = out_features, n = in_features):
      A: (r, n) frozen, orthonormal rows      -- `lora_sb_A`
      R: (r, r) trainable, fp32               -- `lora_sb_R.weight` (an `nn.Linear(r, r)`, so Opacus
                                                  computes its per-sample gradients natively)
      B: (m, r) frozen, orthonormal columns   -- `lora_sb_B`
    B and A are frozen `nn.Parameter`s (Opacus rejects buffers inside a trainable layer) kept in fp32, like
    R, whatever the base model's dtype: merges, exports and exactness checks need fp32 factors.
    """

    adapter_kind = "lora_sb"
    trainable_names: tuple[str, ...] = ("lora_sb_R.weight",)

    def __init__(self, base_layer: nn.Module, rank: int, *, scaling: float = 1.0, dropout: float = 0.0):
        super().__init__(base_layer, rank, scaling=scaling, dropout=dropout)
        r, m, n = self.rank, self.out_features, self.in_features
        self.lora_sb_A = nn.Parameter(torch.zeros(r, n, **self.factory_kwargs), requires_grad=False)  # (r, n)
        self.lora_sb_B = nn.Parameter(torch.zeros(m, r, **self.factory_kwargs), requires_grad=False)  # (m, r)
        self.lora_sb_R = nn.Linear(r, r, bias=False, **self.factory_kwargs)  # weight (r, r)
        nn.init.zeros_(self.lora_sb_R.weight)

    @torch.no_grad()
    def set_factors(self, B: torch.Tensor, A: torch.Tensor, R: torch.Tensor | None = None) -> None:
        """Install B (m, r), A (r, n) and optionally R (r, r); all stored as fp32."""
        r, m, n = self.rank, self.out_features, self.in_features
        for name, t, shape in (("B", B, (m, r)), ("A", A, (r, n)), ("R", R, (r, r))):
            if t is not None and tuple(t.shape) != shape:
                raise FedsbError(field=name, value=tuple(t.shape), fix=f"pass a tensor of shape {shape}")
        if self.merged:
            raise RuntimeError("unmerge() the layer before replacing its factors")
        self.lora_sb_B.copy_(B.to(torch.float32))
        self.lora_sb_A.copy_(A.to(torch.float32))
        if R is not None:
            self.lora_sb_R.weight.copy_(R.to(torch.float32))

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        """B(R(A h)): (..., n) -> (..., r) -> (..., r) -> (..., m)."""
        return F.linear(self.lora_sb_R(F.linear(h, self.lora_sb_A)), self.lora_sb_B)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ R @ A in fp32, shape (m, n) in `nn.Linear` layout."""
        B, R, A = self.lora_sb_B, self.lora_sb_R.weight, self.lora_sb_A
        return self.scaling * (B.float() @ (R.float() @ A.float()))  # (m, r) @ ((r, r) @ (r, n)) -> (m, n)
