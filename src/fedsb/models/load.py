"""Load base models and tokenizers: builtin aliases (`fedsb.models.builtin`: SmolLM2 from its GGUF
package, `fedsb.models.gguf`; MiniLM; the tiny test models, `fedsb.models.tiny`), local checkpoints and hub
ids (`fedsb.models.hub`). Every error is a `FedsbError` naming the setting, the value and the fix."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from fedsb.errors import FedsbError
from fedsb.models.builtin import BUILTIN_MODELS, builtin_config, builtin_list, did_you_mean, load_builtin
from fedsb.models.gguf import prepare_smollm2
from fedsb.models.hub import hub_offline, load_pretrained, looks_like_path, no_network, resolve_hub_dir
from fedsb.models.loaded import (
    ENCODER_MODEL_TYPES,
    SUPPORTED_DTYPES,
    SUPPORTED_TASKS,
    LoadedModel,
    ModelNotFoundError,
    check_dtype,
    check_task,
    default_cache_dir,
)
from fedsb.models.quantize import place_quantized
from fedsb.models.stream import release_heap
from fedsb.models.tiny import build_char_tokenizer

__all__ = [
    "BUILTIN_MODELS",
    "SUPPORTED_DTYPES",
    "SUPPORTED_TASKS",
    "LoadedModel",
    "ModelNotFoundError",
    "build_char_tokenizer",
    "default_cache_dir",
    "load_config",
    "load_model",
    "prepare_smollm2",
]


def _finish(loaded: LoadedModel, task: str) -> LoadedModel:
    """Set pad token, padding side and the pad id a causal LM needs for classification."""
    tok, model = loaded.tokenizer, loaded.model
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise FedsbError(
                field="model.name", value=loaded.name, what="has a tokenizer with neither pad_token nor eos_token",
                fix="use a checkpoint whose tokenizer defines one of them",
            )  # fmt: skip
        tok.pad_token = tok.eos_token
    causal = model.config.model_type not in ENCODER_MODEL_TYPES
    tok.padding_side = "left" if task == "causal_lm" else "right"
    if task == "seq_cls" and causal:
        model.config.pad_token_id = tok.pad_token_id
    loaded.model_type = model.config.model_type
    return loaded


def load_model(
    name: str,
    *,
    task: str = "causal_lm",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    device_map: str | None = None,
    hub: bool = False,
    quantize: str = "none",
) -> LoadedModel:
    """Load a base model and tokenizer from a builtin alias, a local directory or a hub id.

    ``task`` is "causal_lm" or "seq_cls" (needs ``num_labels`` > 1; the new head is initialized from
    ``seed``). The global torch RNG state is left unchanged. ``cache_dir`` holds converted builtin
    checkpoints (default ``$FEDSB_CACHE`` or ``~/.cache/fedsb``). The model ends on ``device`` (default:
    where transformers puts it, the CPU); ``device_map="auto"`` instead spreads a local or hub checkpoint
    over the visible GPUs (accelerate), for a model one device cannot hold. A hub id is read from the local
    hub cache; only with ``hub=True`` (and HF_HUB_OFFLINE unset) is it downloaded, so an unknown name or a
    typo fails at once, with the closest builtin names, instead of after the hub's retries.

    ``quantize`` (nf4, int8): every linear layer but the heads in 4/8 bits on ``device``
    (`fedsb.models.quantize`), the rest in ``dtype``. A causal LM with safetensors on disk is quantized
    layer by layer as it is read, so the dense model never exists whole (`fedsb.models.stream`); any other
    is loaded dense on the CPU (or spread by ``device_map``) and quantized a layer at a time. Either way
    the heap the load freed goes back to the OS (`release_heap`).
    """
    quantized = quantize != "none"
    target = torch.device(device) if device is not None and device_map is None else None
    device_of_layers = target if quantized else None
    args = (name, task, num_labels, dtype, cache_dir, seed, device_map, hub, quantize, device_of_layers)
    loaded = _load_weights(*args)
    if quantized:  # what the streamed load did not quantize (all of a dense one), then the rest to the device
        place_quantized(loaded.model, quantize, compute_dtype=check_dtype(dtype), device=target)
        release_heap()
    elif target is not None:
        loaded.model.to(target)
    return loaded


def _load_weights(
    name: str,
    task: str,
    num_labels: int | None,
    dtype: torch.dtype,
    cache_dir: str | Path | None,
    seed: int,
    device_map: str | None,
    hub: bool,
    quantize: str = "none",
    device: torch.device | None = None,
) -> LoadedModel:
    """`load_model` before the move to its device (or placed by ``device_map``); a causal LM streamed into
    ``quantize`` where it can be (`load_pretrained`), its 4/8-bit layers on ``device``."""
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(
            field="model.name", value=name, what="is empty", fix=f"give a builtin alias ({builtin_list()}), "
            "a checkpoint directory or a hub id",
        )  # fmt: skip
    check_task(task, num_labels)
    torch_dtype = check_dtype(dtype)
    alias = name.strip().lower()

    if alias in BUILTIN_MODELS:
        if device_map is not None:
            raise FedsbError(
                field="model.device_map", value=device_map, what=f"does not apply to the builtin {alias!r}",
                fix="use device_map only with a checkpoint directory or a hub id",
            )  # fmt: skip
        built = load_builtin(
            alias, name, task, num_labels, torch_dtype, seed, cache_dir, quantize=quantize, device=device
        )
        return _finish(built, task)

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelNotFoundError(
                field="model.name", value=name,
                what="is a file, not a checkpoint directory" if not path.is_dir() else "has no config.json",
                fix=f"give a saved HF checkpoint directory (save_pretrained, with config.json) or a builtin "
                f"alias ({builtin_list()})",
            )  # fmt: skip
        src = str(path.resolve())
        model, tok = load_pretrained(
            src, task, num_labels, torch_dtype, seed, local_files_only=True, device_map=device_map,
            quantize=quantize, device=device,
        )  # fmt: skip
        return _finish(LoadedModel(model, tok, name=name, source=src, model_type=""), task)

    if looks_like_path(name):
        raise ModelNotFoundError(
            field="model.name", value=name, what=f"is not an existing directory{did_you_mean(name)}",
            fix=f"give a local checkpoint directory, a hub id or a builtin alias ({builtin_list()})",
        )  # fmt: skip

    download = hub and not hub_offline()
    try:  # the hub uses its own cache; ``cache_dir`` is only for converted builtins
        model, tok = load_pretrained(
            name, task, num_labels, torch_dtype, seed, local_files_only=not download, device_map=device_map,
            quantize=quantize, device=device,
        )  # fmt: skip
    except OSError as err:
        raise _not_found(name, hub, err) from err
    source = resolve_hub_dir(name)
    return _finish(LoadedModel(model, tok, name=name, source=source, model_type=""), task)


def _not_found(name: str, hub: bool, err: OSError) -> ModelNotFoundError:
    """The error for a name that is no builtin, no directory and not loadable as a hub id."""
    if not hub:
        why = "is not a builtin model, a local directory or a model in the local hub cache"
        fix = f"use a builtin alias ({builtin_list()}) or a checkpoint directory, or set model.hub=true to "
        fix += "download it from the Hugging Face hub"
    elif hub_offline():
        why = "is not in the local hub cache, and HF_HUB_OFFLINE is set"
        fix = f"unset HF_HUB_OFFLINE to download it, or use a builtin alias ({builtin_list()})"
    else:
        why = f"could not be loaded from the hub ({(str(err).splitlines() or [type(err).__name__])[0]})"
        fix = f"check the hub id and the network, or use a builtin alias ({builtin_list()})"
    return ModelNotFoundError(field="model.name", value=name, what=why + did_you_mean(name), fix=fix)


def load_config(
    name: str,
    *,
    task: str = "causal_lm",
    num_labels: int | None = None,
    cache_dir: str | Path | None = None,
    hub: bool = False,
) -> tuple[PretrainedConfig, str]:
    """(the model's config, where it was read) without loading or converting weights and writing nothing:
    for planning a run (`fedsb run --dry-run`). SmolLM2 reads the converted checkpoint's config when it is
    cached, else its GGUF header. A hub id's config comes from the local hub cache, or with ``hub`` from
    the hub (as `load_model`)."""
    check_task(task, num_labels)
    alias = name.strip().lower()
    if alias in BUILTIN_MODELS:
        config, source = builtin_config(alias, cache_dir)
    else:
        path = Path(name).expanduser()
        src = str(path.resolve()) if path.exists() else name
        local = path.exists() or not hub or hub_offline()
        try:
            with no_network() if local else contextlib.nullcontext():
                config = AutoConfig.from_pretrained(src, local_files_only=local)
        except OSError as err:
            if not path.exists():
                raise _not_found(name, hub, err) from err
            raise ModelNotFoundError(
                field="model.name", value=name, what=f"has no readable config.json ({err})",
                fix=f"give a checkpoint directory, a cached hub id or a builtin alias ({builtin_list()})",
            ) from err  # fmt: skip
        source = src
    if task == "seq_cls":
        config.num_labels = num_labels
    return config, source
