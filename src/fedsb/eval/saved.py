"""`fedsb eval`: evaluate a finished run directory, an exported PEFT LoRA directory or a base model, without
training. Loading is here; scoring is `fedsb.eval.evaluate.evaluate_task`."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedsb.errors import ConfigError, naming_settings

__all__ = ["EvalTarget", "SavedEval", "evaluate_saved", "format_report", "load_target"]

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

    placement = resolve_placement(device, dtype, quantize)
    quantized = quantize != "none"
    on = {"dtype": placement.dtype, "device": placement.device, "seed": seed, "quantize": quantize}
    if target is None:
        if not model:
            raise ConfigError(
                field="--model", value=model, fix="name a model, or give a run or PEFT directory"
            )
        with naming_settings({"model.name": "--model"}):
            loaded = load_model(model, **on, hub=hub, **model_task(task))
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
        peft = PeftModel.from_pretrained(loaded.model, str(path))
        ready = peft if quantized else peft.merge_and_unload()  # merging into 4/8 bits would requantize
        return EvalTarget(ready, loaded.tokenizer, "peft", base)
    raise ConfigError(
        field="target", value=str(target),
        what="is neither a fedsb run directory (config.yaml, checkpoints/) nor a PEFT directory (adapter_config.json)",
        fix="give a finished run's directory, its exported peft/ directory, or no target with --model",
    )  # fmt: skip


@dataclass(frozen=True)
class SavedEval:
    """What `fedsb eval` asks for. Unset (None) fields come from a run directory's config, else the config
    defaults; ``size`` "auto" is the config's ``data.test_size``. ``task_name`` (and ``task_options``), the
    split, size and seed pick the rows; ``scorer`` ... ``bf16`` are `Scoring`'s; ``model``, ``device``,
    ``dtype``, ``quantize`` and ``hub`` how the target is loaded (`load_target`)."""

    task_name: str | None = None
    task_options: dict[str, Any] | None = None
    model: str | None = None
    split: str | None = None
    size: int | None | str = "auto"
    scorer: str | None = None
    normalize: str | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    bf16: bool | None = None
    seed: int | None = None
    progress: bool = False
    device: str | None = None
    hub: bool | None = None
    dtype: str | None = None
    quantize: str | None = None

    def scoring(self, cfg: Any) -> Any:
        """`Scoring` from the config's evaluation settings, this request's set fields on top."""
        from fedsb.eval.evaluate import Scoring

        asked = {  # an empty scorer, normalize, batch size or max length means the config's, as before
            "scorer": self.scorer or None, "normalize": self.normalize or None,
            "batch_size": self.batch_size or None, "max_length": self.max_length or None,
            "max_new_tokens": self.max_new_tokens, "bf16": self.bf16,
        }  # fmt: skip
        return Scoring.from_config(
            cfg, progress=self.progress, **{k: v for k, v in asked.items() if v is not None}
        )


def evaluate_saved(target: str | None, request: SavedEval | None = None, **changes: Any) -> dict[str, Any]:
    """Evaluate ``target`` (see ``load_target``) as ``request`` asks (``changes``: its field names) and
    return a JSON-ready report.

    For a run directory every unset field comes from the run's config (task, options, evaluation split
    and size, scorer, batch size, bf16 autocast, ...), so the report reproduces the run's final
    evaluation. Otherwise ``task_name`` is required and the defaults are the config defaults. ``dtype`` /
    ``quantize``: the base's precision (a run directory's must be its checkpoint's: anything else is
    refused with a reason).
    """
    from fedsb.config import RunConfig
    from fedsb.eval.evaluate import evaluate_task

    ask = replace(request or SavedEval(), **changes)
    run_cfg = _run_config(target)
    cfg = run_cfg or RunConfig()
    name, options, task = _task_for(ask, run_cfg)
    loaded = load_target(
        target, model=ask.model, task=task, dtype=ask.dtype or cfg.model.dtype, seed=cfg.seed,
        device=ask.device or cfg.device, hub=cfg.model.hub if ask.hub is None else ask.hub,
        quantize=ask.quantize or cfg.model.quantize, run_precision=(ask.dtype, ask.quantize),
    )  # fmt: skip
    split = ask.split or cfg.data.eval_split
    seed = cfg.seed if ask.seed is None else ask.seed
    rows = _rows(task, split, cfg.data.test_size if ask.size == "auto" else ask.size, seed)
    result = evaluate_task(loaded.model, loaded.tokenizer, task, rows, ask.scoring(cfg))
    return {
        "target": None if target is None else os.fspath(target),
        "kind": loaded.kind,
        "model": loaded.model_name,
        "task": name,
        "task_options": options,
        "split": split,
        "seed": seed,
        **result.to_dict(),
        "examples_per_second": result.examples_per_second,
    }


def _run_config(target: str | None) -> Any | None:
    """The RunConfig of a run directory ``target``, else None; a missing target is refused."""
    from fedsb.config import config_from_dict, load_yaml

    if target is not None and not Path(target).expanduser().exists():
        raise ConfigError(
            field="target", value=os.fspath(target), what="does not exist",
            fix="give a run directory, an exported PEFT directory, or no target with --model <base model>",
        )  # fmt: skip
    if target is not None and (Path(target) / "config.yaml").is_file():
        return config_from_dict(load_yaml(Path(target) / "config.yaml"))
    return None


def _task_for(ask: SavedEval, run_cfg: Any | None) -> tuple[str, dict[str, Any], Any]:
    """(task name, options, task): the asked one, else the run's (its options too when it is the run's);
    another task than the run's is refused where either has a classification head."""
    from fedsb.data.tasks import get_task

    name = ask.task_name or (run_cfg.data.task if run_cfg else None)
    if not name:
        raise ConfigError(field="--task", value=None, fix="name the task to evaluate on, e.g. --task gsm8k")
    same_task = run_cfg is not None and name == run_cfg.data.task
    options = {**(run_cfg.data.options if same_task else {}), **(ask.task_options or {})}
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
                field="--task", value=ask.task_name,
                what=f"({task.kind}) does not fit the run's model, trained on {run_cfg.data.task!r} ({trained.kind})",
                fix=fix,
            )  # fmt: skip
    return name, options, task


def _rows(task: Any, split: str, size: int | None, seed: int) -> Any:
    """The rows of ``split``: the run's own sample of ``size`` (a size larger than the split: all)."""
    rows = task.load(split, None, seed)
    if isinstance(size, int) and size < len(rows):
        rows = task.load(split, size, seed)
    return rows


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
