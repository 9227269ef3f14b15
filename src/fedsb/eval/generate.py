"""Greedy generation and exact-match scoring of a "generate" task (works on any model with ``generate``)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedsb.data.lm import encode_prompts
from fedsb.data.task import Task
from fedsb.errors import FedsbError

__all__ = ["EvalResult", "evaluate_generation"]

NUM_EXAMPLES = 5  # generations kept in EvalResult.examples


@dataclass
class EvalResult:
    """Accuracy of one evaluation, its wall time and the first few generations."""

    accuracy: float
    correct: int
    total: int
    seconds: float
    examples: list[dict[str, Any]] = field(default_factory=list)  # {prompt, generated, answer, correct}
    per_category: dict[str, float] | None = None  # accuracy per value of task.partition_column
    per_category_counts: dict[str, dict[str, int]] | None = None  # {category: {correct, total}}
    macro_accuracy: float | None = None  # mean of the per-category accuracies (e.g. a suite's average)
    scorer: str = "generate"  # generate, likelihood or classify

    @property
    def examples_per_second(self) -> float:
        """Throughput of the evaluation."""
        return self.total / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def _check_args(task: Task, dataset: datasets.Dataset, batch_size: int, limit: int | None) -> None:
    if task.kind != "generate":
        raise FedsbError(
            field="task",
            value=task.name,
            what=f"has kind={task.kind!r}",
            fix="evaluate_generation scores kind='generate' tasks; use the classification evaluator",
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FedsbError(field="batch_size", value=batch_size, fix="use a positive integer, e.g. 32")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FedsbError(field="limit", value=limit, fix="use a positive integer or None for all examples")
    if len(dataset) == 0:
        raise FedsbError(field="dataset", value="<empty dataset>", fix="pass at least one example")


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for pos, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[:pos]
    return ids


def _eos_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The tokenizer's eos plus any eos ids of the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos is not None:
        ids.update(int(i) for i in config_eos)
    return ids


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    bf16: bool = False,
    limit: int | None = None,
    progress: bool = False,
    prompt_ids: Sequence[list[int]] | None = None,
) -> EvalResult:
    """Greedy-decode ``task.prompt`` for each example and score with ``task.is_correct``.

    Prompts are encoded by ``encode_prompts`` (the ids used in training), left-padded, and batched
    longest-first; only new tokens up to the first eos are decoded. The model runs in eval mode under
    ``torch.inference_mode`` (bf16 autocast if ``bf16``); its train/eval mode and the tokenizer's padding
    side are restored. ``max_new_tokens`` defaults to ``task.max_new_tokens``; ``limit`` keeps the first rows.
    ``prompt_ids`` (optional) are the precomputed ``encode_prompts`` of the rows.
    """
    _check_args(task, dataset, batch_size, limit)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
        prompt_ids = None if prompt_ids is None else prompt_ids[:limit]
    new_tokens = task.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise FedsbError(field="max_new_tokens", value=new_tokens, fix="use a positive integer, e.g. 8")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise FedsbError(
            field="tokenizer.pad_token",
            value=None,
            fix="set tokenizer.pad_token (e.g. to eos; load_model does)",
        )
    eos_ids = _eos_ids(model, tokenizer)

    examples = list(dataset)
    prompts = [task.prompt(ex) for ex in examples]
    prompt_ids = list(prompt_ids) if prompt_ids is not None else encode_prompts(tokenizer, prompts)
    order = sorted(range(len(examples)), key=lambda i: -len(prompt_ids[i]))  # longest first: less padding
    generated: list[str] = [""] * len(examples)
    device = torch.device(getattr(model, "device", "cpu"))  # PreTrainedModel.device

    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    start = time.perf_counter()
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            tqdm(total=len(examples), desc=f"eval {task.name}", disable=not progress) as bar,
        ):
            for begin in range(0, len(order), batch_size):
                rows = order[begin : begin + batch_size]
                batch = tokenizer.pad({"input_ids": [prompt_ids[i] for i in rows]}, return_tensors="pt")
                input_ids = batch["input_ids"].to(device)  # (B, T_prompt), left-padded
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=pad_id,
                    eos_token_id=sorted(eos_ids) or None,
                )  # (B, T_prompt + <= new_tokens)
                new = out[:, input_ids.shape[1] :].tolist()
                for i, ids in zip(rows, new, strict=True):
                    generated[i] = tokenizer.decode(_cut_at_eos(ids, eos_ids), skip_special_tokens=True)
                bar.update(len(rows))
    finally:
        seconds = time.perf_counter() - start
        tokenizer.padding_side = padding_side
        model.train(was_training)

    correct = [task.is_correct(text, ex) for text, ex in zip(generated, examples, strict=True)]
    column = task.partition_column
    categories = (
        [str(ex[column]) for ex in examples]
        if column is not None and column in dataset.column_names
        else None
    )
    return summarize(task, examples, prompts, generated, correct, seconds, categories, scorer="generate")


def summarize(
    task: Task,
    examples: list[Mapping[str, Any]],
    prompts: list[str],
    outputs: list[str],
    correct: list[bool],
    seconds: float,
    categories: list[str] | None = None,
    *,
    scorer: str = "generate",
) -> EvalResult:
    """Accuracy; per-category accuracy, counts and their mean (when `categories` gives each example's
    group); the first examples."""
    per_category = counts = macro = None
    if categories is not None:
        hits: dict[str, list[bool]] = defaultdict(list)
        for key, ok in zip(categories, correct, strict=True):
            hits[key].append(ok)
        per_category = {key: sum(v) / len(v) for key, v in sorted(hits.items())}
        counts = {key: {"correct": sum(v), "total": len(v)} for key, v in sorted(hits.items())}
        macro = sum(per_category.values()) / len(per_category)
    shown = [
        {
            "prompt": prompts[i],
            "generated": outputs[i],
            "answer": task.reference(examples[i]),
            "correct": correct[i],
        }
        for i in range(min(NUM_EXAMPLES, len(examples)))
    ]
    return EvalResult(
        accuracy=sum(correct) / len(correct),
        correct=sum(correct),
        total=len(correct),
        seconds=seconds,
        examples=shown,
        per_category=per_category,
        per_category_counts=counts,
        macro_accuracy=macro,
        scorer=scorer,
    )
