"""Commonsense multiple choice: BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARC-e/c, OpenBookQA and the suite.

Importing this module registers one task per dataset (``boolq``, ``piqa``, ``siqa``, ``hellaswag``,
``winogrande``, ``arc_easy``, ``arc_challenge``, ``openbookqa``) and the suite ``commonsense``.

Rows use the LLM-Adapters format of the Fed-SB paper: ``instruction`` (question and options inline, ending
"Answer format: answer1/answer2/..."), ``answer`` (the gold token, e.g. "answer2"), plus ``options`` (the
answer tokens parsed from the instruction), ``label`` (the gold option's index) and ``category`` (the
dataset name). Local files (``commonsense_llm_adapters/<dir>/{train,test}.json`` under the data folder)
are read as they are; rows of the Hugging Face datasets (option ``hub=true`` or ``hub_id``) are converted
to the same instruction text LLM-Adapters builds. HellaSwag and the train splits of PIQA, SIQA and
WinoGrande exist only on the hub.

Prompt (training and evaluation): the LLM-Adapters Alpaca template; target "the correct answer is
<token>". Two scorers: generation (the paper's protocol: the first option token in the greedy output)
and option likelihood (the log-probability of each option's target after the prompt, the default).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from fedsb.data.sources import SPLITS, SourcedTask, default_data_dir
from fedsb.data.task import Task, first_choice, register_named, register_task
from fedsb.errors import FedsbError
from fedsb.validators import check_bool

__all__ = [
    "COMMONSENSE_TASKS",
    "COMMONSENSE_TEMPLATE",
    "CommonsenseSuite",
    "CommonsenseTask",
]

COMMONSENSE_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
_SHARED_SUBDIR = "commonsense_llm_adapters"
_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")
_FEATURES = datasets.Features(
    {
        "instruction": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "options": datasets.Sequence(datasets.Value("string")),
        "label": datasets.Value("int64"),
        "category": datasets.Value("string"),
    }
)


def _numbered(word: str, texts: Sequence[str], sep: str = " ") -> tuple[str, str]:
    """("Answer1: a Answer2: b", "answer1/answer2") for option texts ``texts``."""
    listed = sep.join(f"{word}{i + 1}: {t}" for i, t in enumerate(texts))
    return listed, "/".join(f"{word.lower()}{i + 1}" for i in range(len(texts)))


def _boolq(row: Mapping[str, Any]) -> tuple[str, str]:
    question = str(row["question"]).strip().rstrip("?")
    text = f"Please answer the following question with true or false, question: {question}?"
    return f"{text}\n\nAnswer format: true/false", "true" if row["answer"] else "false"


def _piqa(row: Mapping[str, Any]) -> tuple[str, str]:
    listed, fmt = _numbered("Solution", [row["sol1"], row["sol2"]], sep="\n\n")
    text = f"Please choose the correct solution to the question: {row['goal']}\n\n{listed}"
    return f"{text}\n\nAnswer format: {fmt}", f"solution{int(row['label']) + 1}"


def _siqa(row: Mapping[str, Any]) -> tuple[str, str]:
    listed, fmt = _numbered("Answer", [row["answerA"], row["answerB"], row["answerC"]])
    text = f"Please choose the correct answer to the question: {row['context']} {row['question']}\n\n{listed}"
    return f"{text}\n\nAnswer format: {fmt}", f"answer{int(row['label'])}"


def _hellaswag(row: Mapping[str, Any]) -> tuple[str, str]:
    listed, fmt = _numbered("Ending", list(row["endings"]))
    text = f"Please choose the correct ending to complete the given sentence: {row['activity_label']}: {row['ctx']}"
    return f"{text}\n\n{listed}\n\nAnswer format: {fmt}", f"ending{int(row['label']) + 1}"


def _winogrande(row: Mapping[str, Any]) -> tuple[str, str]:
    listed, fmt = _numbered("Option", [row["option1"], row["option2"]])
    text = f"Please choose the correct answer to fill in the blank to complete the given sentence: {row['sentence']}"
    return f"{text}\n\n{listed} Answer format: {fmt}", f"option{int(row['answer'])}"


def _arc_like(question_column: str) -> Callable[[Mapping[str, Any]], tuple[str, str]]:
    def convert(row: Mapping[str, Any]) -> tuple[str, str]:
        choices = row["choices"]
        listed, fmt = _numbered("Answer", list(choices["text"]))
        gold = list(choices["label"]).index(row["answerKey"]) + 1
        text = f"Please choose the correct answer to the question: {row[question_column]}\n\n{listed}"
        return f"{text}\n\nAnswer format: {fmt}", f"answer{gold}"

    return convert


def _convert_or_none(
    convert: Callable[[Mapping[str, Any]], tuple[str, str]], row: Mapping[str, Any]
) -> tuple[str | None, str | None]:
    """``convert(row)``, or (None, None) for a row without a usable label (e.g. hub test splits: "")."""
    try:
        return convert(row)
    except (ValueError, KeyError, TypeError, IndexError):
        return None, None


@dataclass(frozen=True)
class _Spec:
    """One dataset: its local folder and files, its hub id/config/splits and the hub-row converter."""

    folder: str
    files: dict[str, str]
    hub_id: str
    hub_config: str | None
    hub_splits: dict[str, str]
    hub_columns: tuple[str, ...]
    convert: Callable[[Mapping[str, Any]], tuple[str, str]]


_TEST_ONLY = {"test": "test.json"}
_BOTH = {"train": "train.json", "test": "test.json"}
_DEV_AS_TEST = {"train": "train", "test": "validation"}
_SPECS: dict[str, _Spec] = {
    "boolq": _Spec("boolq", _BOTH, "google/boolq", None, _DEV_AS_TEST, ("question", "answer"), _boolq),
    "piqa": _Spec("piqa", _TEST_ONLY, "ybisk/piqa", None, _DEV_AS_TEST, ("goal", "sol1", "sol2", "label"), _piqa),
    "siqa": _Spec(
        "social_i_qa", _TEST_ONLY, "allenai/social_i_qa", None, _DEV_AS_TEST,
        ("context", "question", "answerA", "answerB", "answerC", "label"), _siqa,
    ),
    "hellaswag": _Spec(
        "hellaswag", {}, "Rowan/hellaswag", None, _DEV_AS_TEST,
        ("activity_label", "ctx", "endings", "label"), _hellaswag,
    ),
    "winogrande": _Spec(
        "winogrande", _TEST_ONLY, "allenai/winogrande", "winogrande_xl", _DEV_AS_TEST,
        ("sentence", "option1", "option2", "answer"), _winogrande,
    ),
    "arc_easy": _Spec(
        "ARC-Easy", _BOTH, "allenai/ai2_arc", "ARC-Easy", {"train": "train", "test": "test"},
        ("question", "choices", "answerKey"), _arc_like("question"),
    ),
    "arc_challenge": _Spec(
        "ARC-Challenge", _BOTH, "allenai/ai2_arc", "ARC-Challenge", {"train": "train", "test": "test"},
        ("question", "choices", "answerKey"), _arc_like("question"),
    ),
    "openbookqa": _Spec(
        "openbookqa", _BOTH, "allenai/openbookqa", "main", {"train": "train", "test": "test"},
        ("question_stem", "choices", "answerKey"), _arc_like("question_stem"),
    ),
}  # fmt: skip
COMMONSENSE_TASKS: tuple[str, ...] = tuple(_SPECS)


class CommonsenseTask(SourcedTask):
    """One commonsense dataset in the LLM-Adapters format (module docstring).

    ``dataset`` names its `_Spec` (folder, files, hub id and row converter); each is registered under that
    name with ``dataset`` fixed (`register_named`). Options (besides those of ``SourceSpec``): ``hub``
    (true: load the dataset's known hub id, e.g. Rowan/hellaswag; never the default), ``template`` (a
    ``str.format`` string over ``{instruction}``).
    """

    max_new_tokens = 16  # "the correct answer is answer1" is 7 SmolLM2 tokens; the paper allows 32
    partition_column = "category"
    default_scorer = "likelihood"
    spec: _Spec

    def __init__(
        self, *, dataset: str, hub: bool = False, template: str = COMMONSENSE_TEMPLATE, **source: Any
    ) -> None:
        self.name = dataset  # type: ignore[misc]
        self.spec = spec = _SPECS[dataset]
        self.files, self.hub_splits = dict(spec.files), dict(spec.hub_splits)  # type: ignore[misc]
        self.unavailable = {  # type: ignore[misc]
            split: f"no local {dataset} {split} file ships in {_SHARED_SUBDIR}/{spec.folder or dataset}"
            for split in SPLITS
        }
        check_bool("hub", hub, "use true (load from the Hugging Face hub) or false")
        if hub and source.get("hub_id") is None:
            source = {**source, "hub_id": spec.hub_id, "hub_config": spec.hub_config}
        super().__init__(**source)
        if not isinstance(template, str) or "{instruction}" not in template:
            raise FedsbError(
                field="template", value=template, fix="use a format string containing {instruction}"
            )
        self.template = template

    def column_names(self) -> tuple[str, ...]:
        """instruction, answer (LLM-Adapters fields)."""
        return ("instruction", "answer")

    def _source_hint(self) -> str:
        return (
            f", or pass data.options.hub=true (loads {self.spec.hub_id} from the Hugging Face hub), or "
            "data.options.data_files={split: path}"
        )

    def _task_dir(self) -> Path | None:
        root = self.data_dir if self.data_dir is not None else default_data_dir()
        if root is None:
            return None
        for candidate in (root / _SHARED_SUBDIR / self.spec.folder, root / self.spec.folder):
            if candidate.is_dir():
                return candidate
        return root

    def _dir_fix(self, name: str) -> str:
        return (
            f"pass data.options.data_dir=<folder holding {_SHARED_SUBDIR}/{self.spec.folder}/{name}> or "
            f"data.options.hub=true for the Hugging Face hub ({self.spec.hub_id})"
        )

    # ------------------------------------------------------------------ Task interface

    def prompt(self, example: Mapping[str, Any]) -> str:
        """``template`` with the instruction filled in."""
        return self.template.format(instruction=example["instruction"])

    def _phrase(self, token: str) -> str:
        sep = "" if not self.template or self.template[-1].isspace() else " "
        return f"{sep}the correct answer is {token}"

    def target(self, example: Mapping[str, Any]) -> str:
        """ "the correct answer is <gold token>" (after a space unless the prompt ends in whitespace)."""
        return self._phrase(str(example["answer"]))

    def reference(self, example: Mapping[str, Any]) -> str:
        """The gold token, e.g. "answer2"."""
        return str(example["answer"])

    def choices(self, example: Mapping[str, Any]) -> list[str]:
        """The target of every option, in option order."""
        return [self._phrase(token) for token in example["options"]]

    def gold_index(self, example: Mapping[str, Any]) -> int:
        """The gold option's index."""
        return int(example["label"])

    def is_correct(self, generated: str, example: Mapping[str, Any]) -> bool:
        """The first option token in the generation (whole word, any case) is the gold one."""
        return first_choice(generated, list(example["options"])) == int(example["label"])

    # ------------------------------------------------------------------ raw rows

    def _normalize(self, ds: datasets.Dataset, where: str) -> datasets.Dataset:
        """LLM-Adapters rows as they are, hub rows converted; options parsed from "Answer format:"."""
        cols = set(ds.column_names)
        if {self.column("instruction"), self.column("answer")} <= cols:
            pairs = zip(ds[self.column("instruction")], ds[self.column("answer")], strict=True)
        elif set(self.spec.hub_columns) <= cols:
            pairs = (_convert_or_none(self.spec.convert, row) for row in ds)
        else:
            raise FedsbError(
                field="columns", value=self.column_map or None,
                what=f"cannot be found in {where} (columns {sorted(cols)})",
                fix=f"use LLM-Adapters files (instruction, answer), {self.spec.hub_id} rows "
                f"({', '.join(self.spec.hub_columns)}), or map data.options.columns={{instruction: ..., answer: ...}}",
            )  # fmt: skip
        out: dict[str, list[Any]] = {name: [] for name in _FEATURES}
        dropped = 0
        for instruction, answer in pairs:
            text, gold = str(instruction or "").strip(), str(answer or "").strip().lower()
            match = _FORMAT.search(text)
            options = match.group(1).split("/") if match else []
            if gold not in options:  # unlabelled (hub test splits) or malformed rows
                dropped += 1
                continue
            out["instruction"].append(text)
            out["answer"].append(gold)
            out["options"].append(options)
            out["label"].append(options.index(gold))
            out["category"].append(self.name)
        if dropped:
            warnings.warn(
                f"task {self.name!r}: dropped {dropped} of {len(ds)} rows of {where} whose answer is not one of "
                "the options listed after 'Answer format:'",
                stacklevel=2,
            )
        if not out["label"]:
            raise FedsbError(
                field="data file", value=where, what="has no usable rows", fix="check its contents"
            )
        return datasets.Dataset.from_dict(out, features=_FEATURES)


