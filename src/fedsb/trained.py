"""A finished run's artefacts: the final export, reloading the trained model, exporting it again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedsb.config import config_from_dict, load_yaml
from fedsb.errors import CheckpointError, ConfigError
from fedsb.job import CONFIG_FILE, build_components


def export_final(method: Any, loaded: Any, tokenizer: Any, out: Path, *, rounds: int) -> dict[str, Any]:
    """adapter/ (the trained tensors) and peft/ where the export is lossless, else merged/ (W0 changed)."""
    from fedsb.export import export_merged, export_peft, has_folds, save_adapter

    adapted = method.adapted
    method.verify_basis(before="export the run")  # the B, A being exported are the ones trained with
    save_adapter(
        adapted,
        out / "adapter",
        base_model=loaded.name,
        basis_fingerprint=method.basis_fingerprint,
        extra_meta={"method": method.name, "rounds": rounds},
    )
    if has_folds(adapted) or not adapted.layers:
        export_merged(adapted, out / "merged", tokenizer=tokenizer)
        why = f"{method.name} folds updates into W0" if adapted.layers else "full fine-tuning has no adapter"
        return {"format": "merged", "directory": str(out / "merged"), "why": why}
    base = loaded.source if os.path.isdir(loaded.source) else loaded.name
    return {"format": "peft", **export_peft(adapted, out / "peft", base_model=base)}


def load_trained(
    run_dir: str | Path, *, device: str | None = None, dtype: str | None = None, quantize: str | None = None
) -> tuple[Any, Any, Any]:
    """(method with the final global state installed, tokenizer, loaded model info) of a run directory.

    Rebuilds the base model (on the run's `device` setting, or `device`; in the dtype and quantization its
    checkpoint records), the method's adapters (Fed-SB: from basis/) and the last checkpoint's global state
    (and, for FedEx-LoRA / FLoRA, the updates folded into W0), through the job recipe. A Fed-SB run whose
    basis/ is missing, or does not hash to the fingerprint its checkpoint recorded, is refused
    (`CheckpointError`); `dtype` or `quantize` (model.dtype / model.quantize values) other than the
    checkpoint's are refused with a `ConfigError` (`fedsb.fed.checkpoint.check_placement`).
    """
    from fedsb.fed.checkpoint import RunState, check_placement, latest_checkpoint, placement_record
    from fedsb.init.integrity import check_run_basis, require_run_basis
    from fedsb.job import placement_of

    d = Path(run_dir)
    latest = latest_checkpoint(d / "checkpoints") if (d / CONFIG_FILE).is_file() else None
    if latest is None:
        raise CheckpointError(
            f"{d} is not a fedsb run with a checkpoint (config.yaml and checkpoints/ expected)"
        )
    cfg = config_from_dict(load_yaml(d / CONFIG_FILE))
    state = RunState.load(latest)
    require_run_basis(d, state.basis_fingerprint)
    if device is not None:
        cfg.device = device
    if dtype is not None:
        cfg.model.dtype = dtype
    if quantize is not None:
        cfg.model.quantize = quantize
    if state.placement and dtype is None:  # the base in the dtype it was trained with, whatever `auto` means
        cfg.model.dtype = state.placement["model_dtype"]
    placement = placement_of(cfg)
    check_placement(state, placement_record(cfg, placement), latest, purpose="load")
    parts = build_components(cfg, role="trained", setup_dir=d, resume=True, placement=placement)
    check_run_basis(d, state.basis_fingerprint, parts.method.basis_fingerprint, latest.name)
    parts.method.load_state_tensors(state.global_tensors)
    return parts.method, parts.tokenizer, parts.loaded


def export_run(run_dir: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Export a run's final model as a standard PEFT LoRA directory or a merged HF checkpoint.

    `out` must be new or empty (or `overwrite`: its contents are replaced); the export is written next to
    it and swapped in only when complete, so a failed export leaves `out` as it was."""
    from fedsb.export import export_merged, export_peft, has_folds
    from fedsb.paths import check_export_target, replace_dir

    if fmt not in ("peft", "merged"):
        raise ConfigError(field="--format", value=fmt, fix="use peft or merged")
    target = check_export_target(out, run_dir, overwrite=overwrite)
    method, tokenizer, loaded = load_trained(run_dir)
    method.verify_basis(before="export the run")
    if fmt == "peft" and (has_folds(method.adapted) or not method.adapted.layers):
        why = "it folds updates into W0" if method.adapted.layers else "it trains no adapter"
        raise ConfigError(
            field="--format",
            value=fmt,
            what=f"cannot represent {method.name}: {why}",
            fix="use --format merged",
        )
    with replace_dir(target) as tmp:
        if fmt == "peft":
            base = loaded.source if os.path.isdir(loaded.source) else loaded.name
            summary = export_peft(method.adapted, tmp, base_model=base)
            tokenizer.save_pretrained(str(tmp))
        else:
            export_merged(method.adapted, tmp, tokenizer=tokenizer)
            summary = {"format": "merged"}
    return {**summary, "directory": str(out)}
