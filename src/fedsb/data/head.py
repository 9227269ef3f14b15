"""Classifier-head rows: texts (or text pairs) tokenized with the tokenizer's special tokens and an int label,
right-padded batches and seeded loaders."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedsb.data.lm import check_tokenized, seeded_loader
from fedsb.errors import FedsbError
from fedsb.validators import positive_int

__all__ = [
    "CLS_COLUMNS",
    "collate_for_classification",
    "make_classification_loader",
    "tokenize_for_classification",
]

CLS_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")  # plus token_type_ids if produced


def tokenize_for_classification(
    ds: datasets.Dataset, task: Any, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Columns input_ids, attention_mask, labels (int) and token_type_ids if the tokenizer makes them.

    Pairs are encoded as ``tokenizer(text_a, text_b)`` with the tokenizer's special tokens. Inputs longer
    than ``max_length`` are TRUNCATED (pairs longest-first); a warning gives the count. Other columns are
    removed: partition first.
    """
    if getattr(task, "kind", None) != "classify":
        raise FedsbError(
            field="task", value=getattr(task, "name", task), what=f"has kind={getattr(task, 'kind', None)!r}",
            fix="tokenize_for_classification needs a kind='classify' task; use tokenize_for_training",
        )  # fmt: skip
    positive_int("max_length", max_length, "use a positive number of tokens, e.g. 128")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 10**8 and max_length > limit:
        raise FedsbError(
            field="max_length", value=max_length, what=f"exceeds the tokenizer's model_max_length {limit}",
            fix=f"use max_length <= {limit}",
        )  # fmt: skip
    needed = [*task.text_columns, "label"]
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise FedsbError(
            field="ds", value=ds.column_names, what=f"lacks columns {missing}",
            fix=f"load the rows with {task.name}.load(...)",
        )  # fmt: skip
    if len(ds) == 0:
        raise FedsbError(field="ds", value="<empty dataset>", fix="pass at least one example")
    columns = [[str(t) for t in ds[col]] for col in task.text_columns]
    pair = columns[1] if len(columns) == 2 else None
    enc = tokenizer(columns[0], pair, add_special_tokens=True, padding=False, truncation=False)
    too_long = [len(ids) for ids in enc["input_ids"] if len(ids) > max_length]
    if too_long:
        warnings.warn(
            f"max_length={max_length} is shorter than {len(too_long)} of {len(ds)} examples (longest "
            f"{max(too_long)} tokens): they are truncated",
            stacklevel=2,
        )
        enc = tokenizer(
            columns[0], pair, add_special_tokens=True, padding=False, truncation=True, max_length=max_length
        )
    out: dict[str, list[Any]] = {
        "input_ids": [list(ids) for ids in enc["input_ids"]],
        "attention_mask": [list(m) for m in enc["attention_mask"]],
    }
    if "token_type_ids" in enc:
        out["token_type_ids"] = [list(t) for t in enc["token_type_ids"]]
    out["labels"] = [int(label) for label in ds["label"]]
    return datasets.Dataset.from_dict(out)


def collate_for_classification(
    features: Sequence[Mapping[str, Any]], pad_token_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """RIGHT-pad tokenized examples: input_ids, attention_mask (and token_type_ids, padded with 0) as (B, T)
    LongTensors, T = the longest row rounded up to ``pad_to_multiple_of``; labels (B,) long."""
    check_tokenized(features, CLS_COLUMNS, "tokenize_for_classification")
    positive_int("pad_to_multiple_of", pad_to_multiple_of, "use a positive integer, e.g. 8")
    seq_columns = ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if "token_type_ids" in features[0] else []
    )
    longest = max(len(f["input_ids"]) for f in features)
    longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    batch = {name: torch.full((len(features), longest), fill[name], dtype=torch.long) for name in seq_columns}
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        if any(len(f[c]) != n for c in seq_columns):
            raise FedsbError(
                field=f"features[{row}]", value={c: len(f[c]) for c in seq_columns},
                what="has columns of different lengths", fix="tokenize with tokenize_for_classification",
            )  # fmt: skip
        for name in seq_columns:
            batch[name][row, :n] = torch.as_tensor(f[name], dtype=torch.long)
    batch["labels"] = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)  # (B,)
    return batch


def make_classification_loader(
    ds: datasets.Dataset,
    batch_size: int,
    *,
    seed: int,
    pad_token_id: int = 0,
    pad_to_multiple_of: int = 1,
    shuffle: bool = True,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over a ``tokenize_for_classification`` dataset whose order depends only on ``seed``.

    It owns a ``torch.Generator`` (the global RNG is neither read nor advanced); each new iteration
    (epoch) draws the next permutation from it. Padding is on the right and hidden by the attention mask.
    """
    positive_int("batch_size", batch_size, "use a positive number of examples per batch")
    missing = [c for c in CLS_COLUMNS if c not in ds.column_names]
    if missing:
        raise FedsbError(
            field="ds", value=ds.column_names, what=f"lacks columns {missing}",
            fix="tokenize with tokenize_for_classification first",
        )  # fmt: skip
    collate = partial(
        collate_for_classification, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of
    )
    return seeded_loader(ds, batch_size, collate, seed=seed, shuffle=shuffle, drop_last=drop_last)
