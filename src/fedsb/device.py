"""Where tensors live: the run's device and base-model dtype, decided once, and the device-aware helpers.

`resolve_placement(cfg)` turns `device` (auto | cpu | cuda | cuda:N | mps) and `model.dtype` (auto |
float32 | bfloat16 | float16) into a `Placement`; everything else asks the placement (or a tensor) for its
device instead of assuming the CPU. The rule of the project: the base model, R, heads, optimizer state,
batches, the init's gradient estimate and its SVD live on the device; what crosses the wire (updates,
aggregates, the ledger, validation, checkpoints, exports) lives on the CPU.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedsb.config import DEVICE_CHOICES, DEVICE_RE
from fedsb.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Placement:
    """The run's device, the base model's dtype and its quantization (none, nf4, int8), with what was asked
    for (for the manifest). With a quantized base, `dtype` is that of the unquantized rest (embeddings,
    norms, heads) and the quantized layers' compute dtype."""

    device: torch.device
    dtype: torch.dtype
    requested_device: str = "auto"
    requested_dtype: str = "auto"
    quantize: str = "none"

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, Any]:
        """What the manifest records: requested and resolved device and dtype, and the device's name."""
        return {
            "requested": self.requested_device,
            "device": str(self.device),
            "name": device_name(self.device),
            "model_dtype": self.dtype_name,
            "requested_model_dtype": self.requested_dtype,
            "quantize": self.quantize,
        }


def resolve_device(spec: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; an explicit device must exist (ConfigError otherwise)."""
    if not isinstance(spec, str) or re.fullmatch(DEVICE_RE, spec) is None:
        raise ConfigError(field="device", value=spec, fix=f"use {DEVICE_CHOICES}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                field="device",
                value=spec,
                what=f"is not available: this torch ({torch.__version__}) sees no CUDA device",
                fix="use device=cpu or device=auto, or install a CUDA build of torch on a machine with a GPU",
            )
        count = torch.cuda.device_count()
        index = 0 if device.index is None else device.index
        if index >= count:
            raise ConfigError(
                field="device",
                value=spec,
                what=f"does not exist: {count} CUDA device(s) are visible",
                fix=f"use cuda:0..cuda:{count - 1}, or check CUDA_VISIBLE_DEVICES",
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            field="device",
            value=spec,
            what="is not available: this machine or torch build has no Apple MPS backend",
            fix="use device=cpu or device=auto",
        )
    return device


def resolve_dtype(spec: str, device: torch.device, quantize: str = "none") -> torch.dtype:
    """`auto`: bfloat16 on a CUDA device that supports it, float32 everywhere else (the CPU default); for a
    quantized base (nf4, int8) bfloat16 on the CPU too (the rest of a 4-bit base in 16 bits, as
    transformers loads one), float16 on a CUDA device without bf16."""
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if quantize != "none":
            return torch.float16 if device.type == "cuda" else torch.bfloat16
        return torch.float32
    if spec not in DTYPES:
        raise ConfigError(field="model.dtype", value=spec, fix=f"use auto or one of {', '.join(DTYPES)}")
    return DTYPES[spec]


def resolve_placement(device: str, dtype: str, quantize: str = "none") -> Placement:
    """The `Placement` for the `device`, `model.dtype` and `model.quantize` settings (checked against this
    machine)."""
    dev = resolve_device(device)
    return Placement(
        dev,
        resolve_dtype(dtype, dev, quantize),
        requested_device=device,
        requested_dtype=dtype,
        quantize=quantize,
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_available() else "not available here"
    return device.type


def fork_rng(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """`torch.random.fork_rng` over the CPU generator and those of `device`'s type (restored on exit):
    every visible CUDA device, since `torch.manual_seed` inside seeds them all."""
    if device.type in ("cpu", "meta"):
        return torch.random.fork_rng(devices=[])
    if device.type == "cuda":
        return torch.random.fork_rng(devices=range(torch.cuda.device_count()), device_type="cuda")
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)


def autocast(device: torch.device, enabled: bool, dtype: torch.dtype = torch.bfloat16) -> Any:
    """bf16 autocast for `device`'s type, or a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch with every tensor on `device` (non-blocking copies from pinned memory where possible)."""
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (where its inputs go); the CPU for a parameterless one."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def on_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies (no copy for tensors already there): what checkpoints and exports hold."""
    return {k: v.detach().cpu() for k, v in tensors.items()}


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the CPU and `device` generators inside the block; the caller's RNG states come back after."""
    with fork_rng(device):
        torch.manual_seed(seed)
        yield
