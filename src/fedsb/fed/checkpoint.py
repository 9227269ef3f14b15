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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from fedsb.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from fedsb.config import RunConfig
    from fedsb.device import Placement

TENSORS = "tensors.safetensors"
STATE = "state.json"
CHECKSUM = "CHECKSUM"
GLOBAL_PREFIX = "global/"  # the server's global state (`FederatedMethod.state_tensors`)
CLIENT_PREFIX = "opt/"  # client-side state the executor keeps (optimizer states)
SERVER_PREFIX = "server/"  # server-side state besides the global one (the server optimizer's)

Tensors = dict[str, torch.Tensor]


@dataclass
class RunState:
    """Everything a run needs to continue after round `round`, device-free (CPU tensors, JSON metadata).

    On disk: `global/<name>`, `opt/<client>/<param>/<key>` and `server/<...>` (the server optimizer's and
    the int8 wire's state) tensors and the rest in state.json, the layout of every earlier checkpoint plus
    `server/`, so those stay readable. `placement` records the device and base dtype that wrote it,
    `sessions` the wall time of each session of the run so far (both absent in checkpoints of older versions).
    """

    round: int
    basis_fingerprint: str | None
    global_tensors: Tensors
    client_tensors: Tensors = field(default_factory=dict)
    client_meta: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    ledger: dict[str, Any] = field(default_factory=dict)
    sampler: dict[str, Any] = field(default_factory=dict)
    before: dict[str, Any] | None = None
    torch_rng: list[int] = field(default_factory=list)
    privacy: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None
    sessions: list[dict[str, Any]] = field(default_factory=list)  # wall time of each session so far
    server_tensors: Tensors = field(default_factory=dict)
    server_meta: dict[str, Any] = field(default_factory=dict)

    def to_tensors(self) -> tuple[Tensors, dict[str, Any]]:
        """(tensors keyed by their on-disk names, on the CPU; the JSON state)."""
        tensors = {GLOBAL_PREFIX + k: v.detach().cpu() for k, v in self.global_tensors.items()}
        tensors.update({CLIENT_PREFIX + k: v.detach().cpu() for k, v in self.client_tensors.items()})
        tensors.update({SERVER_PREFIX + k: v.detach().cpu() for k, v in self.server_tensors.items()})
        state = {
            "basis_fingerprint": self.basis_fingerprint,
            "history": self.history,
            "ledger": self.ledger,
            "sampler": self.sampler,
            "executor": self.client_meta,
            "before": self.before,
            "torch_rng": self.torch_rng,
            "privacy": self.privacy,
            "placement": self.placement,
            "sessions": self.sessions,
            "server": self.server_meta,
        }
        return tensors, state

    @classmethod
    def from_tensors(cls, round: int, tensors: Tensors, state: dict[str, Any]) -> RunState:
        """Inverse of `to_tensors` (also for checkpoints written before `placement` existed)."""

        def under(prefix: str) -> Tensors:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        return cls(
            round=round,
            basis_fingerprint=state["basis_fingerprint"],
            global_tensors=under(GLOBAL_PREFIX),
            client_tensors=under(CLIENT_PREFIX),
            client_meta=state.get("executor") or {},
            history=list(state["history"]),
            ledger=state["ledger"],
            sampler=state.get("sampler") or {},
            before=state.get("before"),
            torch_rng=list(state["torch_rng"]),
            privacy=state.get("privacy"),
            placement=state.get("placement"),
            sessions=list(state.get("sessions") or []),
            server_tensors=under(SERVER_PREFIX),
            server_meta=state.get("server") or {},
        )

    def save(self, root: str | Path, *, keep: int = 2) -> Path:
        tensors, state = self.to_tensors()
        return save_checkpoint(root, self.round, tensors, state, keep=keep)

    @classmethod
    def load(cls, directory: str | Path) -> RunState:
        """The state in a checkpoint directory, after its checksum is verified."""
        return cls.from_tensors(*load_checkpoint(directory))


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
    """Split a torch optimizer state_dict into CPU tensors (keyed `prefix/<param>/<key>`) and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{pid}/{key}"] = value.detach().cpu()
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


# ---- what a checkpoint may be continued with -------------------------------------------------------------


def placement_record(cfg: RunConfig, placement: Placement) -> dict[str, Any]:
    """The precision a checkpoint was written under: the frozen base's dtype and quantization (none, nf4,
    int8), and the device, which is informative only (checkpoints are device-free)."""
    return {
        "device": str(placement.device),
        "model_dtype": placement.dtype_name,
        "quantize": placement.quantize,
    }


def check_placement(
    state: RunState, current: dict[str, Any], where: Path, *, purpose: str = "resume"
) -> None:
    """Refuse to continue (or load: `purpose`) a checkpoint under another frozen-base precision, a base
    dtype or quantization other than the one that wrote it: it would change W0 under the trained state.

    A different device is fine: checkpoints hold CPU tensors and every random draw is seeded per round.
    Checkpoints older than this record carry none and are accepted as they are under a dense base; a
    record without `quantize` (or none at all) was written before quantized bases existed, by a dense
    (none) base.
    """
    saved = state.placement or ({"device": "unknown"} if current["quantize"] != "none" else None)
    if not saved:
        return
    defaults = {"model_dtype": current["model_dtype"], "quantize": "none"}
    for key, name in (("quantize", "model.quantize"), ("model_dtype", "model.dtype")):
        was = saved.get(key, defaults[key])
        if was != current[key]:
            then = (
                "continuing would train the remaining rounds"
                if purpose == "resume"
                else "the model would run"
            )
            raise ConfigError(
                field=name,
                value=current[key],
                what=f"differs from the {was} base that wrote checkpoint {where} (on {saved['device']}); "
                f"{then} on a different frozen W0 than the one the adapter was trained on",
                fix=f"{purpose} with {name}={was} (it runs on any device)"
                + (", or start a new run" if purpose == "resume" else ""),
            )
