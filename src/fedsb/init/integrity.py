"""The basis fingerprint of the B and A a model actually holds, and the checks built on it.

`Basis.fingerprint` hashes a basis object; these functions hash the live `lora_sb_B` / `lora_sb_A`
(RAVAN: `ravan_B` / `ravan_A`) parameters of the adapted layers (the same SHA-256 over the same bytes, so the two agree right after
attaching). Fed-SB hashes once after attaching (the server's reference), every client hashes its own
model before it trains (the update carries that hash), exports re-verify, and a run directory's basis/
must hash to the fingerprint its checkpoint recorded. Cost: one pass of SHA-256 over r(m + n) fp32
numbers per layer (about 40 MB for SmolLM2-135M at r = 32 on all seven projections).
"""

from __future__ import annotations

from pathlib import Path

from fedsb.adapters.inject import AdaptedModel
from fedsb.adapters.layer import LoraSBLinear
from fedsb.adapters.ravan import RavanLinear
from fedsb.errors import CheckpointError
from fedsb.init.svd import fingerprint

#: layer type -> the names of its frozen, shared B and A (RAVAN: every head's, stacked)
BASIS_PARAMETERS: dict[type, tuple[str, str]] = {
    LoraSBLinear: ("lora_sb_B", "lora_sb_A"),
    RavanLinear: ("ravan_B", "ravan_A"),
}


def live_fingerprint(adapted: AdaptedModel) -> str | None:
    """SHA-256 of the B, A and scale the model's basis layers (LoRA-SB, RAVAN) hold now (None: none)."""
    layers = {p: m for p, m in adapted.layers.items() if type(m) in BASIS_PARAMETERS}
    if not layers:
        return None
    scalings = {m.scaling for m in layers.values()}
    scaling = scalings.pop() if len(scalings) == 1 else float("nan")  # one basis has one scale
    names = {p: BASIS_PARAMETERS[type(m)] for p, m in layers.items()}
    return fingerprint(
        {p: (getattr(m, names[p][0]), getattr(m, names[p][1])) for p, m in layers.items()}, scaling
    )


def verify_live_basis(adapted: AdaptedModel, expected: str, *, before: str) -> None:
    """Raise `CheckpointError` if the model's B and A no longer hash to `expected`."""
    got = live_fingerprint(adapted)
    if got != expected:
        raise CheckpointError(
            f"refusing to {before}: the model's B and A hash to {(got or 'none')[:12]}, but its basis is "
            f"{expected[:12]} (B or A changed after the basis was attached); reload the run from its "
            "directory (fedsb export / fedsb run --resume) instead of using this model"
        )


def require_run_basis(run_dir: str | Path, recorded: str | None) -> None:
    """A run trained on a shared basis (`recorded` = its checkpoint's fingerprint) must still hold basis/."""
    basis_dir = Path(run_dir) / "basis"
    if recorded and not basis_dir.is_dir():
        raise CheckpointError(
            f"{basis_dir} is missing, but the run's checkpoint was trained on basis {recorded[:12]}; "
            "restore the run's own basis/ directory (it cannot be recomputed from the checkpoint)"
        )


def check_run_basis(run_dir: str | Path, recorded: str | None, live: str | None, checkpoint: str) -> None:
    """The basis loaded from a run's basis/ (`live`) must be the one its checkpoint recorded."""
    if recorded != live:
        raise CheckpointError(
            f"{Path(run_dir) / 'basis'} holds basis {(live or 'none')[:12]}, but checkpoint {checkpoint} was "
            f"trained on basis {(recorded or 'none')[:12]}: basis/ was replaced or belongs to another run; "
            "restore the run's own basis/ directory"
        )
