"""Accuracy of an encoder + classification head on a "classify" task (argmax of the logits)."""

from __future__ import annotations

import time

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedsb.data.classification import (
    ClassificationTask,
    collate_for_classification,
    tokenize_for_classification,
)
from fedsb.errors import FedsbError
from fedsb.eval.generate import EvalResult, summarize

__all__ = ["evaluate_classification"]


def _check_args(
    task: ClassificationTask, dataset: datasets.Dataset, batch_size: int, limit: int | None
) -> None:
    if getattr(task, "kind", None) != "classify":
        raise FedsbError(
            field="task", value=getattr(task, "name", task), what=f"has kind={getattr(task, 'kind', None)!r}",
            fix="evaluate_classification scores kind='classify' tasks; use evaluate_generation",
        )  # fmt: skip
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FedsbError(field="batch_size", value=batch_size, fix="use a positive integer, e.g. 64")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FedsbError(field="limit", value=limit, fix="use a positive integer or None for all examples")
    if len(dataset) == 0:
        raise FedsbError(field="dataset", value="<empty dataset>", fix="pass at least one example")


def evaluate_classification(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: ClassificationTask,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    bf16: bool = False,
    limit: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Predict ``argmax(model(**batch).logits)`` for each row of ``dataset`` and score it against the label.

    Rows are tokenized by ``tokenize_for_classification`` (as in training; truncated to ``max_length``),
    right-padded and batched longest-first. The model runs in eval mode under ``torch.inference_mode``
    (bf16 autocast if ``bf16``; logits are compared in fp32, ties go to the lower label id) and its
    train/eval mode is restored. ``limit`` keeps the first rows. ``EvalResult.examples`` holds the first
    rows as {prompt, generated: predicted label name, answer: gold label name, correct};
    ``per_category`` is the accuracy per gold label name (labels present only, in label-id order).
    """
    _check_args(task, dataset, batch_size, limit)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise FedsbError(
            field="tokenizer.pad_token", value=None, fix="set tokenizer.pad_token (load_model does)"
        )
    tokenized = tokenize_for_classification(dataset, task, tokenizer, max_length)
    features = list(tokenized)
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))  # less padding
    predicted: list[int] = [0] * len(features)
    device = torch.device(getattr(model, "device", "cpu"))  # PreTrainedModel.device

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
            tqdm(total=len(features), desc=f"eval {task.name}", disable=not progress) as bar,
        ):
            for begin in range(0, len(order), batch_size):
                rows = order[begin : begin + batch_size]
                batch = collate_for_classification([features[i] for i in rows], pad_token_id=pad_id)
                del batch["labels"]  # no loss needed
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # (B, num_labels)
                if logits.shape[-1] != task.num_labels:
                    raise FedsbError(
                        field="model num_labels", value=logits.shape[-1],
                        what=f"differs from task {task.name!r} with {task.num_labels} labels",
                        fix=f"load the model with num_labels={task.num_labels}",
                    )  # fmt: skip
                for i, label in zip(rows, logits.float().argmax(dim=-1).tolist(), strict=True):
                    predicted[i] = label
                bar.update(len(rows))
    finally:
        seconds = time.perf_counter() - start
        model.train(was_training)

    examples = list(dataset)
    names = task.label_names
    outputs = [names[p] for p in predicted]
    correct = [task.is_correct(out, ex) for out, ex in zip(outputs, examples, strict=True)]
    categories = [names[int(ex["label"])] for ex in examples]
    prompts = [task.prompt(ex) for ex in examples]
    return summarize(task, examples, prompts, outputs, correct, seconds, categories, scorer="classify")
