"""Seeded generator of short arithmetic word problems with integer answers (the default federated task).

Six operations (the categories add, sub, add_sub, mul, div, difference), each phrased by ~20 templates
over everyday themes (``fedsb.data.arithmetic_templates``), with random names, objects and numbers; one
question in ten spells its numbers in words. Two splits never share a question, and by default
(``templates="split"``) they do not share templates either: validation and test problems come from
templates that the train and init splits never use, so the test split measures phrasings unseen in
training (see ``template_pools``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets
import numpy as np

from fedsb.data.arithmetic_templates import TEMPLATES
from fedsb.data.task import Task, extract_number, register_task
from fedsb.errors import FedsbError

__all__ = [
    "CATEGORIES",
    "ArithmeticTask",
    "DEFAULT_MAX_VALUE",
    "SPLITS",
    "TEMPLATE_CHOICES",
    "generate_problems",
    "make_arithmetic_dataset",
    "number_words",
    "split_of",
    "template_pools",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test", "init")
DEFAULT_MAX_VALUE = 20  # SmolLM2-135M learns small-number arithmetic in minutes (benchmarks/tune_default.py)
MIN_MAX_VALUE = 10

# Every question lands in exactly one split, decided by a stable hash of its text (blake2b, not Python's
# salted `hash`): buckets [0, 10) test, [10, 20) init, [20, 30) validation, [30, 100) train. Each split draws from its own seed
# stream and rejects questions owned by another split, so splits are disjoint whatever their sizes, and a
# smaller split of the same seed is a prefix of a larger one.
_SPLIT_BUCKETS: dict[str, range] = {
    "test": range(0, 10),
    "init": range(10, 20),
    "validation": range(20, 30),
    "train": range(30, 100),
}
_SPLIT_STREAM: dict[str, int] = {"train": 0, "test": 1, "init": 2, "validation": 3}

# Template pools: per operation, the templates ranked by blake2b("<template_seed>:<text>"); the first
# 15 % (at least one) form the validation pool, the next 15 % the test pool, the rest the train pool.
# The init split (the server's proxy data for the basis) is training data and uses the train pool.
TEMPLATE_POOLS: tuple[str, ...] = ("train", "validation", "test")
TEMPLATE_CHOICES: tuple[str, ...] = ("split", "all", *TEMPLATE_POOLS)
_HELD_OUT_FRACTION = 0.15
_POOL_OF_SPLIT: dict[str, str] = {
    "train": "train",
    "init": "train",
    "validation": "validation",
    "test": "test",
}
_WORDS_PROBABILITY = 0.1  # share of questions whose numbers are spelled out ("twelve")

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Lena", "she"), ("Omar", "he"), ("Nora", "she"),
    ("Ben", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"), ("Raj", "he"), ("Ines", "she"),
    ("Max", "he"), ("Ella", "she"), ("Ivan", "he"), ("Aiko", "she"), ("Paul", "he"), ("Sofia", "she"),
    ("Kofi", "he"), ("Lucy", "she"),
)  # fmt: skip
_FORMS: dict[str, tuple[str, str]] = {"he": ("him", "his"), "she": ("her", "her")}  # object, possessive
_OBJECTS: tuple[str, ...] = (
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards", "shells", "stamps",
    "balloons", "crayons", "toy cars", "flowers", "candies", "buttons", "beads", "rocks", "ribbons", "eggs",
)  # fmt: skip
_CONTAINERS: tuple[str, ...] = ("boxes", "bags", "baskets", "jars", "packs", "trays", "shelves", "rows")
_UNITS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS: tuple[str, ...] = (
    "",
    "",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
    "seventy",
    "eighty",
    "ninety",
)


@dataclass(frozen=True)
class _Operation:
    """How an operation draws its numbers (``numbers(rng, max_value)``) and computes its answer."""

    numbers: Callable[[np.random.Generator, int], tuple[int, ...]]
    answer: Callable[..., int]


def _randint(rng: np.random.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high] (both inclusive)."""
    return int(rng.integers(low, high + 1))


def _add_numbers(rng: np.random.Generator, m: int) -> tuple[int, ...]:
    return _randint(rng, 1, m), _randint(rng, 1, m)


def _sub_numbers(rng: np.random.Generator, m: int) -> tuple[int, ...]:
    a = _randint(rng, 2, m)
    return a, _randint(rng, 1, a - 1)


