"""Round checkpoints: tensors in safetensors, state in JSON, a SHA-256 checksum over both.

Layout: <dir>/round-0003/{tensors.safetensors, state.json, CHECKSUM}. A checkpoint is written to a
temporary directory and renamed into place, so a run killed while writing never leaves a half checkpoint;
only the newest `keep` checkpoints stay on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedsb.errors import CheckpointError

TENSORS = "tensors.safetensors"
STATE = "state.json"
CHECKSUM = "CHECKSUM"


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in (TENSORS, STATE):
        h.update(name.encode())
        with open(directory / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save_checkpoint(
    root: str | Path, round: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], *, keep: int = 2
) -> Path:
    """Write round `round`'s checkpoint atomically and prune older ones beyond `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round:04d}"
    tmp = root / f".round-{round:04d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    (tmp / STATE).write_text(json.dumps({"round": round, **state}, default=_json_default))
    (tmp / CHECKSUM).write_text(_digest(tmp) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("round-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set | tuple):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint directory under `root` (None if there is none)."""
    found = sorted(Path(root).glob("round-[0-9]*"))
    return found[-1] if found else None


def load_checkpoint(directory: str | Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(round, tensors, state) of a checkpoint, after verifying its checksum."""
    d = Path(directory)
    for name in (TENSORS, STATE, CHECKSUM):
        if not (d / name).is_file():
            raise CheckpointError(
                f"checkpoint {d} is incomplete: {name} is missing; delete it to resume from an earlier round"
            )
    expected = (d / CHECKSUM).read_text().strip()
    actual = _digest(d)
    if actual != expected:
        raise CheckpointError(
            f"checkpoint {d} is corrupted: checksum {actual[:12]} != recorded {expected[:12]}; "
            "delete this round's directory to resume from the previous checkpoint"
        )
    try:
        state = json.loads((d / STATE).read_text())
        tensors = load_file(str(d / TENSORS))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupted checkpoint
        raise CheckpointError(f"checkpoint {d} cannot be read: {exc}") from None
    return int(state["round"]), tensors, state


def flatten_optimizer_state(
    prefix: str, state: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a torch optimizer state_dict into tensors (keyed `prefix/<param>/<key>`) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{pid}/{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(
    prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """Inverse of `flatten_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "/"):
            _, pid, name = key.rsplit("/", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
