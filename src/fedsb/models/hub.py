"""Checkpoints from a local directory or a Hugging Face hub id (the local hub cache unless downloads are
allowed), read with the network switched off for cache-only loads."""

from __future__ import annotations

import contextlib
import copy
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
    quantize: str = "none",
    device: torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (``task``: causal LM or sequence classifier, a new head seeded) and tokenizer of ``src``; an
    encoder asked for as a causal LM is refused. With ``quantize`` (nf4, int8) a causal LM whose
    safetensors are on disk is streamed, its linear layers quantized onto ``device`` as they are read
    (`fedsb.models.stream`); otherwise the dense model is loaded (the caller quantizes it)."""
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    weights = {"device_map": device_map} if device_map is not None else {}
    with no_network() if local_files_only else contextlib.nullcontext():
        config = AutoConfig.from_pretrained(src, **kwargs)
        if task == "causal_lm" and config.model_type in ENCODER_MODEL_TYPES:
            raise encoder_error(src, config.model_type)
        tok = AutoTokenizer.from_pretrained(src, **kwargs)
        if quantize != "none" and task == "causal_lm" and device_map is None:
            with seeded(seed):  # the global RNG stays untouched
                streamed = _stream(src, copy.deepcopy(config), dtype, quantize, device)
            if streamed is not None:
                return streamed, tok
        with seeded(seed):  # a new classification head is initialized from the seed
            if task == "seq_cls":
                model = AutoModelForSequenceClassification.from_pretrained(
                    src, num_labels=num_labels, dtype=dtype, **weights, **kwargs
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **weights, **kwargs)
    return model, tok


def _stream(
    src: str, config: Any, dtype: torch.dtype, quantize: str, device: torch.device | None
) -> PreTrainedModel | None:
    """The causal LM of ``src`` (a directory or a cached hub id) streamed into 4/8 bits, or None where
    its checkpoint cannot be streamed (`fedsb.models.stream.load_quantized`)."""
    from transformers.models.auto.auto_factory import _get_model_class

    from fedsb.models.stream import load_quantized

    directory = Path(src) if Path(src).is_dir() else Path(resolve_hub_dir(src))
    try:
        model_cls = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    except (KeyError, ValueError):  # no causal LM class for this config: from_pretrained says why
        return None
    return load_quantized(
        directory, model_cls, config, dtype=dtype, mode=quantize, device=device, name_or_path=src
    )
