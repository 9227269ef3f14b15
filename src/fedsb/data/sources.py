"""Where a task's rows come from: local files (jsonl, json, csv, tsv, parquet) or Hugging Face dataset ids.

`SourcedTask` is the base of every file- or hub-backed task (classification, GSM8K, commonsense). It owns
the split rules, the data-folder discovery, the column mapping check and the hub loading; a subclass only
turns raw rows into its canonical columns (`_normalize`).

Splits. Each split comes from its own source when there is one: a hub split (with ``hub_id``), a file the
user named (``data_files``) or one of the task's own files. When a task has no validation or init source,
``validation`` and ``init`` (the server's proxy sample for the adapter initialisation) are held-out slices
of the training source: its rows are permuted ONCE with ``holdout_seed`` (independent of the run seed), the
first ``round(validation_fraction * n)`` rows form ``validation``, the next ``round(init_fraction * n)``
rows ``init``, and ``train`` is the rest. The three are disjoint for every seed and size, and tuning on
``validation`` never sees ``test``. ``load(split, size, seed)`` returns the whole split (file order) for
``size=None``, else ``split.shuffle(seed).select(range(size))``.

Data folder: option ``data_dir``, else ``$FEDSB_DATA_DIR``, else the first existing of
``<repo root>/../shared/data`` and ``./shared/data``. Either the folder holding the task's files or its
parent holding ``<task folder>/`` (e.g. ``sst2/``) may be given. Hub ids are only used when a task's
options name one: no default ever touches the network.
"""

from __future__ import annotations

import csv
import logging
import os
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np

from fedsb.data.task import Task
from fedsb.errors import FedsbError
from fedsb.validators import fraction, non_negative_int, positive_int

__all__ = [
    "DATA_DIR_ENV",
    "FILE_FORMATS",
    "SOURCE_OPTIONS",
    "SPLITS",
    "SourceSpec",
    "SourcedTask",
    "default_data_dir",
    "load_hub",
    "read_file",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test", "init")
DATA_DIR_ENV = "FEDSB_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[3]  # src/fedsb/data/sources.py -> repo root
FILE_FORMATS: dict[str, str] = {
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


def read_file(path: Path) -> datasets.Dataset:
    """All rows of a jsonl / json (lines or one array) / csv / tsv / parquet file; csv and tsv columns are
    read as strings (no "nan"/"null" sentences turned into missing values, no "007" into 7)."""
    builder = FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise FedsbError(
            field="data file", value=str(path), what="has an unknown extension",
            fix=f"use one of {', '.join(FILE_FORMATS)}",
        )  # fmt: skip
    try:
        size = path.stat().st_size
    except OSError as err:
        raise FedsbError(
            field="data file", value=str(path), what=f"cannot be read ({err.strerror or err})",
            fix="check the path and its permissions",
        ) from None  # fmt: skip
    if size == 0:
        raise FedsbError(field="data file", value=str(path), what="is empty", fix=_ROWS_FIX[builder])
    try:
        ds = _load_file(path, builder)
    except Exception as err:  # datasets/pyarrow raise many kinds; each becomes one error naming the file
        raise _unreadable(path, builder, err) from None
    if len(ds) == 0:
        raise FedsbError(field="data file", value=str(path), what="holds no rows", fix=_ROWS_FIX[builder])
    return ds


_ROWS_FIX = {
    "json": "write one JSON object per line (jsonl), or one JSON array of objects (json)",
    "csv": "write a header line with the column names, then one row per line",
    "parquet": "write a parquet file with at least one row",
}


def _load_file(path: Path, builder: str) -> datasets.Dataset:
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        sep = "\t" if path.suffix.lower() == ".tsv" else ","
        quoting = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL  # GLUE TSVs use no quoting
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh, delimiter=sep, quoting=quoting), [])
        features = datasets.Features({name: datasets.Value("string") for name in header})
        kwargs = {"sep": sep, "quoting": quoting, "keep_default_na": False, "na_filter": False}
        kwargs["features"] = features
    with _quiet_read():
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)


