"""One entry point for evaluating any task: picks the scorer (generation, option likelihood or the
classification head) and reuses cached prompt ids across rounds."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedsb.data.cache import cached_prompt_ids
from fedsb.data.lm import encode_prompts
from fedsb.data.task import Task
from fedsb.errors import FedsbError
from fedsb.eval.generate import EvalResult

__all__ = ["SCORERS", "Scoring", "evaluate_task", "resolve_scorer"]

SCORERS: tuple[str, ...] = ("auto", "generate", "likelihood")


def resolve_scorer(task: Task, scorer: str, example: Any | None = None) -> str:
    """The scorer the task's format resolves ``scorer`` to (`TaskFormat.scorer`): "classify" for a head; else
    ``scorer``, "auto" meaning the task's ``default_scorer``; "likelihood" needs answer options
    (``task.choices(example)``, checked when ``example`` is given)."""
    if scorer not in SCORERS:
        raise FedsbError(field="eval.scorer", value=scorer, fix=f"use one of {', '.join(SCORERS)}")
    return task.format.scorer(task, scorer, example)


@dataclass(frozen=True)
class Scoring:
    """How to score: ``scorer`` (auto, generate, likelihood; `resolve_scorer`), ``batch_size``,
    ``max_new_tokens`` (generation; None: the task's), ``max_length`` (a head's input truncation),
    ``normalize`` (likelihood: "sum" or per-token "mean"), ``bf16`` autocast, ``limit`` (the first n
    examples of a head task), ``progress`` bars."""

    scorer: str = "auto"
    batch_size: int = 32
    max_new_tokens: int | None = None
    max_length: int = 128
    normalize: str = "sum"
    bf16: bool = False
    limit: int | None = None
    progress: bool = False

    @classmethod
    def from_config(cls, cfg: Any, **changes: Any) -> Scoring:
        """The run config's evaluation settings (``eval.*``, ``data.max_length``; ``eval.bf16`` null:
        ``train.bf16``), with ``changes`` on top."""
        bf16 = cfg.train.bf16 if cfg.eval.bf16 is None else cfg.eval.bf16
        settings = dict(
            scorer=cfg.eval.scorer, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
            max_length=cfg.data.max_length, normalize=cfg.eval.normalize, bf16=bf16,
        )  # fmt: skip
        return cls(**{**settings, **changes})


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    dataset: datasets.Dataset,
    scoring: Scoring | None = None,
    **changes: Any,
) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` as ``scoring`` (default `Scoring()`, with ``changes``: its field
    names) says, with the scorer the task's format resolves (``resolve_scorer``).

    Generation: greedy, ``max_new_tokens`` (default: the task's). Likelihood: ``normalize`` "sum" or
    "mean" (per token). Classification: argmax of the head, inputs truncated to ``max_length``.
    """
    s = replace(scoring or Scoring(), **changes)
    if len(dataset) == 0:
        raise FedsbError(field="dataset", value="<empty dataset>", fix="pass at least one example")
    chosen = resolve_scorer(task, s.scorer, dataset[0])
    if chosen == "classify":
        from fedsb.eval.classify import evaluate_classification

        return evaluate_classification(
            model, tokenizer, task, dataset, batch_size=s.batch_size, max_length=s.max_length, bf16=s.bf16,
            limit=s.limit, progress=s.progress,
        )  # type: ignore[arg-type]  # fmt: skip
    limit = s.limit
    if (
        limit is not None
        and isinstance(limit, int)
        and not isinstance(limit, bool)
        and 0 < limit < len(dataset)
    ):
        dataset = dataset.select(range(limit))
    prompt_ids = cached_prompt_ids(tokenizer, [task.prompt(ex) for ex in dataset], encode_prompts)
    if chosen == "likelihood":
        from fedsb.eval.likelihood import evaluate_likelihood

        return evaluate_likelihood(
            model, tokenizer, task, dataset, batch_size=s.batch_size, normalize=s.normalize, bf16=s.bf16,
            progress=s.progress, prompt_ids=prompt_ids,
        )  # fmt: skip
    from fedsb.eval.generate import evaluate_generation

    return evaluate_generation(
        model, tokenizer, task, dataset, batch_size=s.batch_size, max_new_tokens=s.max_new_tokens, bf16=s.bf16,
        progress=s.progress, prompt_ids=prompt_ids,
    )  # fmt: skip
