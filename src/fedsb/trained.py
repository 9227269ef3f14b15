"""A finished run's artefacts: the final export, reloading the trained model, exporting it again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedsb.config import config_from_dict, load_yaml
from fedsb.data.prepare import model_task
from fedsb.errors import CheckpointError, ConfigError
from fedsb.run import CONFIG_FILE, build_method
from fedsb.seeding import derive_seed


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


def load_trained(run_dir: str | Path) -> tuple[Any, Any, Any]:
    """(method with the final global state installed, tokenizer, loaded model info) of a run directory.

    Rebuilds the base model, the method's adapters (Fed-SB: from basis/) and the last checkpoint's global
    state (and, for FedEx-LoRA / FLoRA, the updates folded into W0). A Fed-SB run whose basis/ is missing,
    or does not hash to the fingerprint its checkpoint recorded, is refused (`CheckpointError`).
    """
    from fedsb.fed.checkpoint import latest_checkpoint, load_checkpoint
    from fedsb.init.integrity import check_run_basis, require_run_basis
    from fedsb.models import load_model

    d = Path(run_dir)
    latest = latest_checkpoint(d / "checkpoints") if (d / CONFIG_FILE).is_file() else None
    if latest is None:
        raise CheckpointError(
            f"{d} is not a fedsb run with a checkpoint (config.yaml and checkpoints/ expected)"
        )
    from fedsb.data.tasks import get_task

    cfg = config_from_dict(load_yaml(d / CONFIG_FILE))
    task = get_task(cfg.data.task, **cfg.data.options)
    loaded = load_model(
        cfg.model.name,
        dtype=cfg.model.dtype,
        seed=derive_seed(cfg.seed, "model") % (2**32),
        **model_task(task),
    )
    _, tensors, state = load_checkpoint(latest)
    require_run_basis(d, state.get("basis_fingerprint"))
    method = build_method(cfg, loaded.model, task, loaded.tokenizer, None, d, resume=True)
    check_run_basis(d, state.get("basis_fingerprint"), method.basis_fingerprint, latest.name)
    method.load_state_tensors(
        {k.removeprefix("global/"): v for k, v in tensors.items() if k.startswith("global/")}
    )
    return method, loaded.tokenizer, loaded


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> dict[str, Any]:
    """Export a run's final model as a standard PEFT LoRA directory or a merged HF checkpoint."""
    from fedsb.export import export_merged, export_peft, has_folds

    method, tokenizer, loaded = load_trained(run_dir)
    method.verify_basis(before="export the run")
    if fmt == "peft":
        if has_folds(method.adapted):
            raise ConfigError(
                field="--format",
                value=fmt,
                what=f"cannot represent {method.name}: it folds updates into W0",
                fix="use --format merged",
            )
        base = loaded.source if os.path.isdir(loaded.source) else loaded.name
        summary = export_peft(method.adapted, out, base_model=base)
        tokenizer.save_pretrained(str(out))
        return summary
    if fmt == "merged":
        export_merged(method.adapted, out, tokenizer=tokenizer)
        return {"directory": str(out), "format": "merged"}
    raise ConfigError(field="--format", value=fmt, fix="use peft or merged")
