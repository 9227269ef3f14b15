"""A 4/8-bit base read from its safetensors checkpoint one layer at a time, so the dense model never
exists whole.

`load_quantized` builds the model's skeleton with its parameters on the meta device (accelerate's
`init_empty_weights`; buffers such as rotary frequencies are computed for real, as transformers does), then
walks its modules: each module's tensors are read from the checkpoint (`safetensors.safe_open`, the file
opened for that module only, so its pages are not kept mapped), cast to the base dtype as `from_pretrained`
casts them, and every linear layer `quantize_model` would quantize is replaced by its `quantized_linear`
at once. Peak ~ the quantized model + one dense layer (+ one tensor in the file's dtype), instead of the
whole dense model. The bytes are those of loading the dense model with transformers and quantizing it
(the same cast, the same quantizer, in the same order; tests/models/test_quantize.py checks bit-equality).

`release_heap` hands the heap that loading freed back to the OS (glibc `malloc_trim`), so the training
that follows does not sit on top of it.

What it does not cover returns None with the reason logged, and the caller loads the dense model and
quantizes it (`fedsb.models.quantize.quantize_model`, each dense layer freed as it is replaced): a
checkpoint that is not safetensors, keys that do not map one to one onto the model (renamed or prefixed
keys, new heads such as a classifier's), modules transformers keeps in fp32, a device map.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from fedsb.models.quantize import KEEP_DENSE, quantize_targets, quantized_linear, replace_module

log = logging.getLogger("fedsb.models")

__all__ = ["checkpoint_files", "load_quantized", "release_heap"]


def checkpoint_files(directory: Path) -> list[Path] | None:
    """The safetensors files of a checkpoint directory (one file, or the shards its index names), or
    None if it has none (or an index naming a missing shard)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [directory / n for n in names]
        return files if files and all(f.is_file() for f in files) else None
    single = directory / "model.safetensors"
    return [single] if single.is_file() else None


def _key_files(files: list[Path]) -> dict[str, Path]:
    """checkpoint key -> the file holding it."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            out.update(dict.fromkeys(handle.keys(), f))
    return out


def _read(files: dict[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` (CPU, their stored dtype), each file opened only for this read."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in dict.fromkeys(files[k] for k in keys):
        with safe_open(str(f), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in keys if files[k] == f})
    return out


def _skeleton(model_cls: type, config: object, dtype: torch.dtype) -> nn.Module:
    """`model_cls` built from `config` in `dtype` with every parameter on the meta device (no memory)
    and its buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return model_cls._from_config(config, dtype=dtype)


def _mismatch(model: nn.Module, keys: set[str]) -> str:
    """Why the checkpoint's `keys` do not map one to one onto the model's state ('' if they do)."""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    expected = set(model.state_dict())
    missing = sorted(expected - keys - tied)
    unexpected = sorted(keys - expected)
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    return ""


def _materialize(module: nn.Module, path: str, files: dict[str, Path]) -> None:
    """Read `module`'s own parameters and buffers (not its children's) from the checkpoint, floating
    tensors cast to the dtype the skeleton gave them (`from_pretrained`'s cast); tied ones are skipped."""
    prefix = f"{path}." if path else ""
    params = {n: p for n, p in module.named_parameters(recurse=False) if prefix + n in files}
    buffers = {n: b for n, b in module.named_buffers(recurse=False) if prefix + n in files}
    tensors = _read(files, [prefix + n for n in (*params, *buffers)])
    for name, p in params.items():
        t = tensors.pop(prefix + name)
        value = t.to(p.dtype) if t.is_floating_point() else t
        module._parameters[name] = nn.Parameter(value, requires_grad=p.requires_grad)
    for name, b in buffers.items():
        t = tensors.pop(prefix + name)
        module._buffers[name] = t.to(b.dtype) if t.is_floating_point() else t


def load_quantized(
    directory: Path,
    model_cls: type,
    config: object,
    *,
    dtype: torch.dtype,
    mode: str,
    device: torch.device | None = None,
    name_or_path: str | None = None,
    keep_dense: tuple[str, ...] = KEEP_DENSE,
) -> nn.Module | None:
    """`model_cls` (a transformers class, e.g. LlamaForCausalLM) with the weights of the checkpoint in
    `directory`, its linear layers quantized to `mode` (nf4, int8) on `device` as they are read and the
    rest in `dtype` on the CPU, in eval mode, with the checkpoint's generation config; None (reason
    logged) where the checkpoint cannot be streamed (the module docstring)."""
    files = checkpoint_files(directory)
    why = "" if files else "no safetensors file"
    if not why and (
        getattr(model_cls, "_keep_in_fp32_modules", None)
        or getattr(model_cls, "_keep_in_fp32_modules_strict", None)
    ):
        why = f"{model_cls.__name__} keeps modules in fp32"  # fmt: skip
    if why:
        log.info("%s: loading the dense model, then quantizing it (%s)", directory, why)
        return None
    key_files = _key_files(files)
    model = _skeleton(model_cls, config, dtype)
    why = _mismatch(model, set(key_files))
    if why:
        log.info("%s: loading the dense model, then quantizing it (checkpoint keys: %s)", directory, why)
        return None
    targets = set(quantize_targets(model, keep_dense))
    for path in [p for p, _ in model.named_modules()]:  # paths only: no dense module outlives its turn
        module = model.get_submodule(path)
        _materialize(module, path, key_files)
        if path in targets:
            replace_module(model, path, quantized_linear(module, mode, compute_dtype=dtype, device=device))
        del module
    model.tie_weights()
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"{directory}: the streamed load left {left[:3]} unread (a fedsb bug)")
    _finish(model, directory, name_or_path)
    log.info("quantized %d linear layers to %s while reading %s", len(targets), mode, directory)
    return model


def _finish(model: nn.Module, directory: Path, name_or_path: str | None) -> None:
    """What `from_pretrained` does after the weights: eval mode, the name, the generation config."""
    from transformers import GenerationConfig

    model.eval()
    model.config.name_or_path = name_or_path or str(directory)
    if model.can_generate() and (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(directory))


def release_heap() -> None:
    """Give the heap pages freed while loading back to the OS (glibc `malloc_trim(0)`; nothing elsewhere):
    glibc keeps the freed chunks of many mid-sized tensors in its arenas, and resident memory would stay
    at the load's high-water mark."""
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return
    trim(0)
