"""Arithmetic reasoning family: GSM8K and MetaMathQA-style data, answer extraction, numeric equivalence.

Importing this module registers the tasks ``gsm8k`` and ``metamathqa``. Rows have ``question``,
``solution`` (the worked solution used as the training target, ending "The answer is: <N>"), ``answer``
(the gold final answer) and ``category`` (MetaMathQA's ``type``, else the task name).

Both schemas load without a column mapping: GSM8K (``question``, ``answer`` = worked solution ending
"#### N", calculator annotations ``<<48/2=24>>``) and MetaMathQA (``query``, ``response`` ending "The
answer is: N", ``type``). GSM8K solutions are rewritten to the MetaMathQA ending (annotations removed), so
every target ends the way ``extract_answer`` reads it; the same prompt function serves training and
evaluation.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

import datasets

from fedsb.data.sources import SPLITS, SourcedTask
from fedsb.data.task import register_task
from fedsb.errors import FedsbError

__all__ = [
    "MATH_TEMPLATES",
    "GSM8KTask",
    "MathReasoningTask",
    "MetaMathQATask",
    "extract_answer",
    "parse_number",
]

# One prompt per name, used for training AND evaluation. "alpaca" is the MetaMathQA / Fed-SB evaluation
# prompt (the original code trained without "Let's think step by step." and evaluated with it; here the
# target simply follows the one prompt).
MATH_TEMPLATES: dict[str, str] = {
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{question}\n\n### Response: Let's think step by step.",
    "plain": "Question: {question}\nAnswer: Let's think step by step.",
}

_NUM = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?"
_NUMBER = re.compile(_NUM)
_ANSWER_IS = re.compile(rf"the answer is\s*:?\s*\$?\s*({_NUM})", re.IGNORECASE)
_HASHES = re.compile(rf"####\s*\$?\s*({_NUM})")
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def parse_number(text: str) -> Fraction | None:
    """``text`` ("1,000", "-3.50", "7/2", "$18") as an exact Fraction; None if it holds no number."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    try:
        return Fraction(match.group().replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(text: str, *, strict: bool = False) -> Fraction | None:
    """The final answer of a solution: the number after the LAST "The answer is" (any case, optional ":"
    and "$"), else after the last "#### "; unless ``strict``, else the last number in ``text``."""
    for pattern in (_ANSWER_IS, _HASHES):
        found = pattern.findall(text)
        if found:
            return parse_number(found[-1])
    if strict:
        return None
    numbers = _NUMBER.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def _canonical(value: Fraction) -> str:
    """ "72", "-3", "7/2": the gold answer as stored in the ``answer`` column."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _clean_solution(text: str, answer: str) -> str:
    """Drop calculator annotations and end with "The answer is: <answer>" (replacing a "#### N" line)."""
    body = _CALCULATOR.sub("", text).strip()
    lines = [line for line in body.splitlines() if not line.strip().startswith("####")]
    body = "\n".join(lines).rstrip()
    if _ANSWER_IS.search(lines[-1] if lines else ""):
        return body
    return f"{body}\nThe answer is: {answer}" if body else f"The answer is: {answer}"


class MathReasoningTask(SourcedTask):
    """Free-form math word problems scored by numeric equivalence of the extracted final answer.

    Options (besides those of ``SourceSpec``): ``template`` (a name in ``MATH_TEMPLATES`` or a
    ``str.format`` string over ``{question}``), ``strict`` (no last-number fallback in extraction).
    ``columns`` may map ``question``, ``solution`` and, optionally, ``answer`` (the final answer; else it
    is read from the solution) and ``category``.
    """

    max_new_tokens = 256  # the paper's GSM8K setting
    partition_column = "category"

    def __init__(self, *, template: str = "alpaca", strict: bool = False, **source: Any) -> None:
        super().__init__(**source)
        text = MATH_TEMPLATES.get(template, template)
        if not isinstance(text, str) or "{question}" not in text:
            raise FedsbError(
                field="template", value=template,
                fix=f"use one of {sorted(MATH_TEMPLATES)} or a format string containing {{question}}",
            )  # fmt: skip
        self.template = text
        self.strict = bool(strict)

    def column_names(self) -> tuple[str, ...]:
        """question, solution, answer, category."""
        return ("question", "solution", "answer", "category")

    def prompt(self, example: Mapping[str, Any]) -> str:
        """``template`` with the question filled in."""
        return self.template.format(question=example["question"])

    def target(self, example: Mapping[str, Any]) -> str:
        """A space, then the worked solution ending "The answer is: <N>"."""
        return f" {example['solution']}"

    def reference(self, example: Mapping[str, Any]) -> str:
        """The gold final answer."""
        return str(example["answer"])

    def is_correct(self, generated: str, example: Mapping[str, Any]) -> bool:
        """The extracted final answer equals the gold one as a number (1,000 = 1000.0; 7/2 = 3.5)."""
        predicted = extract_answer(generated, strict=self.strict)
        gold = parse_number(str(example["answer"]))
        return predicted is not None and gold is not None and predicted == gold

    def _schema(self, ds: datasets.Dataset, where: str) -> dict[str, str | None]:
        """{canonical: file column or None}: the ``columns`` mapping, else GSM8K or MetaMathQA detected."""
        cols = set(ds.column_names)
        if self.column_map:
            self._require_columns(ds, ("question", "solution"), where)
            out: dict[str, str | None] = {c: self.column_map.get(c) for c in self.column_names()}
            out["question"], out["solution"] = self.column("question"), self.column("solution")
            return out
        if {"query", "response"} <= cols:
            return {"question": "query", "solution": "response", "answer": None,
                    "category": "type" if "type" in cols else None}  # fmt: skip
        if {"question", "answer"} <= cols:
            return {"question": "question", "solution": "answer", "answer": None, "category": None}
        raise FedsbError(
            field="columns", value=None, what=f"cannot be detected in {where} (columns {sorted(cols)})",
            fix="use GSM8K (question, answer) or MetaMathQA (query, response) files, or map "
            "data.options.columns={question: <col>, solution: <col>}",
        )  # fmt: skip

    def _normalize(self, ds: datasets.Dataset, where: str) -> datasets.Dataset:
        """Rows -> question, solution (ending "The answer is: N"), answer, category; rows without a final
        answer are dropped with a warning."""
        schema = self._schema(ds, where)
        data = ds.select_columns(sorted({c for c in schema.values() if c})).to_dict()
        n = len(ds)
        out: dict[str, list[str]] = {c: [] for c in self.column_names()}
        dropped = 0
        for i in range(n):
            question, solution = data[schema["question"]][i], data[schema["solution"]][i]  # type: ignore[index]
            gold_text = data[schema["answer"]][i] if schema["answer"] else None
            gold = (
                parse_number(str(gold_text))
                if gold_text is not None
                else extract_answer(str(solution or ""), strict=True)
            )
            if not question or not solution or gold is None:
                dropped += 1
                continue
            answer = _canonical(gold)
            out["question"].append(str(question).strip())
            out["solution"].append(_clean_solution(str(solution), answer))
            out["answer"].append(answer)
            out["category"].append(str(data[schema["category"]][i]) if schema["category"] else self.name)
        if dropped:
            warnings.warn(
                f"task {self.name!r}: dropped {dropped} of {n} rows of {where} without a question, a solution "
                "or a final answer ('The answer is ...' / '#### N')",
                stacklevel=2,
            )
        if not out["question"]:
            raise FedsbError(
                field="data file", value=where, what="has no usable rows", fix="check its contents"
            )
        return datasets.Dataset.from_dict(
            out, features=datasets.Features({c: datasets.Value("string") for c in out})
        )


@register_task
class GSM8KTask(MathReasoningTask):
    """GSM8K grade-school math: train.jsonl (7,473; validation and init held out) and test.jsonl (1,319).

    Hub: ``hub_id="openai/gsm8k", hub_config="main"``. Greedy decoding, 256 new tokens, the final answer
    read from "The answer is" / "#### N" (else the last number), compared as numbers.
    """

    name = "gsm8k"
    data_subdir = "gsm8k"
    files: ClassVar[dict[str, str]] = {"train": "train.jsonl", "test": "test.jsonl"}
    hub_splits: ClassVar[dict[str, str]] = {"train": "train", "test": "test"}


@register_task
class MetaMathQATask(MathReasoningTask):
    """MetaMathQA-style training data (``query``/``response``/``type``), evaluated on GSM8K test (the paper).

    No local copy ships: pass ``hub_id="meta-math/MetaMathQA"`` or ``data_files={train: <file>}``. The test
    split is ``gsm8k/test.jsonl`` under the data folder. ``category`` is MetaMathQA's ``type`` (natural
    partitions by question source).
    """

    name = "metamathqa"
    files: ClassVar[dict[str, str]] = {"test": "gsm8k/test.jsonl"}
    hub_splits: ClassVar[dict[str, str]] = {"train": "train"}
    unavailable: ClassVar[dict[str, str]] = {
        split: "MetaMathQA is not in the shared data: pass data.options.hub_id=meta-math/MetaMathQA or "
        "data.options.data_files={train: <MetaMathQA json>}"
        for split in SPLITS
    }
