"""Communication ledger: parameters and bytes per round, client, direction and tensor, plus one-time lines.

Each distinct payload layout (tensor names and sizes) is stored once as a schema; an entry references its
schema, so per-tensor counts of every message are exact without repeating 200 tensor names per client.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch

from fedsb.fed.wire import SCALE

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8, "int8": 1}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bytes(tensors: Mapping[str, torch.Tensor | int], width: int) -> int:
    """Bytes of a message: numel x element size per tensor (an int size at `width`)."""
    return sum(
        v * width if isinstance(v, int) else int(v.numel()) * v.element_size() for v in tensors.values()
    )


class Ledger:
    """Records messages; `summary()` gives per-round and total parameters/bytes up and down."""

    def __init__(self, wire_dtype: str = "float32") -> None:
        self.wire_dtype = wire_dtype
        self.schemas: list[dict[str, int]] = []
        self._schema_ids: dict[tuple, int] = {}
        self.entries: list[dict[str, Any]] = []
        self.one_time: list[dict[str, Any]] = []

    def _schema(self, tensors: Mapping[str, torch.Tensor | int]) -> int:
        sizes = {k: (v if isinstance(v, int) else int(v.numel())) for k, v in tensors.items()}
        key = tuple(sorted(sizes.items()))
        if key not in self._schema_ids:
            self._schema_ids[key] = len(self.schemas)
            self.schemas.append(dict(sorted(sizes.items())))
        return self._schema_ids[key]

    def record(
        self,
        *,
        round: int,
        client: str,
        direction: str,
        tensors: Mapping[str, torch.Tensor | int],
        dtype: str | None = None,
        status: str = "ok",
    ) -> dict[str, Any]:
        """One message of a round: direction 'down' (server -> client) or 'up' (client -> server).

        Parameters: the entries of every tensor but int8 scales. Bytes: each tensor's numel x its element
        size (int8 values and their fp32 scales count as they are); sizes given as ints at `dtype`'s width."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        dtype = dtype or self.wire_dtype
        sid = self._schema(tensors)
        params = sum(n for k, n in self.schemas[sid].items() if not k.endswith(SCALE))
        entry = {
            "round": round,
            "client": client,
            "direction": direction,
            "schema": sid,
            "params": params,
            "bytes": _bytes(tensors, DTYPE_BYTES[dtype]),
            "dtype": dtype,
            "status": status,
        }
        self.entries.append(entry)
        return entry

    def record_one_time(
        self,
        *,
        item: str,
        direction: str,
        clients: int,
        tensors: Mapping[str, torch.Tensor | int] | None = None,
        dtype: str = "float32",
        note: str = "",
    ) -> dict[str, Any]:
        """A one-time cost outside the rounds (basis broadcast, init data), for `clients` recipients."""
        sid = self._schema(tensors) if tensors else None
        per_client = sum(self.schemas[sid].values()) if sid is not None else 0
        entry = {
            "item": item,
            "direction": direction,
            "clients": clients,
            "schema": sid,
            "params_per_client": per_client,
            "params": per_client * clients,
            "bytes": per_client * clients * DTYPE_BYTES[dtype],
            "dtype": dtype,
            "note": note,
        }
        self.one_time.append(entry)
        return entry

    def per_round(self) -> list[dict[str, Any]]:
        rows: dict[int, dict[str, Any]] = defaultdict(
            lambda: {"params_up": 0, "params_down": 0, "bytes_up": 0, "bytes_down": 0, "clients": set()}
        )
        for e in self.entries:
            row = rows[e["round"]]
            row[f"params_{e['direction']}"] += e["params"]
            row[f"bytes_{e['direction']}"] += e["bytes"]
            row["clients"].add(e["client"])
        out = []
        for r in sorted(rows):
            row = rows[r]
            n = len(row.pop("clients"))
            out.append({"round": r, "clients": n, **row, "bytes_total": row["bytes_up"] + row["bytes_down"]})
        return out

    def summary(self) -> dict[str, Any]:
        rounds = self.per_round()
        tot = {k: sum(r[k] for r in rounds) for k in ("params_up", "params_down", "bytes_up", "bytes_down")}
        one_time_bytes = sum(e["bytes"] for e in self.one_time)
        per_client_round_up = [e["params"] for e in self.entries if e["direction"] == "up"]
        return {
            "wire_dtype": self.wire_dtype,
            "rounds": rounds,
            "totals": {
                **tot,
                "bytes_rounds": tot["bytes_up"] + tot["bytes_down"],
                "bytes_one_time": one_time_bytes,
                "bytes_all": tot["bytes_up"] + tot["bytes_down"] + one_time_bytes,
            },
            "params_per_client_per_round_one_way": max(per_client_round_up, default=0),
            "one_time": self.one_time,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "wire_dtype": self.wire_dtype,
            "schemas": self.schemas,
            "entries": self.entries,
            "one_time": self.one_time,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.wire_dtype = state["wire_dtype"]
        self.schemas = [dict(s) for s in state["schemas"]]
        self._schema_ids = {tuple(sorted(s.items())): i for i, s in enumerate(self.schemas)}
        self.entries = [dict(e) for e in state["entries"]]
        self.one_time = [dict(e) for e in state["one_time"]]
