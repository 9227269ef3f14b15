"""The task interface, its registry and the answer parsers tasks share; no task family is imported here.

Task families (`fedsb.data.arithmetic`, `classification`, `commonsense`, `reasoning`) import this module
and register their tasks; `fedsb.data.tasks` imports every family (the catalogue ``get_task`` reads).
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, ClassVar

import datasets

from fedsb.data.formats import ANSWER_ONLY_LM, TaskFormat
from fedsb.errors import FedsbError

__all__ = [
    "TASKS",
    "NamedTask",
    "Task",
    "extract_number",
    "first_choice",
    "option_names",
    "register_named",
    "register_task",
]


class Task(ABC):
    """A task: how to load its splits, the ONE prompt used for training and evaluation, and scoring.

    ``format`` (`fedsb.data.formats`) says how its rows meet a model: answer-only causal-LM rows (the
    default), a classifier head, or label words; it supplies the tokenization, loader, loss, scorer and
    the model's loading arguments, and ``kind`` is its label ("generate" or "classify").
    ``partition_column`` names a column giving a natural non-IID split (e.g. "category"), or is None.
    """

    name: ClassVar[str]
    format: TaskFormat = ANSWER_ONLY_LM
    max_new_tokens: ClassVar[int]
    partition_column: ClassVar[str | None] = None
    default_scorer: ClassVar[str] = "generate"  # "generate" or "likelihood" (tasks with `choices`)

    @property
    def kind(self) -> str:
        """The format's label: "generate" (free-form or option answers) or "classify" (a head's label id)."""
        return self.format.kind

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


TASKS: dict[str, Any] = {}  # name -> a Task class, or a NamedTask


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator adding ``cls`` to ``TASKS`` under ``cls.name``."""
    if cls.name in TASKS:
        raise FedsbError(
            field="Task.name", value=cls.name, what="is already registered", fix="pick a new name"
        )
    TASKS[cls.name] = cls
    return cls


class NamedTask:
    """A registered name for a task class with some options fixed (``fixed``): calling it with the other
    options builds ``cls(**fixed, **options)``; its docstring and signature are the named task's."""

    def __init__(self, name: str, cls: type[Task], doc: str, **fixed: Any) -> None:
        self.name, self.cls, self.fixed, self.__doc__ = name, cls, fixed, doc
        params = [p for p in inspect.signature(cls).parameters.values() if p.name not in fixed]
        self.__signature__ = inspect.Signature(params)
        self.source_options: tuple[str, ...] = getattr(cls, "source_options", ())

    def __call__(self, **options: Any) -> Task:
        return self.cls(**self.fixed, **options)


def register_named(name: str, cls: type[Task], doc: str, **fixed: Any) -> NamedTask:
    """Add ``NamedTask(name, cls, doc, **fixed)`` to ``TASKS`` (e.g. one commonsense dataset)."""
    if name in TASKS:
        raise FedsbError(field="Task.name", value=name, what="is already registered", fix="pick a new name")
    TASKS[name] = entry = NamedTask(name, cls, doc, **fixed)
    return entry


def option_names(factory: Any) -> list[str]:
    """The keyword options a registered task accepts: its constructor's named parameters, and for a
    ``**source`` parameter the names it takes (``source_options``: `fedsb.data.sources.SourceSpec`)."""
    params = inspect.signature(factory).parameters.values()
    named = [p.name for p in params if p.kind is not p.VAR_KEYWORD and p.name not in ("self", "args")]
    extra = getattr(factory, "source_options", ()) if any(p.kind is p.VAR_KEYWORD for p in params) else ()
    return [*named, *(n for n in extra if n not in named)]


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
