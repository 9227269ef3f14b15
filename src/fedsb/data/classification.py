"""Classification tasks (encoder + head, or label words): SST-2, SNLI, MNLI, RTE and user files.

Importing this module registers the tasks ``sst2``, ``snli``, ``mnli``, ``rte`` and ``classify`` in
``fedsb.data.task.TASKS``; their rows are tokenized by their format (`fedsb.data.formats`: the classifier
head's ``fedsb.data.head``, or label words as causal-LM rows, ``fedsb.data.lm``).

Rows of every split have the task's text columns (strings) and ``label`` (an int id into
``label_names``, stored as a ``datasets.ClassLabel``); other columns of the files are dropped.

Splits and the data folder follow ``fedsb.data.sources`` (held-out validation and init slices of the
training file where a task has no file for them). With the defaults (5 % and 2 %) SST-2's 67,349 training
rows give train 62,635 / validation 3,367 / init 1,347, and SNLI's 20,000 give train 19,600 / init 400
(its validation is ``dev.jsonl``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import datasets
import numpy as np

from fedsb.data.formats import CLASSIFIER_HEAD, LABEL_WORDS
from fedsb.data.head import (
    CLS_COLUMNS,
    collate_for_classification,
    make_classification_loader,
    tokenize_for_classification,
)
from fedsb.data.sources import DATA_DIR_ENV, SPLITS, SourcedTask, default_data_dir
from fedsb.data.task import first_choice, register_task
from fedsb.errors import FedsbError

__all__ = [
    "CLASSIFY_SPLITS",
    "CLS_COLUMNS",
    "DATA_DIR_ENV",
    "ClassificationTask",
    "GenericClassificationTask",
    "MNLITask",
    "RTETask",
    "SNLITask",
    "SST2Task",
    "collate_for_classification",
    "default_data_dir",
    "make_classification_loader",
    "tokenize_for_classification",
]

CLASSIFY_SPLITS: tuple[str, ...] = SPLITS


class ClassificationTask(SourcedTask):
    """A sentence or sentence-pair classification task: label ids, a per-label partition, exact-match scoring.

    Subclasses set ``name``, ``label_names`` (in label-id order), ``text_columns`` (one column, or two for a
    pair), ``data_subdir`` and ``files`` ({split: file name}); ``hub_splits`` ({split: hub split}) is used
    with the ``hub_id`` option. Options (besides those of ``SourcedTask``): ``mode`` "head" (an encoder or
    any model with a classification head; format ``CLASSIFIER_HEAD``) or "lm" (a causal LM continuing
    ``template`` with one of ``label_words``; format ``LABEL_WORDS``, scored by label-word likelihood or
    generation).
    """

    format = CLASSIFIER_HEAD
    max_new_tokens = 0  # nothing is generated (mode "head")
    partition_column = "label"  # Dirichlet non-IID over labels
    default_scorer = "likelihood"  # mode "lm"
    label_names: tuple[str, ...] = ()
    text_columns: tuple[str, ...] = ()
    default_columns: ClassVar[dict[str, str]] = {}  # {canonical column: file column} without `columns`
    lm_template: ClassVar[str] = ""  # str.format over the text columns; "" = one "<col>: {col}" line each
    lm_label_words: ClassVar[tuple[str, ...]] = ()  # default: label_names

    def __init__(
        self,
        *,
        mode: str = "head",
        label_words: Sequence[str] | None = None,
        template: str | None = None,
        **source: Any,
    ) -> None:
        super().__init__(
            **{**source, "columns": {**self.default_columns, **dict(source.get("columns") or {})}}
        )
        if mode not in ("head", "lm"):
            raise FedsbError(
                field="mode", value=mode,
                fix="use 'head' (classification head) or 'lm' (causal LM with label words)",
            )  # fmt: skip
        self.mode = mode
        words = tuple(label_words) if label_words is not None else self.lm_label_words or self.label_names
        if (
            len(words) != len(self.label_names)
            or len(set(words)) != len(words)
            or not all(isinstance(w, str) and w.strip() for w in words)
        ):
            raise FedsbError(
                field="label_words", value=label_words,
                fix=f"give {len(self.label_names)} distinct non-empty words, one per label {list(self.label_names)}",
            )  # fmt: skip
        self.label_words = tuple(w.strip() for w in words)
        self.template = template if template is not None else self.lm_template or self._default_template()
        if not isinstance(self.template, str):
            raise FedsbError(field="template", value=template, fix="use a str.format template string")
        try:
            self.template.format(**{col: "x" for col in self.text_columns})
        except (KeyError, IndexError, ValueError) as err:
            raise FedsbError(
                field="template", value=self.template, what=f"does not format ({err!r})",
                fix=f"use only the fields {{{'}, {'.join(self.text_columns)}}}",
            ) from None  # fmt: skip
        if mode == "lm":
            self.format = LABEL_WORDS
            self.max_new_tokens = 4  # type: ignore[misc]  # a label word and eos
        self.columns: dict[str, str] = {name: self.column(name) for name in self.column_names()}

    def _default_template(self) -> str:
        lines = [f"{col.replace('_', ' ').capitalize()}: {{{col}}}" for col in self.text_columns]
        return "\n".join([*lines, "Label:"])

    def column_names(self) -> tuple[str, ...]:
        """The text columns and ``label``."""
        return (*self.text_columns, "label")

    # ------------------------------------------------------------------ Task interface

    @property
    def num_labels(self) -> int:
        """Number of classes (``len(label_names)``)."""
        return len(self.label_names)

    def prompt(self, example: Mapping[str, Any]) -> str:
        """Mode "lm": ``template`` filled with the texts (the model input). Mode "head": the text; for a pair
        ``"<col a>: <a>\\n<col b>: <b>"`` (display only; the model sees both texts)."""
        if self.mode == "lm":
            return self.template.format(**{col: str(example[col]) for col in self.text_columns})
        if len(self.text_columns) == 1:
            return str(example[self.text_columns[0]])
        return "\n".join(f"{col}: {example[col]}" for col in self.text_columns)

    def target(self, example: Mapping[str, Any]) -> str:
        """Mode "lm": a space and the gold label word. Mode "head": the gold label name."""
        if self.mode == "lm":
            return f" {self.label_words[int(example['label'])]}"
        return self.label_names[int(example["label"])]

    def choices(self, example: Mapping[str, Any]) -> list[str] | None:
        """Mode "lm": the target of every label, in label-id order; mode "head": None."""
        return [f" {w}" for w in self.label_words] if self.mode == "lm" else None

    def gold_index(self, example: Mapping[str, Any]) -> int:
        """The label id."""
        return int(example["label"])

    def is_correct(self, generated: str, example: Mapping[str, Any]) -> bool:
        """Mode "head": the predicted label name (or id) equals the gold label. Mode "lm": the first label
        word in the generation (whole word, any case) is the gold one."""
        if isinstance(generated, int) and not isinstance(generated, bool):
            return generated == int(example["label"])
        if self.mode == "lm":
            found = first_choice(generated, self.label_words)
            return found == int(example["label"])
        return generated == self.target(example)

    def texts(self, example: Mapping[str, Any]) -> tuple[str, ...]:
        """The model input: one text, or the two texts of a pair."""
        return tuple(str(example[col]) for col in self.text_columns)

    # ------------------------------------------------------------------ raw rows

    def _normalize(self, ds: datasets.Dataset, where: str) -> datasets.Dataset:
        """Rename to our columns, map labels to ids and drop rows without a gold label or text."""
        self._require_columns(ds, self.column_names(), where)
        by_name = {name: i for i, name in enumerate(self.label_names)}
        data = ds.select_columns(sorted(set(self.columns.values()))).to_dict()  # python lists
        texts = {col: data[self.columns[col]] for col in self.text_columns}
        labels = data[self.columns["label"]]
        out: dict[str, list[Any]] = {col: [] for col in (*self.text_columns, "label")}
        dropped, unknown = 0, set()
        for i, raw in enumerate(labels):
            label = self._label_id(raw, by_name)
            row = [texts[col][i] for col in self.text_columns]
            if label is None or any(t is None for t in row):
                dropped += 1
                continue
            if label < 0:  # an unknown label: collected for one error
                unknown.add(raw)
                continue
            for col, text in zip(self.text_columns, row, strict=True):
                out[col].append(str(text))
            out["label"].append(label)
        if unknown:
            shown = sorted(map(repr, unknown))[:10]
            raise FedsbError(
                field="label_names", value=list(self.label_names),
                what=f"lack labels {', '.join(shown)} found in {where}",
                fix="give label_names covering every label (in id order), or fix the label column mapping",
            )  # fmt: skip
        if dropped:
            warnings.warn(
                f"task {self.name!r}: dropped {dropped} of {len(labels)} rows of {where} without a gold label "
                "('-', -1 or empty) or text",
                stacklevel=2,
            )
        if not out["label"]:
            raise FedsbError(
                field="data file", value=where, what="has no labelled rows", fix="check its contents"
            )
        features = datasets.Features(
            {**{col: datasets.Value("string") for col in self.text_columns},
             "label": datasets.ClassLabel(names=list(self.label_names))}
        )  # fmt: skip
        return datasets.Dataset.from_dict(out, features=features)

    def _label_id(self, raw: object, by_name: Mapping[str, int]) -> int | None:
        """Id of a raw label; None for "no gold label" ('-', '', -1, None, NaN), -1 for an unknown one."""
        if raw is None:
            return None
        if isinstance(raw, str):
            value = raw.strip()
            if value in by_name:
                return by_name[value]
            if value in ("-", "", "-1"):
                return None
            try:
                raw = int(value)
            except ValueError:
                return -1
        if isinstance(raw, float):
            if math.isnan(raw):
                return None
            if not raw.is_integer():
                return -1
            raw = int(raw)
        if isinstance(raw, bool) or not isinstance(raw, int | np.integer):
            return -1
        if raw == -1:
            return None
        return int(raw) if 0 <= raw < self.num_labels else -1


@register_task
class SST2Task(ClassificationTask):
    """SST-2 (GLUE) sentiment: ``sentence`` -> negative / positive.

    ``train.tsv`` (67,349 rows) gives train, validation (held out, 5 %) and init (2 %); ``dev.tsv`` (872,
    the GLUE dev set) is ``test``. Hub: ``hub_id="glue", hub_config="sst2"`` (its validation is our test).
    Mode "lm": ``"Review: <sentence>\\nSentiment:"`` continued by " negative" or " positive".
    """

    name = "sst2"
    lm_template = "Review: {sentence}\nSentiment:"
    label_names = ("negative", "positive")
    text_columns = ("sentence",)
    data_subdir = "sst2"
    files: ClassVar[dict[str, str]] = {"train": "train.tsv", "test": "dev.tsv"}
    hub_splits: ClassVar[dict[str, str]] = {"train": "train", "test": "validation"}


@register_task
class SNLITask(ClassificationTask):
    """SNLI: ``premise``, ``hypothesis`` -> entailment / neutral / contradiction.

    ``train_subset_20k.jsonl`` gives train and init (2 %), ``dev.jsonl`` is validation and ``test.jsonl``
    test (its text is tokenised, the others are not). Rows with gold label "-" are dropped with a warning.
    Hub: ``hub_id="stanfordnlp/snli"`` (label -1 = no gold label). Mode "lm": premise, hypothesis and
    "Does the premise entail the hypothesis? Answer:" continued by " yes", " maybe" or " no".
    """

    lm_template = (
        "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer:"
    )
    lm_label_words = ("yes", "maybe", "no")

    name = "snli"
    label_names = ("entailment", "neutral", "contradiction")
    text_columns = ("premise", "hypothesis")
    data_subdir = "snli"
    files: ClassVar[dict[str, str]] = {
        "train": "train_subset_20k.jsonl",
        "validation": "dev.jsonl",
        "test": "test.jsonl",
    }
    hub_splits: ClassVar[dict[str, str]] = {"train": "train", "validation": "validation", "test": "test"}


@register_task
class MNLITask(ClassificationTask):
    """MultiNLI dev-matched as ``test`` only (evaluation / transfer, e.g. after training on snli).

    Hub: ``hub_id="glue", hub_config="mnli"`` adds train (with held-out validation and init slices).
    Mode "lm": as snli.
    """

    lm_template = (
        "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer:"
    )
    lm_label_words = ("yes", "maybe", "no")

    name = "mnli"
    label_names = ("entailment", "neutral", "contradiction")
    text_columns = ("premise", "hypothesis")
    data_subdir = "mnli"
    files: ClassVar[dict[str, str]] = {"test": "dev_matched.jsonl"}
    hub_splits: ClassVar[dict[str, str]] = {"train": "train", "test": "validation_matched"}
    unavailable: ClassVar[dict[str, str]] = {
        split: "only MNLI dev-matched is available locally, as 'test' (evaluation only): train on snli "
        "and evaluate here, or pass hub_id='glue', hub_config='mnli' for the train split"
        for split in ("train", "validation", "init")
    }


@register_task
class RTETask(ClassificationTask):
    """RTE (GLUE): ``premise``, ``hypothesis`` -> entailment / not_entailment; hub only.

    No local copy ships (no clear licence): pass ``hub_id="glue", hub_config="rte"`` (its validation set is
    our test; train gives held-out validation and init slices) or ``data_files`` with columns mapped.
    Mode "lm": premise, hypothesis and "Does the premise entail the hypothesis? Answer:" + " yes" / " no".
    """

    name = "rte"
    label_names = ("entailment", "not_entailment")
    text_columns = ("premise", "hypothesis")
    default_columns: ClassVar[dict[str, str]] = {"premise": "sentence1", "hypothesis": "sentence2"}
    hub_splits: ClassVar[dict[str, str]] = {"train": "train", "test": "validation"}
    unavailable: ClassVar[dict[str, str]] = {
        split: "RTE has no local copy: pass data.options.hub_id=glue and data.options.hub_config=rte"
        for split in SPLITS
    }
    lm_template = (
        "Premise: {premise}\nHypothesis: {hypothesis}\nDoes the premise entail the hypothesis? Answer:"
    )
    lm_label_words = ("yes", "no")


@register_task
class GenericClassificationTask(ClassificationTask):
    """User files: ``data_files={split: path}`` (jsonl, json, csv, tsv, parquet; relative paths are under
    ``data_dir`` if given, else the working directory), ``label_names`` in id order, and ``columns``
    mapping ``text`` (and ``text_pair`` for pairs) and ``label`` to file columns. Labels may be names or
    ids. A split without a file is held out of ``train`` as for the builtin tasks. With ``hub_id``,
    ``hub_splits`` ({split: hub split}) take precedence over ``data_files``. Mode "lm" defaults: the
    template ``"Text: {text}\\nLabel:"`` (plus a ``Text pair`` line for pairs) and the label names as words.
    """

    name = "classify"

    def __init__(
        self,
        *,
        label_names: Sequence[str],
        hub_splits: Mapping[str, str] | None = None,
        mode: str = "head",
        label_words: Sequence[str] | None = None,
        template: str | None = None,
        **source: Any,
    ) -> None:
        self.label_names = _label_names(label_names)
        columns = source.get("columns")
        self.text_columns = ("text", "text_pair") if columns and "text_pair" in columns else ("text",)
        if source.get("hub_id") is None:
            _check_user_files(source.get("data_files"))
        self.hub_splits = dict(hub_splits or {s: s for s in ("train", "validation", "test")})  # type: ignore[misc]
        super().__init__(mode=mode, label_words=label_words, template=template, **source)


def _label_names(label_names: object) -> tuple[str, ...]:
    """At least two distinct non-empty label names, in label-id order."""
    names = tuple(label_names) if isinstance(label_names, list | tuple) else ()
    if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise FedsbError(
            field="label_names", value=label_names,
            fix="give at least two distinct label names in label-id order, e.g. ['negative', 'positive']",
        )  # fmt: skip
    return names


def _check_user_files(data_files: object) -> None:
    """Without a hub id, ``data_files`` must map known splits to files."""
    if not isinstance(data_files, Mapping) or not data_files:
        raise FedsbError(
            field="data_files", value=data_files,
            fix="map splits to files, e.g. {train: data/train.jsonl, test: data/test.jsonl}",
        )  # fmt: skip
    bad = sorted(set(data_files) - set(CLASSIFY_SPLITS))
    if bad:
        raise FedsbError(
            field="data_files", value=dict(data_files), what=f"has unknown splits {bad}",
            fix=f"use keys among {list(CLASSIFY_SPLITS)}",
        )  # fmt: skip
