"""A 4-bit (nf4) or 8-bit frozen base through bitsandbytes: `model.quantize: none | nf4 | int8`.

`quantize_model` replaces every linear layer of the base (`nn.Linear`, and GPT-2's `Conv1D`, transposed
to `nn.Linear` layout as transformers does) by a bitsandbytes layer, except the heads in `KEEP_DENSE`
(the output embedding, classification heads, the pooler: trained or tied to the embedding), so the
adapted layers and all other projections of every block are quantized; embeddings, norms and heads stay
in the base dtype. The settings are those of transformers' `BitsAndBytesConfig` defaults, so a base
quantized here holds the same bytes as one loaded with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)` (or `load_in_8bit=True`) and a standard PEFT
adapter trained here loads on it:

- nf4: `Linear4bit`, blocks of 64 weights share one fp32 absmax (0.5 + 4/64 bytes per weight), no
  double quantization, uint8 storage; forward W0 x = x deq(W0)^T in the compute dtype (the base dtype);
- int8: `Linear8bitLt` (LLM.int8(), outlier threshold 6.0), one fp32 scale per output row (1 byte per
  weight); training forward x deq(W0)^T, evaluation forward bitsandbytes' int8 matmul with outliers.

The adapters wrap these layers (`fedsb.adapters.layer.AdapterLayer`: W0 x comes from the bitsandbytes
layer, B, R, A stay fp32); `dequantized_weight` gives the dense (m, n) W0 the layer computes with.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedsb.errors import FedsbError

log = logging.getLogger("fedsb.models")

QUANTIZE_CHOICES: tuple[str, ...] = ("none", "nf4", "int8")
#: bytes per element of a quantized linear weight: nf4 (4 bits + an fp32 absmax per block of 64), int8
#: (1 byte + an fp32 scale per row, negligible)
QUANTIZED_BYTES: dict[str, float] = {"nf4": 0.5 + 4 / 64, "int8": 1.0}
#: module names (the last path component) that stay dense: output embedding, task heads, pooler
KEEP_DENSE: tuple[str, ...] = ("lm_head", "score", "classifier", "pooler", "qa_outputs")
NF4_BLOCKSIZE = 64
INT8_THRESHOLD = 6.0
#: bitsandbytes logs a warning on import on CPUs with AVX512-BF16 when its optional `kernels` package
#: (an inference-only CPU kernel) is absent; fedsb never uses that kernel (`_no_cpu_repacking`)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def bnb() -> Any:
    """The bitsandbytes module, or a FedsbError naming model.quantize and how to install it."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise FedsbError(
            field="model.quantize",
            value="nf4/int8",
            what=f"needs bitsandbytes, which cannot be imported ({exc})",
            fix="pip install bitsandbytes==0.50.2 (the dev dependencies include it), or model.quantize=none",
        ) from None
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit or 8-bit linear layer (ours or one transformers loaded)."""
    if type(module).__module__.split(".")[0] != "bitsandbytes" and not isinstance(module, _Int8Linear):
        return False
    lib = bnb()
    return isinstance(module, lib.nn.Linear4bit | lib.nn.Linear8bitLt)


def quantization_of(model: nn.Module) -> str:
    """'nf4', 'fp4' or 'int8' if `model` holds bitsandbytes layers, else 'none'."""
    for m in model.modules():
        if is_quantized(m):
            return "int8" if isinstance(m, bnb().nn.Linear8bitLt) else m.weight.quant_state.quant_type
    return "none"


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight (m, n), fp32, that a bitsandbytes layer computes W0 x with (a new tensor)."""
    lib = bnb()
    if isinstance(module, lib.nn.Linear4bit):
        w = module.weight
        return lib.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)  # (m, n)
    if isinstance(module, lib.nn.Linear8bitLt):
        cb = module.state.CB if module.state.CB is not None else module.weight.data  # (m, n) int8
        scb = module.state.SCB if module.state.SCB is not None else module.weight.SCB  # (m,)
        return cb.to(torch.float32) * (scb.to(torch.float32).unsqueeze(1) / 127.0)  # (m, n)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes linear layer")


def dense_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's weight had before quantization (what a dequantized export writes)."""
    return (
        getattr(module, "fedsb_dense_dtype", None) or getattr(module, "compute_dtype", None) or torch.float32
    )


class _Int8Linear:  # marker mixin; the class itself is built lazily (bitsandbytes imports only when used)
    pass


def _int8_class() -> type:
    lib = bnb()
    if not hasattr(_int8_class, "cls"):

        class Int8Linear(_Int8Linear, lib.nn.Linear8bitLt):
            """`Linear8bitLt` whose input is cast to a fixed compute dtype (the base dtype) first, so its
            bias keeps its dtype (bitsandbytes casts the bias to whatever input dtype arrives); the output
            comes back in the input's dtype, as `Linear4bit` does."""

            compute_dtype: torch.dtype = torch.float32

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return super().forward(x.to(self.compute_dtype)).to(x.dtype)

        _int8_class.cls = Int8Linear  # type: ignore[attr-defined]
    return _int8_class.cls  # type: ignore[attr-defined]


