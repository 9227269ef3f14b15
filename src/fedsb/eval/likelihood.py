"""Option log-likelihood scoring of a multiple-choice task (robust for small models; deterministic).

Each option's target (``task.choices(example)``) is scored after the task's prompt: the sum (or, with
``normalize="mean"``, the per-token mean) of its tokens' log-probabilities. The prediction is the argmax
(ties: the first option). Sequences are built and padded exactly as in training (``encode_prompts`` +
target ids, ``collate_for_training``: left padding, real-token positions), so the gold option is scored on
the very ids the model was trained on.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedsb.data.tasks import IGNORE_INDEX, Task, collate_for_training, encode_prompts
from fedsb.errors import FedsbError
from fedsb.eval.generate import EvalResult, summarize

__all__ = ["NORMALIZATIONS", "evaluate_likelihood", "option_scores"]

NORMALIZATIONS: tuple[str, ...] = ("sum", "mean")


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False


def _check_args(
    task: Task, dataset: datasets.Dataset, batch_size: int, normalize: str, limit: int | None
) -> None:
    if task.kind != "generate" or len(dataset) == 0 or task.choices(dataset[0]) is None:
        if len(dataset) == 0:
            raise FedsbError(field="dataset", value="<empty dataset>", fix="pass at least one example")
        raise FedsbError(
            field="task", value=task.name, what="has no answer options to score",
            fix="use the generation scorer (eval.scorer=generate) for free-form tasks",
        )  # fmt: skip
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FedsbError(field="batch_size", value=batch_size, fix="use a positive integer, e.g. 32")
    if normalize not in NORMALIZATIONS:
        raise FedsbError(field="normalize", value=normalize, fix=f"use one of {', '.join(NORMALIZATIONS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FedsbError(field="limit", value=limit, fix="use a positive integer or None for all examples")


def option_scores(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    options: Sequence[Sequence[str]],
    *,
    batch_size: int = 32,
    normalize: str = "sum",
    progress: bool = False,
    desc: str = "score",
) -> list[list[float]]:
    """Log-likelihood of every option's ids after its example's prompt ids: ``scores[i][k]``.

    All (example, option) pairs are batched together, longest first; the LM head runs only on the last
    ``max option length + 1`` positions (``logits_to_keep``). Options tokenize without special tokens.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    distinct = sorted({text for opts in options for text in opts})
    encoded = tokenizer(distinct, add_special_tokens=False, padding=False, truncation=False)["input_ids"]
    ids_of = dict(zip(distinct, encoded, strict=True))
    empty = [text for text in distinct if not ids_of[text]]
    if empty:
        raise FedsbError(
            field="options", value=empty[:3], what="tokenize to nothing", fix="use non-empty options"
        )
    pairs = [(i, k) for i, opts in enumerate(options) for k in range(len(opts))]
    length = {p: len(prompt_ids[p[0]]) + len(ids_of[options[p[0]][p[1]]]) for p in pairs}
    pairs.sort(key=lambda p: -length[p])  # longest first: less padding
    scores: list[list[float]] = [[0.0] * len(opts) for opts in options]
    keep = _accepts_logits_to_keep(model)
    device = torch.device(getattr(model, "device", "cpu"))
    with tqdm(total=len(pairs), desc=desc, disable=not progress) as bar:
        for begin in range(0, len(pairs), batch_size):
            chunk = pairs[begin : begin + batch_size]
            feats = []
            for i, k in chunk:
                cont = ids_of[options[i][k]]
                ids = [*prompt_ids[i], *cont]
                feats.append(
                    {"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [IGNORE_INDEX] * len(prompt_ids[i]) + cont}
                )  # fmt: skip
            batch = collate_for_training(feats, pad_token_id=pad_id)
            labels = batch.pop("labels")  # (B, T), the options right-aligned
            n_opt = max(len(f["labels"]) - len(prompt_ids[i]) for f, (i, _) in zip(feats, chunk, strict=True))
            inputs = {name: t.to(device) for name, t in batch.items()}
            if keep:
                logits = model(**inputs, logits_to_keep=n_opt + 1).logits  # (B, n_opt + 1, V)
            else:
                logits = model(**inputs).logits[:, -(n_opt + 1) :]  # (B, n_opt + 1, V)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
            target = labels[:, -n_opt:].to(device)  # (B, n_opt)
            mask = target != IGNORE_INDEX
            token_logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask  # (B, n_opt)
            total = token_logp.sum(dim=1)
            if normalize == "mean":
                total = total / mask.sum(dim=1)
            for (i, k), value in zip(chunk, total.tolist(), strict=True):
                scores[i][k] = value
            bar.update(len(chunk))
    return scores


def evaluate_likelihood(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    dataset: datasets.Dataset,
    *,
    batch_size: int = 32,
    normalize: str = "sum",
    bf16: bool = False,
    limit: int | None = None,
    progress: bool = False,
    prompt_ids: Sequence[list[int]] | None = None,
) -> EvalResult:
    """Accuracy of ``argmax_k score(option k)`` against ``task.gold_index`` on ``dataset``.

    The model runs in eval mode under ``torch.inference_mode`` (bf16 autocast if ``bf16``; scores in fp32);
    its train/eval mode is restored. ``prompt_ids`` (optional) are the precomputed ``encode_prompts`` of the
    rows. ``EvalResult.examples`` shows the chosen option as ``generated``.
    """
    _check_args(task, dataset, batch_size, normalize, limit)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
        prompt_ids = None if prompt_ids is None else prompt_ids[:limit]
    examples: list[Mapping[str, Any]] = list(dataset)
    prompts = [task.prompt(ex) for ex in examples]
    ids = list(prompt_ids) if prompt_ids is not None else encode_prompts(tokenizer, prompts)
    options = [list(task.choices(ex) or []) for ex in examples]
    device = torch.device(getattr(model, "device", "cpu"))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            scores = option_scores(
                model, tokenizer, ids, options, batch_size=batch_size, normalize=normalize,
                progress=progress, desc=f"eval {task.name}",
            )  # fmt: skip
    finally:
        seconds = time.perf_counter() - start
        model.train(was_training)
    chosen = [max(range(len(s)), key=lambda k, s=s: (s[k], -k)) for s in scores]  # ties: first option
    correct = [c == task.gold_index(ex) for c, ex in zip(chosen, examples, strict=True)]
    outputs = [opts[c].strip() for opts, c in zip(options, chosen, strict=True)]
    column = task.partition_column
    categories = (
        [str(ex[column]) for ex in examples]
        if column is not None and column in dataset.column_names
        else None
    )
    return summarize(task, examples, prompts, outputs, correct, seconds, categories, scorer="likelihood")
