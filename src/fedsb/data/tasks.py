"""Tasks (data, one prompt format, scoring) and the tokenization, collation and loading shared by all of them."""

from __future__ import annotations

import inspect
import re
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from fractions import Fraction
from functools import partial
from typing import Any, ClassVar

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedsb.data.arithmetic import CATEGORIES, DEFAULT_MAX_VALUE, SPLITS, make_arithmetic_dataset
from fedsb.errors import FedsbError

__all__ = [
    "IGNORE_INDEX",
    "TASKS",
    "TRAIN_COLUMNS",
    "ArithmeticTask",
    "Task",
    "collate_for_training",
    "encode_prompts",
    "extract_number",
    "first_choice",
    "get_task",
    "make_train_loader",
    "register_builtin_tasks",
    "register_task",
    "seeded_loader",
    "tokenize_for_training",
]

IGNORE_INDEX = -100  # label value ignored by the causal-LM loss
TRAIN_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")


class Task(ABC):
    """A task: how to load its splits, the ONE prompt used for training and evaluation, and scoring.

    ``kind`` is "generate" (free-form answer scored by ``is_correct``, e.g. exact match) or "classify"
    (a label id, for encoder + head tasks). ``partition_column`` names a column giving a natural non-IID
    split (e.g. "category"), or is None.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    max_new_tokens: ClassVar[int]
    partition_column: ClassVar[str | None] = None
    default_scorer: ClassVar[str] = "generate"  # "generate" or "likelihood" (tasks with `choices`)

    @abstractmethod
    def load(self, split: str, size: int | None, seed: int) -> datasets.Dataset:
        """Rows of ``split`` ("train", "test" or "init"); ``size`` None means the task's default size."""

    @abstractmethod
    def prompt(self, example: Mapping[str, Any]) -> str:
        """The model input for ``example``, identical at training and evaluation time."""

    @abstractmethod
    def target(self, example: Mapping[str, Any]) -> str:
        """The training target appended right after the prompt (e.g. " 42")."""

    @abstractmethod
    def is_correct(self, generated: str, example: Mapping[str, Any]) -> bool:
        """Whether the generated continuation answers ``example`` correctly."""

    def reference(self, example: Mapping[str, Any]) -> str:
        """The expected answer as shown in reports (the stripped target by default)."""
        return self.target(example).strip()

    def choices(self, example: Mapping[str, Any]) -> list[str] | None:
        """The candidate targets of a multiple-choice example, in option order (likelihood scoring compares
        them after the same prompt); None for a free-form task."""
        return None

    def gold_index(self, example: Mapping[str, Any]) -> int:
        """Index into ``choices(example)`` of the correct option."""
        raise FedsbError(
            field="task", value=self.name, what="has no options", fix="score it with the generation scorer"
        )


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding ``cls`` to ``TASKS`` under ``cls.name``."""
    if cls.name in TASKS:
        raise FedsbError(
            field="Task.name", value=cls.name, what="is already registered", fix="pick a new name"
        )
    TASKS[cls.name] = cls
    return cls


def register_builtin_tasks() -> dict[str, type[Task]]:
    """Import the task families (they register themselves; each imports this module) and return TASKS."""
    import fedsb.data.classification  # noqa: F401 - sst2, snli, mnli, rte, classify
    import fedsb.data.commonsense  # noqa: F401 - boolq ... openbookqa, commonsense
    import fedsb.data.reasoning  # noqa: F401 - gsm8k, metamathqa

    return TASKS


def get_task(name: str, **options: Any) -> Task:
    """Instantiate the registered task ``name`` with its keyword ``options``."""
    register_builtin_tasks()
    if name not in TASKS:
        raise FedsbError(
            field="task", value=name, what="is not a known task", fix=f"use one of {sorted(TASKS)}"
        )
    cls = TASKS[name]
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        raise FedsbError(
            field=f"task options for {name!r}",
            value=options,
            what=f"are not accepted ({err})",
            fix=f"use only {accepted}",
        ) from err
    return cls(**options)


_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def first_choice(text: str, words: Sequence[str]) -> int | None:
    """Index of the word of ``words`` occurring first in ``text`` (whole word, any case); None if none does."""
    if not words:
        return None
    by_lower = {w.lower(): i for i, w in reversed(list(enumerate(words)))}
    alternatives = "|".join(re.escape(w) for w in sorted(by_lower, key=len, reverse=True))
    match = re.search(rf"(?<!\w)(?:{alternatives})(?!\w)", text, flags=re.IGNORECASE)
    return None if match is None else by_lower[match.group().lower()]


def extract_number(text: str) -> Fraction | None:
    """The first number in ``text`` ("-12", "1,234", "3.50"), exactly as a Fraction; None if there is none."""
    match = _NUMBER.search(text)
    return None if match is None else Fraction(match.group().replace(",", ""))


@register_task
class ArithmeticTask(Task):
    """Procedural arithmetic word problems (``fedsb.data.arithmetic``) with integer answers, exact match.

    Prompt "Question: <q>\\nAnswer:", target " <int>"; the first number of the generation must equal the
    answer (so " 42", "42.0" and " 42 apples" are correct). Options: ``max_value`` (largest number in a
    question), ``categories`` (a subset of the six operations), ``template_split`` (default true:
    validation and test use held-out templates never seen by train and init; false: every split draws
    from every template, sharing phrasings but never a question) and ``template_seed`` (which templates
    are held out).
    """

    name = "arithmetic"
    kind = "generate"
    max_new_tokens = 8  # " 1234" + eos is 6 SmolLM2 tokens (digits are single tokens)
    partition_column = "category"
    default_sizes: ClassVar[dict[str, int]] = {"train": 2000, "validation": 500, "test": 500, "init": 256}

    def __init__(
        self,
        *,
        max_value: int = DEFAULT_MAX_VALUE,
        categories: Sequence[str] | None = None,
        template_split: bool = True,
        template_seed: int = 0,
    ) -> None:
        if not isinstance(template_split, bool):
            raise FedsbError(
                field="data.options.template_split", value=template_split,
                fix="use true (held-out templates for validation and test) or false (all templates everywhere)",
            )  # fmt: skip
        self.max_value = max_value
        self.categories = tuple(CATEGORIES if categories is None else categories)
        self.templates = "split" if template_split else "all"
        self.template_seed = template_seed

    def load(self, split: str, size: int | None, seed: int) -> datasets.Dataset:
        """``size`` problems (default ``default_sizes[split]``) of ``split``; splits never share a question."""
        if split not in SPLITS:
            raise FedsbError(field="split", value=split, fix=f"use one of {', '.join(SPLITS)}")
        n = self.default_sizes[split] if size is None else size
        return make_arithmetic_dataset(
            split, n, seed=seed, max_value=self.max_value, categories=self.categories,
            templates=self.templates, template_seed=self.template_seed,
        )  # fmt: skip

    def prompt(self, example: Mapping[str, Any]) -> str:
        """``Question: <question>\\nAnswer:``."""
        return f"Question: {example['question']}\nAnswer:"

    def target(self, example: Mapping[str, Any]) -> str:
        """A space, then the integer answer."""
        return f" {int(example['answer'])}"

    def is_correct(self, generated: str, example: Mapping[str, Any]) -> bool:
        """The first number in ``generated`` equals the integer answer."""
        value = extract_number(generated)
        return value is not None and value == int(example["answer"])


# --------------------------------------------------------------------------- tokenization and loading


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's own special tokens (e.g. a leading bos), unpadded.

    The trainer and the evaluator both call this, so the prompt ids seen in training are exactly those fed
    to ``generate``.
    """
    if not prompts:
        return []
    enc = tokenizer(list(prompts), add_special_tokens=True, padding=False, truncation=False)
    return [list(ids) for ids in enc["input_ids"]]