def quantized_linear(
    layer: nn.Module, mode: str, *, compute_dtype: torch.dtype, device: torch.device | None = None
) -> nn.Module:
    """A frozen bitsandbytes copy of `layer` (nn.Linear or Conv1D), quantized on `device` (default: the
    layer's own). Weight (m, n) in nn.Linear layout; the bias stays in its dtype."""
    lib = bnb()
    weight = layer.weight.detach()
    if isinstance(layer, Conv1D):
        weight = weight.T  # Conv1D stores (n, m)
    m, n = weight.shape
    dev = device or weight.device
    bias = layer.bias is not None
    if mode == "nf4":
        new = lib.nn.Linear4bit(
            n, m, bias=bias, compute_dtype=compute_dtype, compress_statistics=False, quant_type="nf4",
            quant_storage=torch.uint8, device="meta",
        )  # fmt: skip
        new.weight = lib.nn.Params4bit(
            weight.contiguous(), requires_grad=False, blocksize=NF4_BLOCKSIZE, compress_statistics=False,
            quant_type="nf4", quant_storage=torch.uint8, module=new,
        )  # fmt: skip
        new.support_avx512bf16_for_cpu = (
            False  # no in-place repacking of W0 at evaluation (_no_cpu_repacking)
        )
    elif mode == "int8":
        new = _int8_class()(n, m, bias=bias, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
        new.compute_dtype = compute_dtype
        new.weight = lib.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
    else:
        raise FedsbError(field="model.quantize", value=mode, fix=f"use one of {', '.join(QUANTIZE_CHOICES)}")
    if bias:
        new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    new.fedsb_dense_dtype = weight.dtype
    new.to(dev)  # quantizes the weight on the device
    new.requires_grad_(False)
    return new


def quantize_model(
    model: nn.Module,
    mode: str,
    *,
    compute_dtype: torch.dtype,
    device: torch.device | None = None,
    keep_dense: tuple[str, ...] = KEEP_DENSE,
) -> list[str]:
    """Replace every linear layer of `model` not named in `keep_dense` by its `quantized_linear`, one at
    a time, each dense layer freed as its copy replaces it (peak: the model plus one quantized layer);
    returns the replaced paths. mode 'none' does nothing. A checkpoint on disk is better loaded by
    `fedsb.models.stream`, which never holds the dense model whole."""
    if mode == "none":
        return []
    if mode not in QUANTIZED_BYTES:
        raise FedsbError(field="model.quantize", value=mode, fix=f"use one of {', '.join(QUANTIZE_CHOICES)}")
    bnb()
    targets = quantize_targets(model, keep_dense)
    for path in targets:  # paths, not modules: each dense layer is freed as soon as its copy replaces it
        replace_module(
            model,
            path,
            quantized_linear(model.get_submodule(path), mode, compute_dtype=compute_dtype, device=device),
        )
    if targets:
        log.info(
            "quantized %d linear layers to %s (kept dense: %s)", len(targets), mode, ", ".join(keep_dense)
        )
    return targets


def quantize_targets(model: nn.Module, keep_dense: tuple[str, ...] = KEEP_DENSE) -> list[str]:
    """Paths of the linear layers (`nn.Linear`, `Conv1D`) a 4/8-bit base quantizes: all but those already
    quantized and those under a name in `keep_dense`."""
    return [
        path
        for path, m in model.named_modules()
        if path and isinstance(m, nn.Linear | Conv1D) and not is_quantized(m)
        and not set(path.split(".")) & set(keep_dense)
    ]  # fmt: skip


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at `path` (dotted) in `model`."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def place_quantized(
    model: nn.Module, mode: str, *, compute_dtype: torch.dtype, device: torch.device | None
) -> None:
    """Quantize a model loaded on the CPU (or spread by a device map: `device` None) onto `device`, then
    move the rest of it there; nothing for mode 'none'."""
    if mode == "none":
        return
    quantize_model(model, mode, compute_dtype=compute_dtype, device=device)
    if device is not None:
        model.to(device)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (packed 4/8-bit weights and their scales)."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    lib = None
    for m in model.modules():
        if is_quantized(m):
            lib = lib or bnb()
            if isinstance(m, lib.nn.Linear4bit):
                total += m.weight.quant_state.absmax.numel() * m.weight.quant_state.absmax.element_size()
            else:
                scb = m.state.SCB if m.state.SCB is not None else m.weight.SCB
                total += scb.numel() * scb.element_size()
    return total
