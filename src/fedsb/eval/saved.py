"""`fedsb eval`: evaluate a finished run directory, an exported PEFT LoRA directory or a base model, without
training. Loading is here; scoring is `fedsb.eval.evaluate.evaluate_task`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsb.errors import ConfigError, naming_settings

__all__ = ["EvalTarget", "evaluate_saved", "format_report", "load_target"]

_PEFT_CONFIG = "adapter_config.json"


@dataclass
class EvalTarget:
    """A model ready to score, its tokenizer, what it is, and the run config's evaluation defaults."""

    model: Any
    tokenizer: Any
    kind: str  # "run", "peft" or "base"
    model_name: str
    run_config: Any | None = None  # the RunConfig of a run directory


def _peft_task_type(directory: Path) -> tuple[str, str]:
    config = json.loads((directory / _PEFT_CONFIG).read_text())
    return str(config.get("base_model_name_or_path") or ""), str(config.get("task_type") or "CAUSAL_LM")


def load_target(
    target: str | None,
    *,
    model: str | None = None,
    task: Any = None,
    dtype: str = "auto",
    seed: int = 0,
    device: str = "auto",
    hub: bool = False,
    quantize: str = "none",
    run_precision: tuple[str | None, str | None] = (None, None),
) -> EvalTarget:
    """Load what ``target`` names: a run directory (config.yaml + checkpoints/: the final global model,
    rebuilt by the job recipe), a PEFT LoRA directory (adapter_config.json; base from ``model`` or the
    adapter's base_model_name_or_path; merged for speed) or, for ``target=None``, the base model ``model``
    itself; on ``device`` (auto, cpu, cuda[:N], mps) in ``dtype`` (auto: bf16 on CUDA, else fp32), its
    linear layers in 4/8 bits with ``quantize`` (nf4, int8; the PEFT adapter then stays unmerged). A run
    directory is rebuilt as its checkpoint records; ``run_precision`` (dtype, quantize) asked for
    explicitly must match it (`fedsb.trained.load_trained`). ``hub``: base models may be downloaded from
    the Hugging Face hub (see `fedsb.models.load_model`)."""
    from fedsb.data.prepare import model_task
    from fedsb.device import resolve_placement
    from fedsb.models import load_model
    from fedsb.models.quantize import place_quantized

    placement = resolve_placement(device, dtype, quantize)
    quantized = quantize != "none"
    on = {"dtype": placement.dtype, "device": None if quantized else placement.device, "seed": seed}
    if target is None:
        if not model:
            raise ConfigError(
                field="--model", value=model, fix="name a model, or give a run or PEFT directory"
            )
        with naming_settings({"model.name": "--model"}):
            loaded = load_model(model, **on, hub=hub, **model_task(task))
        place_quantized(loaded.model, quantize, compute_dtype=placement.dtype, device=placement.device)
        return EvalTarget(loaded.model, loaded.tokenizer, "base", model)
    path = Path(target).expanduser()
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        from fedsb.trained import load_trained

        if model:
            raise ConfigError(
                field="--model", value=model, what="does not apply to a run directory (its config names the model)",
                fix="drop --model, or evaluate the run's exported peft/ directory with --model",
            )  # fmt: skip
        from fedsb.config import config_from_dict, load_yaml

        method, tokenizer, loaded = load_trained(
            path, device=device, dtype=run_precision[0], quantize=run_precision[1]
        )
        method.install_global()
        cfg = config_from_dict(load_yaml(path / "config.yaml"))
        return EvalTarget(method.adapted.model, tokenizer, "run", loaded.name, run_config=cfg)
    if (path / _PEFT_CONFIG).is_file():
        from peft import PeftModel

        base, task_type = _peft_task_type(path)
        base = model or base
        if not base:
            raise ConfigError(
                field="--model", value=None, what=f"is needed: {path / _PEFT_CONFIG} names no base model",
                fix="pass --model <base model alias, directory or hub id>",
            )  # fmt: skip
        wanted = model_task(task)
        if (task_type == "SEQ_CLS") != (wanted["task"] == "seq_cls"):
            raise ConfigError(
                field="--task", value=getattr(task, "name", task),
                what=f"does not fit the adapter's task_type {task_type}",
                fix="pick a task of the kind the adapter was trained for (data.options.mode for classification)",
            )  # fmt: skip
        with naming_settings({"model.name": "--model"} if model else {}):
            loaded = load_model(base, **on, hub=hub, **wanted)
        place_quantized(loaded.model, quantize, compute_dtype=placement.dtype, device=placement.device)
        peft = PeftModel.from_pretrained(loaded.model, str(path))
        ready = peft if quantized else peft.merge_and_unload()  # merging into 4/8 bits would requantize
        return EvalTarget(ready, loaded.tokenizer, "peft", base)
    raise ConfigError(
        field="target", value=str(target),
        what="is neither a fedsb run directory (config.yaml, checkpoints/) nor a PEFT directory (adapter_config.json)",
        fix="give a finished run's directory, its exported peft/ directory, or no target with --model",
    )  # fmt: skip


