"""Tensors <-> Flower records: raw little-endian bytes in the wire dtype, nothing else.

An `Array` here carries `stype="fedsb.raw"`, the torch dtype name and the tensor's bytes, so bfloat16 and
float16 travel as themselves (Flower's numpy path cannot hold bfloat16) and `len(array.data)` is exactly
numel x element size: the figure the ledger records. `ArrayRecord.count_bytes()` adds the key names.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedsb.fed.base import Tensors

RAW_STYPE = "fedsb.raw"
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int8": torch.int8,  # fed.wire_dtype=int8 values (their fp32 scales travel beside them)
}


def tensor_to_array(t: torch.Tensor) -> Array:
    """One tensor as an `Array` of its raw bytes (dtype kept, shape kept)."""
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"cannot send a {t.dtype} tensor; use one of {sorted(_DTYPES)}")
    flat = t.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()  # (numel * itemsize,) bytes
    return Array(dtype=name, shape=tuple(int(s) for s in t.shape), stype=RAW_STYPE, data=data)


def array_to_tensor(a: Array) -> torch.Tensor:
    """Inverse of `tensor_to_array`; numpy-serialized arrays (other senders) are read too."""
    if a.stype != RAW_STYPE:
        return torch.from_numpy(np.array(a.numpy()))
    if a.dtype not in _DTYPES:
        raise TypeError(f"unknown wire dtype {a.dtype!r}")
    buf = torch.frombuffer(bytearray(a.data), dtype=torch.uint8)
    return buf.view(_DTYPES[a.dtype]).reshape(a.shape).clone()


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """name -> tensor as an ArrayRecord (tensors already in their wire dtype)."""
    return ArrayRecord({k: tensor_to_array(v) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> Tensors:
    return {k: array_to_tensor(v) for k, v in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record: `count_bytes()` minus the key names (equals the ledger's figure)."""
    return record.count_bytes() - sum(len(k) for k in record.keys())
