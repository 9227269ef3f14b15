"""Option log-likelihood scoring of a multiple-choice task (robust for small models; deterministic).

Each option's target (``task.choices(example)``) is scored after the task's prompt: the sum (or, with
``normalize="mean"``, the per-token mean) of its tokens' log-probabilities. The prediction is the argmax
(ties: the first option). The ids are those of training (``encode_prompts`` + target ids; left padding,
positions counting real tokens), so the gold option is scored on the very ids the model was trained on.
Each prompt runs once; its KV cache is repeated for the options (``share_prompt``; a full-sequence path
is the reference and the fallback).
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

from fedsb.data.lm import IGNORE_INDEX, collate_for_training, encode_prompts
from fedsb.data.task import Task
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
    share_prompt: bool = True,
    progress: bool = False,
    desc: str = "score",
) -> list[list[float]]:
    """Log-likelihood of every option's ids after its example's prompt ids: ``scores[i][k]``.

    ``share_prompt`` (default): each prompt runs ONCE with a KV cache, which is then repeated for the
    example's options, so an example costs one prompt pass plus its option tokens. Otherwise every
    (prompt, option) sequence runs in full (the reference path; also the fallback for models without a
    cache). Options tokenize without special tokens; ``batch_size`` bounds the sequences per forward pass.
    """
    distinct = sorted({text for opts in options for text in opts})
    encoded = tokenizer(distinct, add_special_tokens=False, padding=False, truncation=False)["input_ids"]
    ids_of = dict(zip(distinct, encoded, strict=True))
    empty = [text for text in distinct if not ids_of[text]]
    if empty:
        raise FedsbError(
            field="options", value=empty[:3], what="tokenize to nothing", fix="use non-empty options"
        )
    conts = [[ids_of[text] for text in opts] for opts in options]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with tqdm(total=len(options), desc=desc, disable=not progress) as bar:
        if share_prompt and _supports_cache(model):
            token_logp = _shared_prompt_logp(model, prompt_ids, conts, batch_size, pad_id, bar)
        else:
            token_logp = _full_sequence_logp(model, prompt_ids, conts, batch_size, pad_id, bar)
    return [
        [sum(lp) / (len(lp) if normalize == "mean" else 1) for lp in per_option] for per_option in token_logp
    ]


def _cache_argument(model: torch.nn.Module) -> str:
    """The forward argument taking a KV cache: "cache" (transformers >= 5.x) or "past_key_values"."""
    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"


def _supports_cache(model: torch.nn.Module) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "use_cache", False)) and hasattr(model, "generate")


def _full_sequence_logp(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    conts: Sequence[Sequence[list[int]]],
    batch_size: int,
    pad_id: int,
    bar: Any,
) -> list[list[list[float]]]:
    """Per-token log-probabilities of every option, one full (prompt + option) sequence per pair."""
    pairs = [(i, k) for i, opts in enumerate(conts) for k in range(len(opts))]
    pairs.sort(key=lambda p: -(len(prompt_ids[p[0]]) + len(conts[p[0]][p[1]])))  # longest first
    out: list[list[list[float]]] = [[[] for _ in opts] for opts in conts]
    keep = _accepts_logits_to_keep(model)
    device = torch.device(getattr(model, "device", "cpu"))
    done: set[int] = set()
    for begin in range(0, len(pairs), batch_size):
        chunk = pairs[begin : begin + batch_size]
        feats = []
        for i, k in chunk:
            cont = conts[i][k]
            ids = [*prompt_ids[i], *cont]
            feats.append(
                {
                    "input_ids": ids,
                    "attention_mask": [1] * len(ids),
                    "labels": [IGNORE_INDEX] * len(prompt_ids[i]) + cont,
                }
            )
        batch = collate_for_training(feats, pad_token_id=pad_id)
        labels = batch.pop("labels")  # (B, T), the options right-aligned
        n_opt = max(len(conts[i][k]) for i, k in chunk)
        inputs = {name: t.to(device) for name, t in batch.items()}
        if keep:
            logits = model(**inputs, logits_to_keep=n_opt + 1).logits  # (B, n_opt + 1, V)
        else:
            logits = model(**inputs).logits[:, -(n_opt + 1) :]  # (B, n_opt + 1, V)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t + 1
        target = labels[:, -n_opt:].to(device)  # (B, n_opt)
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, n_opt)
        for row, (i, k) in enumerate(chunk):
            out[i][k] = picked[row, n_opt - len(conts[i][k]) :].tolist()
        new = {i for i, _ in chunk} - done
        done |= new
        bar.update(len(new))
    return out


def _shared_prompt_logp(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    conts: Sequence[Sequence[list[int]]],
    batch_size: int,
    pad_id: int,
    bar: Any,
) -> list[list[list[float]]]:
    """Per-token log-probabilities of every option: one cached prompt pass per example, then the options.

    Prompts are left-padded (positions count real tokens, as in training); the cache rows are repeated
    per option; option tokens are right-padded after the cache, with positions continuing the prompt's.
    """
    out: list[list[list[float]]] = [[[] for _ in opts] for opts in conts]
    order = sorted(range(len(conts)), key=lambda i: -len(prompt_ids[i]))  # less padding
    device = torch.device(getattr(model, "device", "cpu"))
    keep = _accepts_logits_to_keep(model)
    per_example = max(len(opts) for opts in conts)
    step = max(1, batch_size // per_example)  # examples per prompt pass: their options fill one batch
    for begin in range(0, len(order), step):
        rows = order[begin : begin + step]
        T = max(len(prompt_ids[i]) for i in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T), left-padded
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, T - len(prompt_ids[i]) :] = torch.as_tensor(prompt_ids[i])
            mask[r, T - len(prompt_ids[i]) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if keep else {}
        first = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
            use_cache=True, **kwargs,
        )  # fmt: skip
        first_logp = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # (B, V): the first option token
        pairs = [(r, i, k) for r, i in enumerate(rows) for k in range(len(conts[i]))]
        for r, i, k in pairs:
            out[i][k] = [float(first_logp[r, conts[i][k][0]])]
        rest = [(r, i, k) for r, i, k in pairs if len(conts[i][k]) > 1]
        if rest:
            L = max(len(conts[i][k]) for _, i, k in rest) - 1
            cache = getattr(first, "cache", None) or getattr(first, "past_key_values", None)
            cache.batch_select_indices(torch.as_tensor([r for r, _, _ in rest], device=device))  # (P, ...)
            cont = torch.full((len(rest), L), pad_id, dtype=torch.long)  # (P, L): tokens 0..n-2, right-padded
            cont_mask = torch.zeros((len(rest), L), dtype=torch.long)
            for p, (_, i, k) in enumerate(rest):
                toks = conts[i][k][:-1]
                cont[p, : len(toks)] = torch.as_tensor(toks)
                cont_mask[p, : len(toks)] = 1
            prompt_mask = mask[[r for r, _, _ in rest]]  # (P, T)
            start = prompt_mask.sum(-1, keepdim=True)  # (P, 1): the prompt's real length
            logits = model(
                input_ids=cont.to(device),
                attention_mask=torch.cat([prompt_mask, cont_mask], dim=1).to(device),
                position_ids=(start + torch.arange(L)).to(device),
                **{_cache_argument(model): cache},
                use_cache=True,
            ).logits  # (P, L, V): position j predicts option token j + 1
            logp = torch.log_softmax(logits.float(), dim=-1)
            for p, (_, i, k) in enumerate(rest):
                toks = conts[i][k]
                nxt = torch.as_tensor(toks[1:], device=device)
                out[i][k] += logp[p, : len(toks) - 1].gather(-1, nxt.unsqueeze(-1)).squeeze(-1).tolist()
        bar.update(len(rows))
    return out


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
