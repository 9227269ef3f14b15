"""Checkpoints from a local directory or a Hugging Face hub id (the local hub cache unless downloads are
allowed), read with the network switched off for cache-only loads."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedsb.models.loaded import ENCODER_MODEL_TYPES, encoder_error, seeded

__all__ = ["hub_offline", "load_pretrained", "looks_like_path", "no_network", "resolve_hub_dir"]


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (1, true, yes, on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def no_network() -> Iterator[None]:
    """huggingface_hub's offline switch on inside the block (it is read at call time): besides the files,
    the hub client would otherwise look up its agent registry online (3 s timeout) even for a cache-only load."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def looks_like_path(name: str) -> bool:
    """Whether ``name`` reads as a file path rather than a hub id."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name in (".", "..")
        or "\\" in name
        or name.count("/") > 1
        or os.path.isabs(name)
    )


def resolve_hub_dir(name: str) -> str:
    """Local snapshot directory of a hub id after a successful load (falls back to the id)."""
    try:
        from transformers.utils import cached_file

        path = cached_file(name, "config.json", local_files_only=True)
        return str(Path(path).parent) if path else name
    except Exception:  # informative only
        return name


def load_pretrained(
    src: str,
    task: str,
    num_labels: int | None,
    dtype: torch.dtype,
    seed: int,
    *,
    local_files_only: bool,
    device_map: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (``task``: causal LM or sequence classifier, a new head seeded) and tokenizer of ``src``; an encoder asked for as a causal LM is refused."""
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    weights = {"device_map": device_map} if device_map is not None else {}
    with no_network() if local_files_only else contextlib.nullcontext():
        config = AutoConfig.from_pretrained(src, **kwargs)
        if task == "causal_lm" and config.model_type in ENCODER_MODEL_TYPES:
            raise encoder_error(src, config.model_type)
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
        with seeded(seed):  # a new classification head is initialized from the seed
            if task == "seq_cls":
                model = AutoModelForSequenceClassification.from_pretrained(
                    src, num_labels=num_labels, dtype=dtype, **weights, **kwargs
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **weights, **kwargs)
    return model, tok
