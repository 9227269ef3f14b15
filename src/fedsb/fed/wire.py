"""What travels: each tensor cast to the wire dtype, or (fed.wire_dtype=int8) int8 changes with scales.

Cast codecs (float32, bfloat16, float16) send the tensors themselves, as they always did. The int8
codec sends changes of the global state T (methods in `MEAN_STATE_METHODS`), absmax-quantized:

    q = round(x / s) in [-127, 127],  s = max|x| / 127  (per tensor, or per row of a 2-D tensor),
    dequant(q, s) = q s,  |dequant - x| <= s / 2 per entry.

Download. The server keeps H, the state every client reconstructs: H_{-1} = 0 and after round t (t = 0:
the initial state) it publishes entry_t = quantize(T_t - H_{t-1}), H_t = H_{t-1} + dequant(entry_t).
Round t's download carries the entries a sampled client may lack (those after the oldest one any of them
holds); a client applies the entries after the one it holds and trains from H_{t-1}. The gap T - H never
exceeds s/2 per entry and is carried into the next entry (the download's own error feedback).

Upload. Client i sends quantize(R_i - H_{t-1} [+ e_i]) (e_i: its last rounding error, with
fed.error_feedback); the server decodes H_{t-1} + dequant(.) and aggregates as usual, so the new global
state is the weighted mean of the client models up to the quantization error: per entry at most
sum_i p_i s_i / 2 (`aggregate_error_bound`). Bytes: one per entry plus 4 per scale, counted by the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedsb.comm.extras import scale_count

Tensors = dict[str, torch.Tensor]

#: wire dtype name -> torch dtype of the tensors on the wire
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
}
SCALE = "::scale"  # a tensor's scales travel under its name + SCALE
QMAX = 127


# ---- the quantizer ----------------------------------------------------------------------------------------
def quantize(x: torch.Tensor, per: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 of x's shape, s fp32: (1,) per tensor or (rows,) per row) with q = round(x / s)."""
    x = x.detach().to(device="cpu", dtype=torch.float32)
    if per == "row" and x.dim() >= 2:
        absmax = x.abs().reshape(x.shape[0], -1).amax(dim=1)  # (rows,)
    else:
        absmax = x.abs().amax().reshape(1) if x.numel() else torch.zeros(1)  # (1,)
    scale = absmax / QMAX
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero tensor sends q = 0
    q = torch.round(x / _broadcast(divisor, x)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q s in fp32 (s broadcast over each row, or over the whole tensor)."""
    return q.to(torch.float32) * _broadcast(scale.to(torch.float32), q)


def _broadcast(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(1,) or (rows,) scales shaped to broadcast against `like`."""
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(scale.shape[0], *([1] * (like.dim() - 1)))


def encode_int8(tensors: Mapping[str, torch.Tensor], per: str) -> Tensors:
    """name -> int8 values and name + SCALE -> fp32 scales."""
    out: Tensors = {}
    for k, v in tensors.items():
        out[k], out[k + SCALE] = quantize(v, per)
    return out


def decode_int8(payload: Mapping[str, torch.Tensor]) -> Tensors:
    """Inverse of `encode_int8` up to the rounding: name -> dequantized fp32."""
    return {k: dequantize(v, payload[k + SCALE]) for k, v in payload.items() if not k.endswith(SCALE)}


def scale_shape(shape: Sequence[int], per: str) -> tuple[int, ...]:
    """The scales' shape of a tensor of `shape`: (rows,) per row of a 2-D tensor, else (1,) (`scale_count`)."""
    return (scale_count(shape, per),)


def aggregate_error_bound(scales: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Tensors:
    """Per entry, the most the decoded weighted mean can differ from the exact one: sum_i p_i s_i / 2
    (each name's bound broadcasts against its tensor; `scales`: the clients' int8 payloads)."""
    total = float(sum(weights))
    out: Tensors = {}
    for payload, w in zip(scales, weights, strict=True):
        for k, s in payload.items():
            if k.endswith(SCALE):
                name = k.removesuffix(SCALE)
                half = _broadcast(s.double(), payload[name]) / 2  # () or (rows, 1, ...)
                out[name] = out.get(name, 0) + (w / total) * half
    return out


# ---- server side ------------------------------------------------------------------------------------------
class CastWire:
    """Tensors cast to a float wire dtype both ways (no state)."""

    delta = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.dtype = WIRE_DTYPES[name]

    def download(self, state: Mapping[str, torch.Tensor], *, round: int, since: int) -> Tensors:
        return cast(state, self.dtype)

    def reference(self, state: Mapping[str, torch.Tensor]) -> Tensors:
        """What every client starts the round from, as far as the server checks norms and clips."""
        return dict(state)

    def upload_spec(
        self, spec: Mapping[str, tuple[int, ...]]
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(s), self.dtype) for k, s in spec.items()}

    def decode_upload(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        return {k: v.to(torch.float32) for k, v in tensors.items()}

    def release(self, held_by_all: int) -> None:
        return None

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        return None


class Int8Wire:
    """The server's int8 codec: the clients' reconstruction H, and the entries not every client holds."""

    delta = True
    name = "int8"

    def __init__(self, per: str = "tensor") -> None:
        self.per = per
        self.held: Tensors | None = None  # H: what a client holding every entry reconstructs
        self.index = -1  # the last published entry
        self.entries: dict[int, Tensors] = {}  # index -> encode_int8(T_index - H_{index-1})

    def publish(self, state: Mapping[str, torch.Tensor], index: int) -> None:
        """Entry `index` (the state after round `index`): quantize(T - H), H += dequant."""
        held = self.held if self.held is not None else {k: torch.zeros_like(v) for k, v in state.items()}
        entry = encode_int8({k: state[k].to(torch.float32) - held[k] for k in state}, self.per)
        change = decode_int8(entry)
        self.held = {k: held[k] + change[k] for k in state}
        self.entries[index] = entry
        self.index = index

    def download(self, state: Mapping[str, torch.Tensor], *, round: int, since: int) -> Tensors:
        """Round `round`'s download: entries since+1 .. round-1 (publishing round-1's first), keyed
        `<index>/<name>` and `<index>/<name>::scale`; `since`: the oldest entry a receiving client holds."""
        if self.index < round - 1:
            self.publish(state, round - 1)
        out: Tensors = {}
        for index in sorted(self.entries):
            if index > since:
                out.update({f"{index}/{k}": v for k, v in self.entries[index].items()})
        return out

    def reference(self, state: Mapping[str, torch.Tensor]) -> Tensors:
        assert self.held is not None, "the round's download is built before its updates arrive"
        return dict(self.held)

    def upload_spec(
        self, spec: Mapping[str, tuple[int, ...]]
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor as int8 of its shape, and its scales as fp32."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for k, s in spec.items():
            out[k] = (tuple(s), torch.int8)
            out[k + SCALE] = (scale_shape(s, self.per), torch.float32)
        return out

    def decode_upload(self, tensors: Mapping[str, torch.Tensor]) -> Tensors:
        """H + dequant(change): the client's model, up to its rounding."""
        assert self.held is not None
        change = decode_int8(tensors)
        return {k: self.held[k] + change[k] for k in change}

    def release(self, held_by_all: int) -> None:
        """Forget entries every client holds (index <= held_by_all)."""
        for index in [i for i in self.entries if i <= held_by_all]:
            del self.entries[index]

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        """(tensors `wire/held/<name>`, `wire/<index>/<name>[::scale]`; {index, entries})."""
        tensors: Tensors = {f"wire/held/{k}": v for k, v in (self.held or {}).items()}
        for index, entry in self.entries.items():
            tensors.update({f"wire/{index}/{k}": v for k, v in entry.items()})
        return tensors, {"index": self.index, "entries": sorted(self.entries), "per": self.per}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        def under(prefix: str) -> Tensors:
            return {k.removeprefix(prefix): v.clone() for k, v in tensors.items() if k.startswith(prefix)}

        self.index = int(meta["index"])
        self.held = under("wire/held/") or None
        self.entries = {int(i): under(f"wire/{i}/") for i in meta["entries"]}


def server_wire(name: str, per: str = "tensor") -> CastWire | Int8Wire:
    """The server's codec for fed.wire_dtype=`name` (fed.wire_scale=`per` for int8)."""
    return Int8Wire(per) if name == "int8" else CastWire(name)


def cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Tensors:
    """Cast tensors to the wire dtype on the CPU (what actually travels, whatever the model's device)."""
    return {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in tensors.items()}


# ---- client side ------------------------------------------------------------------------------------------
def split_entries(payload: Mapping[str, torch.Tensor]) -> dict[int, Tensors]:
    """A download's `<index>/<name>` keys grouped by entry index."""
    entries: dict[int, Tensors] = {}
    for key, v in payload.items():
        index, _, name = key.partition("/")
        if not index.lstrip("-").isdigit() or not name:
            raise ValueError(f"an int8 download key is <entry index>/<name>, got {key!r}")
        entries.setdefault(int(index), {})[name] = v
    return entries


class ClientInt8:
    """One client's side of the int8 codec: the H it holds (and its entry index) and its rounding error."""

    def __init__(self, per: str = "tensor", error_feedback: bool = False) -> None:
        self.per = per
        self.error_feedback = error_feedback
        self.index = -1
        self.held: Tensors = {}
        self.residual: Tensors = {}

    def receive(self, payload: Mapping[str, torch.Tensor]) -> Tensors:
        """Apply the download's entries after the one held; the state to train from (H)."""
        entries = split_entries(payload)
        new = sorted(i for i in entries if i > self.index)
        if new and new[0] != self.index + 1:
            raise RuntimeError(
                f"the download starts at entry {new[0]}, but this client holds entry {self.index}: "
                "it missed an entry and cannot rebuild the global state"
            )
        for index in new:
            change = decode_int8(entries[index])
            self.held = {k: self.held.get(k, torch.zeros_like(v)) + v for k, v in change.items()}
            self.index = index
        return {k: v.clone() for k, v in self.held.items()}

    def upload(self, state: Mapping[str, torch.Tensor]) -> Tensors:
        """quantize(T_i - H [+ e_i]); with error feedback, e_i = what that rounding dropped."""
        change = {k: state[k].detach().to(device="cpu", dtype=torch.float32) - self.held[k] for k in state}
        if self.error_feedback:
            change = {k: v + self.residual[k] if k in self.residual else v for k, v in change.items()}
        payload = encode_int8(change, self.per)
        if self.error_feedback:
            sent = decode_int8(payload)
            self.residual = {k: change[k] - sent[k] for k in change}
        return payload

    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        tensors = {f"held/{k}": v for k, v in self.held.items()}
        tensors.update({f"residual/{k}": v for k, v in self.residual.items()})
        return tensors, {"index": self.index}

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        self.index = int(meta["index"])
        self.held = {k.removeprefix("held/"): v.clone() for k, v in tensors.items() if k.startswith("held/")}
        self.residual = {
            k.removeprefix("residual/"): v.clone() for k, v in tensors.items() if k.startswith("residual/")
        }
