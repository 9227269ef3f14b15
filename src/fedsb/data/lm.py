"""Causal-LM rows: prompt ids shared by training and evaluation, answer-only labels, left-padded batches and
seeded loaders."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Protocol

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedsb.errors import FedsbError
from fedsb.train.batches import IGNORE_INDEX
from fedsb.validators import positive_int

__all__ = [
    "IGNORE_INDEX",
    "PromptedTask",
    "TRAIN_COLUMNS",
    "collate_for_training",
    "encode_prompts",
    "make_train_loader",
    "seeded_loader",
    "tokenize_for_training",
]

TRAIN_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")


class PromptedTask(Protocol):
    """What causal-LM rows need of a task: its one prompt and the target appended after it."""

    def prompt(self, example: Mapping[str, Any]) -> str: ...

    def target(self, example: Mapping[str, Any]) -> str: ...


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's own special tokens (e.g. a leading bos), unpadded.

    The trainer and the evaluator both call this, so the prompt ids seen in training are exactly those fed
    to ``generate``.
    """
    if not prompts:
        return []
    enc = tokenizer(list(prompts), add_special_tokens=True, padding=False, truncation=False)
    return [list(ids) for ids in enc["input_ids"]]


def tokenize_for_training(
    ds: datasets.Dataset, task: PromptedTask, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Columns input_ids, attention_mask, labels: prompt ids + target ids + eos, labels -100 on the prompt.

    Prompt and target are tokenized separately (``encode_prompts``; target without special tokens) and
    concatenated, so the prompt part equals the evaluation-time prompt ids. Examples longer than
    ``max_length`` are DROPPED, never truncated (a cut answer would teach a wrong one); a warning gives the
    count, and dropping every example raises FedsbError. Other columns are removed: partition first.
    """
    positive_int("max_length", max_length, "use a positive number of tokens, e.g. 256")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FedsbError(
            field="tokenizer.eos_token", value=None, fix="set tokenizer.eos_token so targets can end"
        )
    examples = list(ds)
    if not examples:
        raise FedsbError(field="ds", value="<empty dataset>", fix="pass at least one example")
    prompt_ids = encode_prompts(tokenizer, [task.prompt(ex) for ex in examples])
    targets = [task.target(ex) for ex in examples]
    target_ids = tokenizer(targets, add_special_tokens=False, padding=False, truncation=False)["input_ids"]

    out: dict[str, list[list[int]]] = {name: [] for name in TRAIN_COLUMNS}
    too_long: list[int] = []
    for p_ids, t_ids in zip(prompt_ids, target_ids, strict=True):
        answer = [*t_ids, eos]
        ids = [*p_ids, *answer]
        if len(ids) > max_length:
            too_long.append(len(ids))
            continue
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append([IGNORE_INDEX] * len(p_ids) + answer)
    if too_long:
        what = f"is shorter than {len(too_long)} of {len(examples)} examples (longest {max(too_long)} tokens)"
        fix = f"raise max_length to at least {max(too_long)}"
        if len(too_long) == len(examples):
            raise FedsbError(field="max_length", value=max_length, what=what, fix=fix)
        warnings.warn(f"max_length={max_length} {what}: they are dropped; {fix}", stacklevel=2)
    return datasets.Dataset.from_dict(out)


def check_tokenized(features: Sequence[Mapping[str, Any]], columns: Sequence[str], tokenizer: str) -> None:
    """Refuse an empty batch, or one whose first row lacks one of `columns` (not made by `tokenizer`)."""
    if not features:
        raise FedsbError(field="features", value=[], fix="pass at least one tokenized example")
    missing = [c for c in columns if c not in features[0]]
    if missing:
        raise FedsbError(
            field="features[0]", value=sorted(features[0]), what=f"lacks {missing}",
            fix=f"tokenize with {tokenizer} first",
        )  # fmt: skip


def collate_for_training(
    features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """LEFT-pad tokenized examples to (B, T) LongTensors, T = T_max rounded up to `pad_to_multiple_of`.

    Padded labels are -100. Rounding T bounds the number of distinct shapes: CPU kernels (oneDNN bf16
    matmuls) cache per-shape primitives, about 1 MB each, so unbounded shape variety grows memory.

    Left padding puts every answer at the end of its row, so the loss needs logits for the last few
    positions only (`fedsb.train.losses.causal_lm_loss`). `position_ids` count real tokens from 0, as
    `generate` does for left-padded prompts, so positions match between training and evaluation.
    """
    check_tokenized(features, TRAIN_COLUMNS, "tokenize_for_training")
    longest = max(len(f["input_ids"]) for f in features)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    batch = {
        "input_ids": torch.full((len(features), longest), pad_token_id, dtype=torch.long),  # (B, T)
        "attention_mask": torch.zeros((len(features), longest), dtype=torch.long),  # (B, T)
        "labels": torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long),  # (B, T)
    }
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        if len(f["attention_mask"]) != n or len(f["labels"]) != n:
            raise FedsbError(
                field=f"features[{row}]", value={c: len(f[c]) for c in TRAIN_COLUMNS},
                what="has columns of different lengths", fix="tokenize with tokenize_for_training",
            )  # fmt: skip
        for name in TRAIN_COLUMNS:
            batch[name][row, longest - n :] = torch.as_tensor(f[name], dtype=torch.long)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return batch


def make_train_loader(
    ds: datasets.Dataset,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over a ``tokenize_for_training`` dataset whose order depends only on ``seed``.

    It owns a ``torch.Generator`` (the global RNG is neither read nor advanced); each new iteration
    (epoch) draws the next permutation from it. ``pad_token_id`` only fills the (left) padding, which the
    attention mask and the -100 labels hide, so its value does not change the loss.
    """
    positive_int("batch_size", batch_size, "use a positive number of examples per batch")
    missing = [c for c in TRAIN_COLUMNS if c not in ds.column_names]
    if missing:
        raise FedsbError(
            field="ds",
            value=ds.column_names,
            what=f"lacks columns {missing}",
            fix="tokenize with tokenize_for_training first",
        )
    collate = partial(collate_for_training, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    return seeded_loader(ds, batch_size, collate, seed=seed, shuffle=shuffle, drop_last=drop_last)


def seeded_loader(
    ds: datasets.Dataset,
    batch_size: int,
    collate: Any,
    *,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader owning its `torch.Generator` seeded with `seed`: the order depends on nothing else."""
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        num_workers=0,
        collate_fn=collate,
    )
