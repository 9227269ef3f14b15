"""Tensors <-> Flower records: all of a message's tensors packed into ONE `Array`, in the wire dtype.

Flower 1.42 moves every `Array` of a message as its own object, one HTTP request each between a SuperNode
and its ClientApp process (two at a time): a Fed-SB download of SmolLM2 is 210 tensors, its basis 420,
and pulling them one by one took 16-18 s per message on 2 cores (benchmarks/README.md). So `to_record`
packs the tensors into one safetensors buffer (`stype="fedsb.safetensors"`, key `PACKED`; Flower splits
it into 5 MB chunks): bfloat16, float16 and int8 travel as themselves, names and order are kept, and
`payload_bytes` is exactly the sum of numel x element size, the figure the ledger records (the header's
names, dtypes and shapes are not counted, as the record's key names are not). `from_record` also reads
records of one `Array` per tensor (raw bytes, `stype="fedsb.raw"`, or Flower's numpy arrays).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Mapping

import numpy as np
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError

from fedsb.fed.base import Tensors

RAW_STYPE = "fedsb.raw"
PACKED = "fedsb.tensors"  # the key of a packed record's one Array
PACKED_STYPE = "fedsb.safetensors"
_ORDER = "fedsb.order"  # safetensors metadata: the tensors' names in the caller's order
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int8": torch.int8,  # fed.wire_dtype=int8 values (their fp32 scales travel beside them)
}


def _wire_dtype(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"cannot send a {t.dtype} tensor; use one of {sorted(_DTYPES)}")
    return name


def tensor_to_array(t: torch.Tensor) -> Array:
    """One tensor as an `Array` of its raw bytes (dtype kept, shape kept): the unpacked format."""
    name = _wire_dtype(t)
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
    """name -> tensor (already in its wire dtype) as an ArrayRecord of one packed `Array` (none if empty)."""
    if not tensors:
        return ArrayRecord()
    for t in tensors.values():
        _wire_dtype(t)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    shared = Counter(t.untyped_storage().data_ptr() for t in flat.values())
    flat = {k: t.clone() if shared[t.untyped_storage().data_ptr()] > 1 else t for k, t in flat.items()}
    data = safetensors.torch.save(flat, metadata={_ORDER: json.dumps(list(flat))})
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def from_record(record: ArrayRecord) -> Tensors:
    """Inverse of `to_record`: name -> tensor, in the sender's order."""
    if PACKED in record and record[PACKED].stype == PACKED_STYPE:
        data = record[PACKED].data
        try:
            unpacked = safetensors.torch.load(data)
            order = json.loads((_header(data).get("__metadata__") or {}).get(_ORDER, "[]"))
        except (SafetensorError, struct.error, AttributeError) as exc:  # not a safetensors buffer
            raise ValueError(f"a packed record that cannot be read ({exc})") from exc
        return {k: unpacked[k] for k in order} if set(order) == set(unpacked) else unpacked
    return {k: array_to_tensor(v) for k, v in record.items()}


def payload_bytes(record: ArrayRecord) -> int:
    """Bytes of tensor data in a record (numel x element size, summed: equals the ledger's figure)."""
    total = 0
    for a in record.values():
        total += len(a.data) - (8 + _header_length(a.data) if a.stype == PACKED_STYPE else 0)
    return total


def _header_length(data: bytes) -> int:
    """A safetensors buffer: 8 bytes (little-endian u64 N), N bytes of JSON header, then the tensors."""
    return struct.unpack("<Q", data[:8])[0]


def _header(data: bytes) -> dict:
    return json.loads(data[8 : 8 + _header_length(data)])
