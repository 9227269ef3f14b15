"""Classification tasks (encoder + head): SST-2, SNLI, MNLI and user files, with tokenization and loading.

Importing this module registers the tasks ``sst2``, ``snli``, ``mnli`` and ``classify`` in
``fedsb.data.tasks.TASKS``.

Rows of every split have the task's text columns (strings) and ``label`` (an int id into
``label_names``, stored as a ``datasets.ClassLabel``); other columns of the files are dropped.

Splits. ``test`` (and ``validation`` where the task has a file for it) come from their own files. When a
task has no validation file, ``validation`` is a held-out slice of the training file, and ``init`` (the
server's proxy sample for the adapter initialisation) is always one unless the task has an init file:
the training file's rows are permuted ONCE with ``holdout_seed`` (independent of the run seed), the first
``round(validation_fraction * n)`` rows form ``validation``, the next ``round(init_fraction * n)`` rows
``init``, and ``train`` is the rest. The three are disjoint for every seed and size, and tuning on
``validation`` never sees ``test``. With the defaults (5 % and 2 %) SST-2's 67,349 training rows give
train 62,635 / validation 3,367 / init 1,347, and SNLI's 20,000 give train 19,600 / init 400 (its
validation is ``dev.jsonl``). ``load(split, size, seed)`` returns the whole split (file order) for
``size=None``, else ``split.shuffle(seed).select(range(size))``.

Data folder: option ``data_dir``, else ``$FEDSB_DATA_DIR``, else the first existing of
``<repo root>/../shared/data`` and ``./shared/data``. Either the folder holding the task's files or its
parent holding ``<task folder>/`` (e.g. ``sst2/``) may be given.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from fedsb.data.tasks import Task, register_task, seeded_loader
from fedsb.errors import FedsbError

__all__ = [
    "CLASSIFY_SPLITS",
    "CLS_COLUMNS",
    "DATA_DIR_ENV",
    "ClassificationTask",
    "GenericClassificationTask",
    "MNLITask",
    "SNLITask",
    "SST2Task",
    "collate_for_classification",
    "default_data_dir",
    "make_classification_loader",
    "tokenize_for_classification",
]

CLASSIFY_SPLITS: tuple[str, ...] = ("train", "validation", "test", "init")
CLS_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "labels")  # plus token_type_ids if produced
DATA_DIR_ENV = "FEDSB_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[3]  # src/fedsb/data/classification.py -> repo root
_FORMATS: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}


def default_data_dir() -> Path | None:
    """``$FEDSB_DATA_DIR``, else the first existing of ``<repo root>/../shared/data`` and ``./shared/data``."""
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    for candidate in (_REPO_ROOT.parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None


def _check_fraction(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise FedsbError(field=field, value=value, fix="use a fraction in [0, 1), e.g. 0.05")
    return float(value)


def _positive_int(field: str, value: object, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FedsbError(field=field, value=value, fix=fix)
    return value


def _read_file(path: Path) -> datasets.Dataset:
    """All rows of a jsonl / json / csv / tsv / parquet file (csv and tsv: every column read as a string)."""
    builder = _FORMATS.get(path.suffix.lower())
    if builder is None:
        raise FedsbError(
            field="data file", value=str(path), what="has an unknown extension",
            fix=f"use one of {', '.join(_FORMATS)}",
        )  # fmt: skip
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL  # GLUE TSVs use no quoting
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh, delimiter=sep, quoting=quoting), [])
        # strings throughout: no "nan"/"null" sentences turned into missing values, no "007" into 7
        features = datasets.Features({name: datasets.Value("string") for name in header})
        kwargs = {"sep": sep, "quoting": quoting, "keep_default_na": False, "na_filter": False}
        kwargs["features"] = features
    return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


class ClassificationTask(Task):
    """A sentence or sentence-pair classification task: label ids, a per-label partition, exact-match scoring.

    Subclasses set ``name``, ``label_names`` (in label-id order), ``text_columns`` (one column, or two for a
    pair), ``data_subdir`` and ``files`` ({split: file name}); ``hub_splits`` ({split: hub split}) is used
    with the ``hub_id`` option. Options: ``data_dir``, ``columns`` ({our column: file column}),
    ``validation_fraction``, ``init_fraction``, ``holdout_seed``, ``hub_id``, ``hub_config`` (see the module
    docstring for the split rules).
    """

    kind = "classify"
    max_new_tokens = 0  # nothing is generated
    partition_column = "label"  # Dirichlet non-IID over labels
    label_names: tuple[str, ...] = ()
    text_columns: tuple[str, ...] = ()
    data_subdir: ClassVar[str] = ""
    files: ClassVar[dict[str, str]] = {}
    hub_splits: ClassVar[dict[str, str]] = {}
    unavailable: ClassVar[dict[str, str]] = {}  # split -> why it is missing (for the error)

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        columns: Mapping[str, str] | None = None,
        validation_fraction: float = 0.05,
        init_fraction: float = 0.02,
        holdout_seed: int = 0,
        hub_id: str | None = None,
        hub_config: str | None = None,
    ) -> None:
        self.data_dir = None if data_dir is None else Path(data_dir).expanduser()
        self.validation_fraction = _check_fraction("validation_fraction", validation_fraction)
        self.init_fraction = _check_fraction("init_fraction", init_fraction)
        if self.validation_fraction + self.init_fraction >= 1:
            raise FedsbError(
                field="validation_fraction + init_fraction",
                value=self.validation_fraction + self.init_fraction,
                what="leaves no training rows",
                fix="keep their sum below 1, e.g. 0.05 and 0.02",
            )
        if isinstance(holdout_seed, bool) or not isinstance(holdout_seed, int) or holdout_seed < 0:
            raise FedsbError(field="holdout_seed", value=holdout_seed, fix="use a non-negative integer")
        self.holdout_seed = holdout_seed
        if hub_id is not None and (not isinstance(hub_id, str) or not hub_id):
            raise FedsbError(field="hub_id", value=hub_id, fix="use a dataset id such as 'glue', or None")
        self.hub_id, self.hub_config = hub_id, hub_config
        known = (*self.text_columns, "label")
        mapping = dict(columns or {})
        bad = sorted(set(mapping) - set(known))
        if bad:
            raise FedsbError(
                field="columns", value=mapping, what=f"maps unknown columns {bad}",
                fix=f"map only {list(known)} to the columns of your files",
            )  # fmt: skip
        self.columns: dict[str, str] = {name: mapping.get(name, name) for name in known}
        self._cache: dict[str, datasets.Dataset] = {}

    # ------------------------------------------------------------------ Task interface

    @property
    def num_labels(self) -> int:
        """Number of classes (``len(label_names)``)."""
        return len(self.label_names)

    def prompt(self, example: Mapping[str, Any]) -> str:
        """The text; for a pair ``"<col a>: <a>\\n<col b>: <b>"`` (display only; the model sees both texts)."""
        if len(self.text_columns) == 1:
            return str(example[self.text_columns[0]])
        return "\n".join(f"{col}: {example[col]}" for col in self.text_columns)

    def target(self, example: Mapping[str, Any]) -> str:
        """The gold label name."""
        return self.label_names[int(example["label"])]

    def is_correct(self, generated: str, example: Mapping[str, Any]) -> bool:
        """The predicted label name (or id) equals the gold label."""
        if isinstance(generated, int) and not isinstance(generated, bool):
            return generated == int(example["label"])
        return generated == self.target(example)

    def texts(self, example: Mapping[str, Any]) -> tuple[str, ...]:
        """The model input: one text, or the two texts of a pair."""
        return tuple(str(example[col]) for col in self.text_columns)

    def load(self, split: str, size: int | None, seed: int) -> datasets.Dataset:
        """Rows of ``split`` (train, validation, test, init); the whole split for ``size=None``, else a
        seeded sample of ``size`` rows (``shuffle(seed).select(range(size))``)."""
        if split not in CLASSIFY_SPLITS:
            raise FedsbError(field="split", value=split, fix=f"use one of {', '.join(CLASSIFY_SPLITS)}")
        sources = self._sources()
        if split in sources and not (split == "train" and self._holdout_from_train(sources)):
            ds = self._raw(split)
        elif split in ("train", "validation", "init") and "train" in sources:
            ds = self._holdout(split, sources)
        else:
            why = self.unavailable.get(split, f"task {self.name!r} has no {split!r} split")
            have = [s for s in CLASSIFY_SPLITS if s in sources or (s != "test" and "train" in sources)]
            raise FedsbError(
                field="split", value=split, what=f"is not available ({why})", fix=f"use one of {have}"
            )
        n = len(ds)
        if size is None or size == n:
            return ds
        _positive_int("size", size, "use a positive number of rows or None for the whole split")
        if size > n:
            raise FedsbError(
                field="size", value=size, what=f"exceeds the {n} rows of split {split!r} of task {self.name!r}",
                fix=f"use at most {n} (or null for the whole split)",
            )  # fmt: skip
        return ds.shuffle(seed=seed).select(range(size))

    # ------------------------------------------------------------------ sources and held-out slices

    def _sources(self) -> dict[str, str]:
        """{split: where it comes from}: hub splits with ``hub_id``, else the task's files."""
        return dict(self.hub_splits) if self.hub_id is not None else dict(self.files)

    @staticmethod
    def _holdout_from_train(sources: Mapping[str, str]) -> bool:
        return "validation" not in sources or "init" not in sources

    def _holdout(self, split: str, sources: Mapping[str, str]) -> datasets.Dataset:
        """``split`` as the train/validation/init slice of the training source (module docstring)."""
        raw = self._raw("train")
        n = len(raw)
        n_val = round(self.validation_fraction * n) if "validation" not in sources else 0
        n_init = round(self.init_fraction * n) if "init" not in sources else 0
        if split in ("validation", "init") and (n_val if split == "validation" else n_init) == 0:
            option = f"{split}_fraction"
            raise FedsbError(
                field=option, value=getattr(self, option), what=f"holds out no {split} rows of {n}",
                fix=f"set data.options.{option} > 0 (e.g. 0.05) to hold out a {split} slice of train",
            )  # fmt: skip
        if n - n_val - n_init < 1:
            raise FedsbError(
                field="validation_fraction + init_fraction",
                value=self.validation_fraction + self.init_fraction,
                what=f"leaves no training rows of {n}",
                fix="use smaller fractions or a larger training file",
            )
        perm = np.random.default_rng(self.holdout_seed).permutation(n)
        bounds = {"validation": (0, n_val), "init": (n_val, n_val + n_init), "train": (n_val + n_init, n)}
        lo, hi = bounds[split]
        return raw.select(np.sort(perm[lo:hi]).tolist())

    def _task_dir(self) -> Path | None:
        root = self.data_dir if self.data_dir is not None else default_data_dir()
        if root is None:
            return None
        if self.data_subdir and (root / self.data_subdir).is_dir():
            return root / self.data_subdir
        return root

    def _file_path(self, split: str, name: str) -> Path:
        path = Path(name).expanduser()
        if path.is_absolute():
            found = path
        else:
            base = self._task_dir()
            if base is None:
                raise FedsbError(
                    field="data.options.data_dir", value=None,
                    what=f"is not set and no shared data folder was found (task {self.name!r} needs {name})",
                    fix=self._dir_fix(name),
                )  # fmt: skip
            found = base / path
        if not found.is_file():
            raise FedsbError(
                field="data.options.data_dir", value=str(found.parent),
                what=f"has no {found.name} (split {split!r} of task {self.name!r}; looked for {found})",
                fix=self._dir_fix(name),
            )  # fmt: skip
        return found

    def _dir_fix(self, name: str) -> str:
        sub = f"{self.data_subdir}/" if self.data_subdir else ""
        return (
            f"pass data.options.data_dir=<folder holding {name}> or set {DATA_DIR_ENV}=<folder holding "
            f"{sub}{name}>"
            + (", or data.options.hub_id=<dataset id> for hub access" if self.hub_splits else "")
        )

    def _raw(self, split: str) -> datasets.Dataset:
        """The normalized rows of source ``split`` (cached): canonical columns, int labels."""
        if split not in self._cache:
            source = self._sources()[split]
            if self.hub_id is not None:
                ds = datasets.load_dataset(self.hub_id, self.hub_config, split=source)
                where = f"{self.hub_id}/{self.hub_config or ''}:{source}"
            else:
                path = self._file_path(split, source)
                ds = _read_file(path)
                where = path.name
            self._cache[split] = self._normalize(ds, where)
        return self._cache[split]

    def _normalize(self, ds: datasets.Dataset, where: str) -> datasets.Dataset:
        """Rename to our columns, map labels to ids and drop rows without a gold label or text."""
        missing = sorted({src for src in self.columns.values() if src not in ds.column_names})
        if missing:
            raise FedsbError(
                field="columns", value=self.columns, what=f"names {missing}, absent from {where}",
                fix=f"map {list(self.columns)} to columns of {ds.column_names} with data.options.columns",
            )  # fmt: skip
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
    """

    name = "sst2"
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
    Hub: ``hub_id="stanfordnlp/snli"`` (label -1 = no gold label).
    """

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
    """

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
class GenericClassificationTask(ClassificationTask):
    """User files: ``data_files={split: path}`` (jsonl, json, csv, tsv, parquet; relative paths are under
    ``data_dir`` if given, else the working directory), ``label_names`` in id order, and ``columns``
    mapping ``text`` (and ``text_pair`` for pairs) and ``label`` to file columns. Labels may be names or
    ids. A split without a file is held out of ``train`` as for the builtin tasks. With ``hub_id``,
    ``hub_splits`` ({split: hub split}) replaces ``data_files``.
    """

    name = "classify"

    def __init__(
        self,
        *,
        label_names: Sequence[str],
        data_files: Mapping[str, str | os.PathLike[str]] | None = None,
        columns: Mapping[str, str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        validation_fraction: float = 0.05,
        init_fraction: float = 0.02,
        holdout_seed: int = 0,
        hub_id: str | None = None,
        hub_config: str | None = None,
        hub_splits: Mapping[str, str] | None = None,
    ) -> None:
        names = tuple(label_names) if isinstance(label_names, list | tuple) else ()
        if (
            len(names) < 2
            or len(set(names)) != len(names)
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise FedsbError(
                field="label_names", value=label_names,
                fix="give at least two distinct label names in label-id order, e.g. ['negative', 'positive']",
            )  # fmt: skip
        self.label_names = names
        self.text_columns = ("text", "text_pair") if columns and "text_pair" in columns else ("text",)
        if hub_id is None:
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
        self.files = {split: str(path) for split, path in (data_files or {}).items()}  # type: ignore[misc]
        self.hub_splits = dict(hub_splits or {s: s for s in ("train", "validation", "test")})  # type: ignore[misc]
        super().__init__(
            data_dir=data_dir,
            columns=columns,
            validation_fraction=validation_fraction,
            init_fraction=init_fraction,
            holdout_seed=holdout_seed,
            hub_id=hub_id,
            hub_config=hub_config,
        )

    def _task_dir(self) -> Path | None:
        return self.data_dir if self.data_dir is not None else Path.cwd()


# --------------------------------------------------------------------------- tokenization and loading


def tokenize_for_classification(
    ds: datasets.Dataset, task: ClassificationTask, tokenizer: PreTrainedTokenizerBase, max_length: int
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
    _positive_int("max_length", max_length, "use a positive number of tokens, e.g. 128")
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
    if not features:
        raise FedsbError(field="features", value=[], fix="pass at least one tokenized example")
    missing = [c for c in CLS_COLUMNS if c not in features[0]]
    if missing:
        raise FedsbError(
            field="features[0]", value=sorted(features[0]), what=f"lacks {missing}",
            fix="tokenize with tokenize_for_classification first",
        )  # fmt: skip
    _positive_int("pad_to_multiple_of", pad_to_multiple_of, "use a positive integer, e.g. 8")
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
    _positive_int("batch_size", batch_size, "use a positive number of examples per batch")
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