def _add_sub_numbers(rng: np.random.Generator, m: int) -> tuple[int, ...]:
    a, b = _randint(rng, 1, m), _randint(rng, 1, m)
    return a, b, _randint(rng, 1, min(m, a + b - 1))


def _mul_numbers(rng: np.random.Generator, m: int) -> tuple[int, ...]:
    top = min(12, m)  # "small numbers": times tables up to 12
    return _randint(rng, 2, top), _randint(rng, 2, top)


def _div_numbers(rng: np.random.Generator, m: int) -> tuple[int, ...]:
    divisor = _randint(rng, 2, min(12, m // 2))
    quotient = _randint(rng, 2, m // divisor)  # dividend = divisor * quotient <= m
    return divisor * quotient, divisor


def _difference_numbers(rng: np.random.Generator, m: int) -> tuple[int, ...]:
    a = _randint(rng, 2, m)
    return a, _randint(rng, 1, a - 1)


_OPERATIONS: dict[str, _Operation] = {
    "add": _Operation(_add_numbers, lambda a, b: a + b),
    "sub": _Operation(_sub_numbers, lambda a, b: a - b),
    "add_sub": _Operation(_add_sub_numbers, lambda a, b, c: a + b - c),
    "mul": _Operation(_mul_numbers, lambda a, b: a * b),
    "div": _Operation(_div_numbers, lambda a, b: a // b),
    "difference": _Operation(_difference_numbers, lambda a, b: a - b),
}

CATEGORIES: tuple[str, ...] = tuple(_OPERATIONS)


def number_words(n: int) -> str:
    """``n`` (0 <= n < 10**6) in English words without "and": 105 -> "one hundred five", 42 -> "forty-two"."""
    if not 0 <= n < 10**6:
        raise ValueError(f"number_words covers 0..999999, got {n}")
    if n < 20:
        return _UNITS[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _UNITS[n % 10])
    if n < 1000:
        head, rest = f"{_UNITS[n // 100]} hundred", n % 100
    else:
        head, rest = f"{number_words(n // 1000)} thousand", n % 1000
    return head if rest == 0 else f"{head} {number_words(rest)}"


def _rank(text: str, template_seed: int) -> bytes:
    return hashlib.blake2b(f"{template_seed}:{text}".encode(), digest_size=8).digest()


def template_pools(template_seed: int = 0) -> dict[str, dict[str, tuple[int, ...]]]:
    """pool (train, validation, test) -> operation -> indices of its templates in that pool.

    Per operation, templates are ranked by blake2b("<template_seed>:<text>"); the first
    max(1, round(0.15 n)) go to validation, the next as many to test, the rest to train. Deterministic
    in ``template_seed``; every template is in exactly one pool.
    """
    pools: dict[str, dict[str, tuple[int, ...]]] = {pool: {} for pool in TEMPLATE_POOLS}
    for op, texts in TEMPLATES.items():
        order = sorted(range(len(texts)), key=lambda i: _rank(texts[i], template_seed))
        held = max(1, round(_HELD_OUT_FRACTION * len(texts)))
        pools["validation"][op] = tuple(sorted(order[:held]))
        pools["test"][op] = tuple(sorted(order[held : 2 * held]))
        pools["train"][op] = tuple(sorted(order[2 * held :]))
    return pools


def split_of(question: str) -> str:
    """The split that owns ``question`` (stable hash of its text; see ``_SPLIT_BUCKETS``)."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % 100
    return next(name for name, owned in _SPLIT_BUCKETS.items() if bucket in owned)


def _is_count(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check(
    split: str,
    size: int,
    seed: int,
    max_value: int,
    categories: Sequence[str],
    templates: str,
    template_seed: int,
) -> None:
    if split not in SPLITS:
        raise FedsbError(field="split", value=split, fix=f"use one of {', '.join(SPLITS)}")
    if not _is_count(size, 0):
        raise FedsbError(field="size", value=size, fix="use a non-negative integer number of problems")
    if not _is_count(seed, 0):
        raise FedsbError(field="seed", value=seed, fix="use a non-negative integer")
    if not _is_count(max_value, MIN_MAX_VALUE):
        raise FedsbError(field="max_value", value=max_value, fix=f"use an integer >= {MIN_MAX_VALUE}")
    unknown = [c for c in categories if c not in _OPERATIONS]
    if unknown or not categories:
        raise FedsbError(
            field="categories", value=list(categories), fix=f"choose a non-empty subset of {list(CATEGORIES)}"
        )
    if templates not in TEMPLATE_CHOICES:
        raise FedsbError(field="templates", value=templates, fix=f"use one of {', '.join(TEMPLATE_CHOICES)}")
    if not _is_count(template_seed, 0):
        raise FedsbError(field="template_seed", value=template_seed, fix="use a non-negative integer")


def _render(
    rng: np.random.Generator, category: str, indices: tuple[int, ...], max_value: int
) -> tuple[str, int, int]:
    """(question, answer, template index) of one draw from ``category``'s templates ``indices``."""
    op = _OPERATIONS[category]
    index = indices[int(rng.integers(len(indices)))]
    numbers = op.numbers(rng, max_value)
    i, j = rng.choice(len(_PEOPLE), size=2, replace=False)
    (name, pronoun), (other, _) = _PEOPLE[int(i)], _PEOPLE[int(j)]
    obj = _OBJECTS[int(rng.integers(len(_OBJECTS)))]
    container = _CONTAINERS[int(rng.integers(len(_CONTAINERS)))]
    spell = rng.random() < _WORDS_PROBABILITY
    shown = [number_words(n) if spell else str(n) for n in numbers]
    objective, possessive = _FORMS[pronoun]
    question = TEMPLATES[category][index].format(
        N=name, M=other, P=pronoun.capitalize(), p=pronoun, H=objective, R=possessive, o=obj, k=container,
        **dict(zip("abc", shown, strict=False)),
    )  # fmt: skip
    return question[0].upper() + question[1:], op.answer(*numbers), index


def _pools_for(
    split: str, templates: str, template_seed: int, cats: Sequence[str]
) -> dict[str, tuple[int, ...]]:
    if templates == "all":
        return {c: tuple(range(len(TEMPLATES[c]))) for c in cats}
    pool = _POOL_OF_SPLIT[split] if templates == "split" else templates
    return {c: template_pools(template_seed)[pool][c] for c in cats}


def generate_problems(
    size: int,
    *,
    seed: int,
    split: str = "train",
    max_value: int = DEFAULT_MAX_VALUE,
    categories: Sequence[str] | None = None,
    templates: str = "split",
    template_seed: int = 0,
) -> list[dict[str, str]]:
    """``size`` distinct problems of ``split`` as rows ``{question, answer, category, template}``.

    ``answer`` is an int as str, ``template`` the id "<category>-<index>" of the phrasing. Deterministic in
    every argument; ``max_value`` bounds every number in a question (answers of "add"/"mul" may exceed
    it). Categories are drawn uniformly. ``templates``: "split" (default) draws from the split's own
    template pool (train and init: the train pool; validation, test: their held-out pools; see
    ``template_pools(template_seed)``), "all" from every template (splits then share phrasings but never
    a question), or a pool name (e.g. test questions in training phrasings: ``templates="train"``).
    """
    cats = tuple(CATEGORIES if categories is None else categories)
    _check(split, size, seed, max_value, cats, templates, template_seed)
    pools = _pools_for(split, templates, template_seed, cats)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split]]))
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    max_draws = 50 * size + 1000  # the question space is huge; this only stops a hopeless request
    for _ in range(max_draws):
        if len(rows) == size:
            break
        category = cats[int(rng.integers(len(cats)))]
        question, answer, index = _render(rng, category, pools[category], max_value)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        rows.append(
            {
                "question": question,
                "answer": str(answer),
                "category": category,
                "template": f"{category}-{index:02d}",
            }
        )
    if len(rows) < size:
        raise FedsbError(
            field="size",
            value=size,
            what=f"exceeds the distinct problems found in {max_draws} draws ({len(rows)})",
            fix="ask for fewer problems, or raise max_value / add categories",
        )
    return rows


def make_arithmetic_dataset(
    split: str,
    size: int,
    *,
    seed: int,
    max_value: int = DEFAULT_MAX_VALUE,
    categories: Sequence[str] | None = None,
    templates: str = "split",
    template_seed: int = 0,
) -> datasets.Dataset:
    """``generate_problems`` as a ``datasets.Dataset`` with string columns question, answer, category, template."""
    rows = generate_problems(
        size, seed=seed, split=split, max_value=max_value, categories=categories, templates=templates,
        template_seed=template_seed,
    )  # fmt: skip
    features = datasets.Features(
        {name: datasets.Value("string") for name in ("question", "answer", "category", "template")}
    )
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


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