@contextmanager
def _quiet_read() -> Iterator[None]:
    """Reading a user file: no `datasets` progress bar (a redirected log gets no carriage returns) and no
    `datasets` error log (a failure becomes one `FedsbError` naming the file); both restored afterwards."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("datasets")
    level, was_disabled = logger.level, are_progress_bars_disabled()
    logger.setLevel(logging.CRITICAL)
    disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if not was_disabled:
            enable_progress_bars()


def _unreadable(path: Path, builder: str, err: Exception) -> FedsbError:
    """The error for a file `datasets` could not read: for JSON, the first bad line (1-based) and column."""
    where = _bad_json(path) if builder == "json" else None
    if where is not None:
        return FedsbError(
            field="data file", value=str(path), what=f"has an invalid row at {where}",
            fix="fix or remove that line: " + _ROWS_FIX["json"],
        )  # fmt: skip
    if builder != "parquet" and _data_lines(path) <= (1 if builder == "csv" else 0):  # blank, or a header
        return FedsbError(field="data file", value=str(path), what="holds no rows", fix=_ROWS_FIX["csv"])
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return FedsbError(
        field="data file", value=str(path), what=f"could not be read as {path.suffix} ({first})",
        fix=f"check the file: {_ROWS_FIX[builder]}",
    )  # fmt: skip


def _bad_json(path: Path) -> str | None:
    """'line L, column C: <why>' of the first row that is not a JSON object, else None."""
    import json

    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno}, column {e.colno}: {e.msg}"
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        return None if bad is None else f"array item {bad}: not a JSON object"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {number}, column {e.colno}: {e.msg}"
        if not isinstance(row, dict):
            return f"line {number}: a {type(row).__name__}, not a JSON object"
    return None


def _data_lines(path: Path) -> int:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if line.strip())


def load_hub(hub_id: str, config: str | None, split: str, *, task: str) -> datasets.Dataset:
    """``datasets.load_dataset(hub_id, config, split=split)``; failures (offline, unknown id) name the fix."""
    try:
        return datasets.load_dataset(hub_id, config, split=split)
    except Exception as err:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, ValueError, ...
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else (str(err).splitlines() or [type(err).__name__])[0]
        raise FedsbError(
            field="data.options.hub_id", value=hub_id,
            what=f"could not be loaded (task {task!r}, config {config!r}, split {split!r}: {why})",
            fix="run with hub access (unset HF_HUB_OFFLINE), or give local files with data.options.data_files",
        ) from err  # fmt: skip


@dataclass(frozen=True)
class SourceSpec:
    """Where a sourced task's rows come from (module docstring: the split rules): ``data_dir``,
    ``data_files`` ({split: path}: relative to ``data_dir`` if given, else to the working directory),
    ``columns`` ({canonical column: file column}), ``validation_fraction`` and ``init_fraction`` (held out
    of train where a split has no source of its own), ``holdout_seed``, ``hub_id``, ``hub_config``."""

    data_dir: str | os.PathLike[str] | None = None
    data_files: Mapping[str, str | os.PathLike[str]] | None = None
    columns: Mapping[str, str] | None = None
    validation_fraction: float = 0.05
    init_fraction: float = 0.02
    holdout_seed: int = 0
    hub_id: str | None = None
    hub_config: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "validation_fraction", fraction("validation_fraction", self.validation_fraction)
        )
        object.__setattr__(self, "init_fraction", fraction("init_fraction", self.init_fraction))
        if self.validation_fraction + self.init_fraction >= 1:
            raise FedsbError(
                field="validation_fraction + init_fraction",
                value=self.validation_fraction + self.init_fraction,
                what="leaves no training rows",
                fix="keep their sum below 1, e.g. 0.05 and 0.02",
            )
        non_negative_int("holdout_seed", self.holdout_seed)
        if self.hub_id is not None and (not isinstance(self.hub_id, str) or not self.hub_id):
            raise FedsbError(
                field="hub_id", value=self.hub_id, fix="use a dataset id such as 'glue', or None"
            )


SOURCE_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(SourceSpec))


class SourcedTask(Task):
    """A task whose splits come from local files or a hub dataset (module docstring: split rules).

    Subclasses set ``data_subdir`` and ``files`` ({split: file name under the task folder}), optionally
    ``hub_splits`` ({split: hub split}, used with ``hub_id``) and ``unavailable`` ({split: why}), list
    their canonical columns in ``column_names()`` and implement ``_normalize``. Its options are those of
    `SourceSpec`; a subclass takes its own options by name and passes ``**source`` on.
    """

    data_subdir: ClassVar[str] = ""
    files: ClassVar[dict[str, str]] = {}
    hub_splits: ClassVar[dict[str, str]] = {}
    unavailable: ClassVar[dict[str, str]] = {}  # split -> why it is missing (for the error)
    source_options: ClassVar[tuple[str, ...]] = SOURCE_OPTIONS  # what ``**source`` accepts (`option_names`)

    def __init__(self, **source: Any) -> None:
        self.source = spec = SourceSpec(**source)
        self.data_dir = None if spec.data_dir is None else Path(spec.data_dir).expanduser()
        self.validation_fraction, self.init_fraction = spec.validation_fraction, spec.init_fraction
        self.holdout_seed, self.hub_id, self.hub_config = spec.holdout_seed, spec.hub_id, spec.hub_config
        self.user_files = self._check_data_files(spec.data_files)
        known = self.column_names()
        mapping = dict(spec.columns or {})
        bad = sorted(set(mapping) - set(known))
        if bad:
            raise FedsbError(
                field="columns", value=mapping, what=f"maps unknown columns {bad}",
                fix=f"map only {list(known)} to the columns of your files",
            )  # fmt: skip
        self.column_map: dict[str, str] = mapping
        self._cache: dict[str, datasets.Dataset] = {}

    def _check_data_files(self, data_files: Mapping[str, Any] | None) -> dict[str, Path]:
        self._relative_files: set[str] = set()
        if data_files is None:
            return {}
        if not isinstance(data_files, Mapping):
            raise FedsbError(
                field="data_files",
                value=data_files,
                fix="map splits to files, e.g. {train: data/train.jsonl}",
            )
        bad = sorted(set(data_files) - set(SPLITS))
        if bad:
            raise FedsbError(
                field="data_files", value=dict(data_files), what=f"has unknown splits {bad}",
                fix=f"use keys among {list(SPLITS)}",
            )  # fmt: skip
        base = self.data_dir if self.data_dir is not None else Path.cwd()
        self._relative_files = {s for s, p in data_files.items() if not Path(p).expanduser().is_absolute()}
        return {split: base / Path(p).expanduser() for split, p in data_files.items()}

    # ------------------------------------------------------------------ subclass hooks

    @abstractmethod
    def column_names(self) -> tuple[str, ...]:
        """The canonical columns a ``columns`` mapping may name."""

    @abstractmethod
    def _normalize(self, ds: datasets.Dataset, where: str) -> datasets.Dataset:
        """Raw rows of one source -> the task's canonical columns (``where`` names the source in errors)."""

    def column(self, name: str) -> str:
        """The file column holding canonical column ``name`` (the ``columns`` mapping, else ``name``)."""
        return self.column_map.get(name, name)

    # ------------------------------------------------------------------ splits

    def load(self, split: str, size: int | None, seed: int) -> datasets.Dataset:
        """Rows of ``split`` (train, validation, test, init); the whole split for ``size=None``, else a
        seeded sample of ``size`` rows (``shuffle(seed).select(range(size))``)."""
        if split not in SPLITS:
            raise FedsbError(field="split", value=split, fix=f"use one of {', '.join(SPLITS)}")
        sources = self.sources()
        if split in sources and not (split == "train" and self._holdout_from_train(sources)):
            ds = self._raw(split)
        elif split in ("train", "validation", "init") and "train" in sources:
            ds = self._holdout(split, sources)
        else:
            raise self._unavailable(split, sources)
        n = len(ds)
        if size is None or size == n:
            return ds
        positive_int("size", size, "use a positive number of rows or None for the whole split")
        if size > n:
            raise FedsbError(
                field="size", value=size, what=f"exceeds the {n} rows of split {split!r} of task {self.name!r}",
                fix=f"use at most {n} (or null for the whole split)",
            )  # fmt: skip
        return ds.shuffle(seed=seed).select(range(size))

    def available_splits(self) -> list[str]:
        """The splits ``load`` can serve with the current options (without reading any file)."""
        sources = self.sources()
        return [s for s in SPLITS if s in sources or (s != "test" and "train" in sources)]

    def _unavailable(self, split: str, sources: Mapping[str, Any]) -> FedsbError:
        why = self.unavailable.get(split, f"task {self.name!r} has no {split!r} split")
        have = self.available_splits()
        lead = f"use one of {have}" if have else "this task has no split available with these options"
        return FedsbError(
            field="split", value=split, what=f"is not available ({why})", fix=lead + self._source_hint()
        )

    def _source_hint(self) -> str:
        return ", or give the split a file with data.options.data_files={split: path}"

    def sources(self) -> dict[str, tuple[str, str | Path]]:
        """{split: (kind, where)}: ("hub", hub split) with ``hub_id``, ("file", path) for ``data_files``,
        ("task", file name) for the task's own files; in that order of precedence."""
        out: dict[str, tuple[str, str | Path]] = {s: ("task", f) for s, f in self.files.items()}
        out.update({s: ("file", p) for s, p in self.user_files.items()})
        if self.hub_id is not None:
            out.update({s: ("hub", h) for s, h in self.hub_splits.items()})
        return out

    @staticmethod
    def _holdout_from_train(sources: Mapping[str, Any]) -> bool:
        return "validation" not in sources or "init" not in sources

    def _holdout(self, split: str, sources: Mapping[str, Any]) -> datasets.Dataset:
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

    # ------------------------------------------------------------------ files and hub

    def _task_dir(self) -> Path | None:
        root = self.data_dir if self.data_dir is not None else default_data_dir()
        if root is None:
            return None
        if self.data_subdir and (root / self.data_subdir).is_dir():
            return root / self.data_subdir
        return root

    def _file_path(self, split: str, name: str | Path) -> Path:
        path = Path(name).expanduser()
        if path.is_absolute():
            found = path
        else:
            base = self._task_dir()
            if base is None:
                raise FedsbError(
                    field="data.options.data_dir", value=None,
                    what=f"is not set and no shared data folder was found (task {self.name!r} needs {name})",
                    fix=self._dir_fix(str(name)),
                )  # fmt: skip
            found = base / path
        if not found.is_file():
            raise FedsbError(
                field="data.options.data_dir", value=str(found.parent),
                what=f"has no {found.name} (split {split!r} of task {self.name!r}; looked for {found})",
                fix=self._dir_fix(str(name)),
            )  # fmt: skip
        return found

    def _user_file(self, split: str, path: Path) -> Path:
        """A file the user named in ``data_files`` (resolved at construction); no data-folder advice."""
        if path.is_file():
            return path
        base = "data.options.data_dir" if self.data_dir is not None else f"the working directory {Path.cwd()}"
        relative = f" (a relative path is resolved under {base})" if split in self._relative_files else ""
        raise FedsbError(
            field=f"data.options.data_files.{split}", value=str(path),
            what="is a directory, not a file" if path.is_dir() else "does not exist",
            fix="give the path of an existing file" + relative,
        )  # fmt: skip

    def _dir_fix(self, name: str) -> str:
        sub = f"{self.data_subdir}/" if self.data_subdir else ""
        return (
            f"pass data.options.data_dir=<folder holding {name}> or set {DATA_DIR_ENV}=<folder holding "
            f"{sub}{name}>"
            + (", or data.options.hub_id=<dataset id> for hub access" if self.hub_splits else "")
        )

    def _raw(self, split: str) -> datasets.Dataset:
        """The normalized rows of source ``split`` (cached per task object)."""
        if split not in self._cache:
            kind, where = self.sources()[split]
            if kind == "hub":
                assert self.hub_id is not None
                ds = load_hub(self.hub_id, self.hub_config, str(where), task=self.name)
                label = f"{self.hub_id}/{self.hub_config or ''}:{where}"
            else:
                path = (
                    self._user_file(split, Path(where)) if kind == "file" else self._file_path(split, where)
                )
                ds = read_file(path)
                label = path.name
            self._cache[split] = self._normalize(ds, label)
        return self._cache[split]

    def _require_columns(self, ds: datasets.Dataset, names: tuple[str, ...], where: str) -> None:
        """Raise (naming the mapping fix) unless every canonical column in ``names`` is in ``ds``."""
        sources = {n: self.column(n) for n in names}
        missing = sorted({src for src in sources.values() if src not in ds.column_names})
        if missing:
            raise FedsbError(
                field="columns", value=sources, what=f"names {missing}, absent from {where}",
                fix=f"map {list(sources)} to columns of {ds.column_names} with data.options.columns",
            )  # fmt: skip