def evaluate_saved(
    target: str | None,
    *,
    task_name: str | None = None,
    task_options: dict[str, Any] | None = None,
    model: str | None = None,
    split: str | None = None,
    size: int | None | str = "auto",
    scorer: str | None = None,
    normalize: str | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    bf16: bool | None = None,
    seed: int | None = None,
    progress: bool = False,
    device: str | None = None,
    hub: bool | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
) -> dict[str, Any]:
    """Evaluate ``target`` (see ``load_target``) and return a JSON-ready report.

    For a run directory every unset argument comes from the run's config (task, options, evaluation split
    and size, scorer, batch size, bf16 autocast, ...), so the report reproduces the run's final
    evaluation. Otherwise ``task_name`` is required and the defaults are the config defaults. ``dtype`` /
    ``quantize``: the base's precision (a run directory's must be its checkpoint's: anything else is
    refused with a reason).
    """
    from fedsb.config import RunConfig, config_from_dict, load_yaml
    from fedsb.data.tasks import get_task
    from fedsb.eval.evaluate import evaluate_task

    if target is not None and not Path(target).expanduser().exists():
        raise ConfigError(
            field="target", value=os.fspath(target), what="does not exist",
            fix="give a run directory, an exported PEFT directory, or no target with --model <base model>",
        )  # fmt: skip
    run_cfg = None
    if target is not None and (Path(target) / "config.yaml").is_file():
        run_cfg = config_from_dict(load_yaml(Path(target) / "config.yaml"))
    cfg = run_cfg or RunConfig()
    name = task_name or (run_cfg.data.task if run_cfg else None)
    if not name:
        raise ConfigError(field="--task", value=None, fix="name the task to evaluate on, e.g. --task gsm8k")
    same_task = run_cfg is not None and name == run_cfg.data.task
    options = {**(run_cfg.data.options if same_task else {}), **(task_options or {})}
    task = get_task(name, **options)
    if run_cfg is not None and not same_task:
        trained = get_task(run_cfg.data.task, **run_cfg.data.options)
        if task.format.has_head or trained.format.has_head:
            fix = (
                "score label words with the run's causal LM: --option mode=lm"
                if not trained.format.has_head
                else "a classification head is tied to its task's labels; evaluate on the run's task"
            )
            raise ConfigError(
                field="--task", value=task_name,
                what=f"({task.kind}) does not fit the run's model, trained on {run_cfg.data.task!r} ({trained.kind})",
                fix=fix,
            )  # fmt: skip
    hub = cfg.model.hub if hub is None else hub
    loaded = load_target(
        target, model=model, task=task, dtype=dtype or cfg.model.dtype, seed=cfg.seed,
        device=device or cfg.device, hub=hub, quantize=quantize or cfg.model.quantize,
        run_precision=(dtype, quantize),
    )  # fmt: skip
    the_split = split or cfg.data.eval_split
    n = cfg.data.test_size if size == "auto" else size
    the_seed = cfg.seed if seed is None else seed
    rows = task.load(the_split, None, the_seed)
    if isinstance(n, int) and n < len(
        rows
    ):  # the run's own sample (a default size larger than the split: all)
        rows = task.load(the_split, n, the_seed)
    result = evaluate_task(
        loaded.model,
        loaded.tokenizer,
        task,
        rows,
        scorer=scorer or cfg.eval.scorer,
        batch_size=batch_size or cfg.eval.batch_size,
        max_new_tokens=max_new_tokens if max_new_tokens is not None else cfg.eval.max_new_tokens,
        max_length=max_length or cfg.data.max_length,
        normalize=normalize or cfg.eval.normalize,
        bf16=(cfg.train.bf16 if cfg.eval.bf16 is None else cfg.eval.bf16) if bf16 is None else bf16,
        progress=progress,
    )
    return {
        "target": None if target is None else os.fspath(target),
        "kind": loaded.kind,
        "model": loaded.model_name,
        "task": name,
        "task_options": options,
        "split": the_split,
        "seed": the_seed,
        **result.to_dict(),
        "examples_per_second": result.examples_per_second,
    }


def format_report(report: dict[str, Any]) -> str:
    """A small table: per-category correct / total / accuracy, their average, and the overall accuracy."""
    lines = [
        f"{report['kind']} {report.get('target') or report['model']}: task {report['task']} "
        f"({report['split']}, {report['scorer']} scorer, {report['examples_per_second']:.2f} examples/s)",
        f"{'':16s} {'correct':>8s} {'total':>7s} {'accuracy':>9s}",
    ]
    for name, c in (report.get("per_category_counts") or {}).items():
        lines.append(f"{name:16s} {c['correct']:8d} {c['total']:7d} {100 * c['correct'] / c['total']:8.1f}%")
    if report.get("macro_accuracy") is not None and len(report.get("per_category_counts") or {}) > 1:
        lines.append(f"{'average':16s} {'':8s} {'':7s} {100 * report['macro_accuracy']:8.1f}%")
    lines.append(f"{'all':16s} {report['correct']:8d} {report['total']:7d} {100 * report['accuracy']:8.1f}%")
    return "\n".join(lines)
