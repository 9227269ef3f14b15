"""Seeded generator of short arithmetic word problems with integer answers (the default federated task)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets
import numpy as np

from fedsb.errors import FedsbError

__all__ = [
    "CATEGORIES",
    "DEFAULT_MAX_VALUE",
    "SPLITS",
    "generate_problems",
    "make_arithmetic_dataset",
    "split_of",
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

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("Tom", "he"), ("Mia", "she"), ("Sam", "he"), ("Lena", "she"), ("Omar", "he"), ("Nora", "she"),
    ("Ben", "he"), ("Ava", "she"), ("Leo", "he"), ("Zoe", "she"), ("Raj", "he"), ("Ines", "she"),
    ("Max", "he"), ("Ella", "she"), ("Ivan", "he"), ("Aiko", "she"), ("Paul", "he"), ("Sofia", "she"),
    ("Kofi", "he"), ("Lucy", "she"),
)  # fmt: skip
_OBJECTS: tuple[str, ...] = (
    "apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards", "shells", "stamps",
    "balloons", "crayons", "toy cars", "flowers", "candies", "buttons", "beads", "rocks", "ribbons", "eggs",
)  # fmt: skip
_CONTAINERS: tuple[str, ...] = ("boxes", "bags", "baskets", "jars", "packs", "trays", "shelves", "rows")


@dataclass(frozen=True)
class _Category:
    """Templates of one category; numbers appear in the text in the order `answer` takes them."""

    templates: tuple[str, ...]
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


_TEMPLATES: dict[str, _Category] = {
    "add": _Category(
        templates=(
            "{N} has {a} {o}. {P} buys {b} more {o}. How many {o} does {N} have now?",
            "{N} found {a} {o} in the morning and {b} {o} in the afternoon. How many {o} did {N} find in all?",
            "{N} has {a} {o} and {M} has {b} {o}. How many {o} do they have together?",
            "There are {a} {o} on the table. {N} puts {b} more {o} on the table. "
            "How many {o} are on the table now?",
            "{N} collected {a} {o} on Monday and {b} {o} on Tuesday. How many {o} did {N} collect?",
        ),
        numbers=_add_numbers,
        answer=lambda a, b: a + b,
    ),
    "sub": _Category(
        templates=(
            "{N} has {a} {o}. {P} gives {b} {o} to {M}. How many {o} does {N} have left?",
            "There were {a} {o} in a box. {N} took {b} of them. How many {o} are left in the box?",
            "{N} bought {a} {o} and lost {b} of them. How many {o} does {N} have now?",
            "{N} had {a} {o}. After selling {b} {o}, how many {o} does {N} have?",
            "A shop had {a} {o}. It sold {b} {o} today. How many {o} does the shop have left?",
        ),
        numbers=_sub_numbers,
        answer=lambda a, b: a - b,
    ),
    "add_sub": _Category(
        templates=(
            "{N} has {a} {o}. {P} gets {b} more {o} and then gives {c} {o} to {M}. "
            "How many {o} does {N} have now?",
            "There are {a} {o} in a jar. {N} adds {b} {o} and {M} takes out {c} {o}. "
            "How many {o} are in the jar?",
            "{N} picked {a} {o} and {M} picked {b} {o}. They gave away {c} {o}. How many {o} do they have left?",
            "A class had {a} {o}. The teacher brought {b} more, then the children used {c}. "
            "How many {o} are left?",
            "{N} started with {a} {o}, won {b} {o} in a game and lost {c} {o} on the way home. "
            "How many {o} does {N} have?",
        ),
        numbers=_add_sub_numbers,
        answer=lambda a, b, c: a + b - c,
    ),
    "mul": _Category(
        templates=(
            "There are {a} {k} with {b} {o} in each. How many {o} are there in total?",
            "{N} buys {a} {k} of {o}. Each of the {k} holds {b} {o}. How many {o} does {N} buy?",
            "{N} has {a} {k}, and every one of them has {b} {o}. How many {o} does {N} have?",
            "Each of {a} children gets {b} {o}. How many {o} do the children get altogether?",
            "{N} fills {a} {k} with {b} {o} each. How many {o} does {N} use?",
        ),
        numbers=_mul_numbers,
        answer=lambda a, b: a * b,
    ),
    "div": _Category(
        templates=(
            "{N} shares {a} {o} equally among {b} friends. How many {o} does each friend get?",
            "{a} {o} are packed into {b} {k} with the same number in each. How many {o} are in each of the {k}?",
            "{N} puts {a} {o} into {b} equal groups. How many {o} are in each group?",
            "A teacher divides {a} {o} equally between {b} children. How many {o} does each child get?",
            "{N} splits {a} {o} evenly among {b} people. How many {o} does each person get?",
        ),
        numbers=_div_numbers,
        answer=lambda a, b: a // b,
    ),
    "difference": _Category(
        templates=(
            "{N} has {a} {o} and {M} has {b} {o}. How many more {o} does {N} have than {M}?",
            "{N} read {a} {o} and {M} read {b} {o}. How many fewer {o} did {M} read than {N}?",
            "A red box holds {a} {o} and a blue box holds {b} {o}. "
            "How many more {o} are in the red box than in the blue box?",
            "{N} scored {a} points and {M} scored {b} points. By how many points did {N} win?",
            "There are {a} {o} in the garden and {b} {o} in the house. How many more {o} are in the garden?",
        ),
        numbers=_difference_numbers,
        answer=lambda a, b: a - b,
    ),
}

CATEGORIES: tuple[str, ...] = tuple(_TEMPLATES)


def split_of(question: str) -> str:
    """The split that owns ``question`` (stable hash of its text; see ``_SPLIT_BUCKETS``)."""
    bucket = int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big") % 100
    return next(name for name, owned in _SPLIT_BUCKETS.items() if bucket in owned)


def _check(split: str, size: int, seed: int, max_value: int, categories: Sequence[str]) -> None:
    if split not in SPLITS:
        raise FedsbError(field="split", value=split, fix=f"use one of {', '.join(SPLITS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise FedsbError(field="size", value=size, fix="use a non-negative integer number of problems")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FedsbError(field="seed", value=seed, fix="use a non-negative integer")
    if isinstance(max_value, bool) or not isinstance(max_value, int) or max_value < MIN_MAX_VALUE:
        raise FedsbError(field="max_value", value=max_value, fix=f"use an integer >= {MIN_MAX_VALUE}")
    unknown = [c for c in categories if c not in _TEMPLATES]
    if unknown or not categories:
        raise FedsbError(
            field="categories", value=list(categories), fix=f"choose a non-empty subset of {list(CATEGORIES)}"
        )


def _render(rng: np.random.Generator, category: str, max_value: int) -> tuple[str, int]:
    cat = _TEMPLATES[category]
    template = cat.templates[int(rng.integers(len(cat.templates)))]
    numbers = cat.numbers(rng, max_value)
    i, j = rng.choice(len(_PEOPLE), size=2, replace=False)
    (name, pronoun), (other, _) = _PEOPLE[int(i)], _PEOPLE[int(j)]
    fields = dict(zip("abc", numbers, strict=False))
    question = template.format(
        N=name,
        P=pronoun.capitalize(),
        M=other,
        o=_OBJECTS[int(rng.integers(len(_OBJECTS)))],
        k=_CONTAINERS[int(rng.integers(len(_CONTAINERS)))],
        **fields,
    )
    return question, cat.answer(*numbers)


def generate_problems(
    size: int,
    *,
    seed: int,
    split: str = "train",
    max_value: int = DEFAULT_MAX_VALUE,
    categories: Sequence[str] | None = None,
) -> list[dict[str, str]]:
    """``size`` distinct problems of ``split`` as rows ``{question, answer, category}`` (answer: int as str).

    Deterministic in (``size``, ``seed``, ``split``, ``max_value``, ``categories``); ``max_value`` bounds
    every number in a question (answers of "add"/"mul" may exceed it). Categories are drawn uniformly.
    """
    cats = tuple(CATEGORIES if categories is None else categories)
    _check(split, size, seed, max_value, cats)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split]]))
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    max_draws = 50 * size + 1000  # the question space is huge; this only stops a hopeless request
    for _ in range(max_draws):
        if len(rows) == size:
            break
        category = cats[int(rng.integers(len(cats)))]
        question, answer = _render(rng, category, max_value)
        if question in seen or split_of(question) != split:
            continue
        seen.add(question)
        rows.append({"question": question, "answer": str(answer), "category": category})
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
) -> datasets.Dataset:
    """``generate_problems`` as a ``datasets.Dataset`` with string columns question, answer, category."""
    rows = generate_problems(size, seed=seed, split=split, max_value=max_value, categories=categories)
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "category": datasets.Value("string"),
        }
    )
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)