def _positive_int(field: str, value: object, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FedsbError(field=field, value=value, fix=fix)
    return value


def tokenize_for_training(
    ds: datasets.Dataset, task: Task, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Columns input_ids, attention_mask, labels: prompt ids + target ids + eos, labels -100 on the prompt.

    Prompt and target are tokenized separately (``encode_prompts``; target without special tokens) and
    concatenated, so the prompt part equals the evaluation-time prompt ids. Examples longer than
    ``max_length`` are DROPPED, never truncated (a cut answer would teach a wrong one); a warning gives the
    count, and dropping every example raises FedsbError. Other columns are removed: partition first.
    """
    _positive_int("max_length", max_length, "use a positive number of tokens, e.g. 256")
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


def collate_for_training(
    features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int, pad_to_multiple_of: int = 1
) -> dict[str, torch.Tensor]:
    """LEFT-pad tokenized examples to (B, T) LongTensors, T = T_max rounded up to `pad_to_multiple_of`.

    Padded labels are -100. Rounding T bounds the number of distinct shapes: CPU kernels (oneDNN bf16
    matmuls) cache per-shape primitives, about 1 MB each, so unbounded shape variety grows memory.

    Left padding puts every answer at the end of its row, so the loss needs logits for the last few
    positions only (`fedsb.train.local.causal_lm_loss`). `position_ids` count real tokens from 0, as
    `generate` does for left-padded prompts, so positions match between training and evaluation.
    """
    if not features:
        raise FedsbError(field="features", value=[], fix="pass at least one tokenized example")
    missing = [c for c in TRAIN_COLUMNS if c not in features[0]]
    if missing:
        raise FedsbError(
            field="features[0]", value=sorted(features[0]), what=f"lacks {missing}",
            fix="tokenize with tokenize_for_training first",
        )  # fmt: skip
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
    _positive_int("batch_size", batch_size, "use a positive number of examples per batch")
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