_DOCS = {
    "boolq": "BoolQ (closed-book yes/no as true/false): train 9,427 / test 3,270 (official dev); hub google/boolq.",
    "piqa": "PIQA (2 solutions): test 1,838 (official dev) locally; train via hub ybisk/piqa.",
    "siqa": "Social IQa (3 answers): test 1,954 (official dev) locally; train via hub allenai/social_i_qa.",
    "hellaswag": "HellaSwag (4 endings): hub only (Rowan/hellaswag; its validation set is our test).",
    "winogrande": "WinoGrande (2 options): test 1,267 (official dev) locally; train via hub allenai/winogrande (xl).",
    "arc_easy": "ARC-Easy (3-5 answers): train 2,251 / test 2,376; hub allenai/ai2_arc ARC-Easy.",
    "arc_challenge": "ARC-Challenge (3-5 answers): train 1,119 / test 1,172; hub allenai/ai2_arc ARC-Challenge.",
    "openbookqa": "OpenBookQA (4 answers): train 4,957 / test 500; hub allenai/openbookqa main.",
}
for _name in _SPECS:
    register_named(_name, CommonsenseTask, _DOCS[_name], dataset=_name)


@register_task
class CommonsenseSuite(Task):
    """Commonsense suite: several datasets as one task (per-dataset accuracy and their average).

    Options: ``tasks`` (default all eight), ``missing`` ("skip": leave out, with a warning, a dataset
    lacking the requested split, e.g. HellaSwag offline or PIQA's train; "error"), ``balanced`` (a
    sized sample takes the same number of rows from every dataset, instead of a sample of the
    concatenation, so small test sets such as OpenBookQA's are not crowded out), ``hub``, ``data_dir``,
    ``template``, ``validation_fraction``, ``init_fraction``, ``holdout_seed`` (passed to each dataset).
    ``category`` names the dataset, so ``partition.scheme=natural`` gives one dataset per client.
    """

    name = "commonsense"
    max_new_tokens = CommonsenseTask.max_new_tokens
    partition_column = "category"
    default_scorer = "likelihood"

    def __init__(
        self,
        *,
        tasks: Sequence[str] | None = None,
        missing: str = "skip",
        balanced: bool = False,
        hub: bool = False,
        template: str = COMMONSENSE_TEMPLATE,
        data_dir: str | os.PathLike[str] | None = None,
        validation_fraction: float = 0.05,
        init_fraction: float = 0.02,
        holdout_seed: int = 0,
    ) -> None:
        names = list(COMMONSENSE_TASKS if tasks is None else tasks)
        unknown = [n for n in names if n not in _SPECS] if isinstance(tasks, list | tuple | None) else names
        if not names or unknown or len(set(names)) != len(names):
            raise FedsbError(
                field="tasks", value=tasks, fix=f"list distinct datasets among {list(COMMONSENSE_TASKS)}"
            )
        if missing not in ("skip", "error"):
            raise FedsbError(field="missing", value=missing, fix="use 'skip' or 'error'")
        self.missing = missing
        if not isinstance(balanced, bool):
            raise FedsbError(field="balanced", value=balanced, fix="use true or false")
        self.balanced = balanced
        self.tasks: dict[str, CommonsenseTask] = {
            n: CommonsenseTask(  # type: ignore[call-arg]
                dataset=n,
                hub=hub, template=template, data_dir=data_dir, validation_fraction=validation_fraction,
                init_fraction=init_fraction, holdout_seed=holdout_seed,
            )
            for n in names
        }  # fmt: skip
        self._first = next(iter(self.tasks.values()))

    def load(self, split: str, size: int | None, seed: int) -> datasets.Dataset:
        """The rows of ``split`` of every dataset that has it, concatenated (dataset order); ``size`` draws
        a seeded sample of the concatenation."""
        if split not in SPLITS:
            raise FedsbError(field="split", value=split, fix=f"use one of {', '.join(SPLITS)}")
        parts, skipped = [], []
        for name, task in self.tasks.items():
            if split not in task.available_splits() and self.missing == "skip":
                skipped.append(name)
                continue
            parts.append(task.load(split, None, seed))
        if not parts:
            raise FedsbError(
                field="tasks", value=list(self.tasks), what=f"have no {split!r} split available",
                fix="pass data.options.hub=true for hub access, or choose datasets that ship that split",
            )  # fmt: skip
        if skipped:
            warnings.warn(
                f"task 'commonsense': {split} split without {', '.join(skipped)} (not available locally; "
                "data.options.hub=true loads them from the Hugging Face hub)",
                stacklevel=2,
            )
        ds = datasets.concatenate_datasets(parts)
        if size is None or size == len(ds):
            return ds
        if self.balanced and isinstance(size, int) and not isinstance(size, bool) and 0 < size < len(ds):
            return self._balanced(parts, size, seed)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(ds):
            raise FedsbError(
                field="size", value=size, what=f"is not in 1..{len(ds)} (split {split!r} of the suite)",
                fix=f"use at most {len(ds)} (or null for the whole split)",
            )  # fmt: skip
        return ds.shuffle(seed=seed).select(range(size))

    @staticmethod
    def _balanced(parts: list[datasets.Dataset], size: int, seed: int) -> datasets.Dataset:
        """``size`` rows split evenly over ``parts`` (a part with fewer rows gives all of them and the rest
        goes to the others), each a seeded sample of its dataset; concatenated in dataset order."""
        quota, left, sizes = [0] * len(parts), size, [len(p) for p in parts]
        while left > 0:
            open_parts = [i for i in range(len(parts)) if quota[i] < sizes[i]]
            share = max(1, left // len(open_parts))
            for i in open_parts:
                take = min(share, sizes[i] - quota[i], left)
                quota[i] += take
                left -= take
        return datasets.concatenate_datasets(
            [p.shuffle(seed=seed).select(range(q)) for p, q in zip(parts, quota, strict=True) if q]
        )

    def prompt(self, example: Mapping[str, Any]) -> str:
        """As every dataset of the suite (one template)."""
        return self._first.prompt(example)

    def target(self, example: Mapping[str, Any]) -> str:
        """ "the correct answer is <gold token>"."""
        return self._first.target(example)

    def reference(self, example: Mapping[str, Any]) -> str:
        """The gold token."""
        return self._first.reference(example)

    def choices(self, example: Mapping[str, Any]) -> list[str]:
        """The target of every option."""
        return self._first.choices(example)

    def gold_index(self, example: Mapping[str, Any]) -> int:
        """The gold option's index."""
        return self._first.gold_index(example)

    def is_correct(self, generated: str, example: Mapping[str, Any]) -> bool:
        """The first option token in the generation is the gold one."""
        return self._first.is_correct(generated, example)
