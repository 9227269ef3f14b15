"""Persistence and export: R-only adapters, lossless standard PEFT LoRA directories, merged models.

PEFT export of dW = s * B R A: lora_B = B R (m, r), lora_A = A (r, n), lora_alpha = s * r so PEFT's scale
alpha / r equals s. RAVAN's h heads export as one LoRA of rank h r: lora_B = [s_1 B_1 H_1 | ... | s_h B_h H_h],
lora_A = [A_1; ...; A_h]. Nothing is approximated: the exported LoRA computes exactly the same update.

On a 4/8-bit base (`model.quantize`) the PEFT adapter is the same standard LoRA: it loads on the same base
quantized by transformers (`BitsAndBytesConfig`, the settings of `fedsb.models.quantize`) and computes the
same logits; the merged export dequantizes W0 and adds the update (a dense checkpoint in the base dtype).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from fedsb.adapters.inject import AdaptedModel
from fedsb.adapters.layer import AdapterLayer, LoraSBLinear
from fedsb.adapters.lora import LoraLinear
from fedsb.adapters.ravan import RavanLinear
from fedsb.errors import CheckpointError
from fedsb.models.quantize import dense_dtype, dequantized_weight, is_quantized

log = logging.getLogger("fedsb.export")

ADAPTER_TENSORS = "adapter.safetensors"
ADAPTER_META = "fedsb_adapter.json"
HEAD_TENSORS = "head.safetensors"
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def min_vllm_lora_rank(rank: int) -> int | None:
    """Smallest vLLM `--max-lora-rank` value that serves rank `rank` (None above 512)."""
    return next((v for v in VLLM_RANKS if v >= rank), None)


def _adapter_layers(adapted: AdaptedModel) -> dict[str, AdapterLayer]:
    layers = {p: m for p, m in adapted.layers.items() if isinstance(m, AdapterLayer)}
    if len(layers) != len(adapted.layers):
        raise TypeError("this export handles fedsb adapter layers only")
    return layers


def has_folds(adapted: AdaptedModel) -> bool:
    """True when updates were folded into W0 (FedEx-LoRA, FLoRA): only a merged export is faithful."""
    return any(getattr(layer, "fold_round", 0) > 0 for layer in adapted.layers.values())


def _peft_factors(layer: AdapterLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_B (m, r), lora_A (r, n)) with lora_B @ lora_A * s = the layer's update."""
    if isinstance(layer, LoraSBLinear):
        return layer.lora_sb_B.float() @ layer.lora_sb_R.weight.float(), layer.lora_sb_A.float()  # B R, A
    if isinstance(layer, LoraLinear):
        return layer.lora_B.weight.float(), layer.lora_A.weight.float()
    if isinstance(layer, RavanLinear):  # one LoRA of rank h r: [s_1 B_1 H_1 | ...], [A_1; ...]
        return layer.peft_factors()
    raise TypeError(f"no PEFT export for {type(layer).__name__}")


# ---- trained-tensor adapter (R-only for Fed-SB) ---------------------------------------------------------


def save_adapter(
    adapted: AdaptedModel,
    directory: str | Path,
    *,
    base_model: str,
    basis_fingerprint: str | None,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the trained tensors (Fed-SB: R per module; LoRA: A and B; plus any head) and their metadata.

    A Fed-SB adapter needs its basis (saved separately, checked by fingerprint) to be used."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    layers = _adapter_layers(adapted)
    state = adapted.get_state()
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / ADAPTER_TENSORS))
    meta = {
        "format": "fedsb-adapter",
        "version": 1,
        "adapter_kind": sorted({layer.adapter_kind for layer in layers.values()}),
        "base_model": base_model,
        "targets": list(layers),
        "ranks": {p: layer.rank for p, layer in layers.items()},
        "scaling": next(iter(layers.values())).scaling if layers else 1.0,
        "basis_fingerprint": basis_fingerprint,
        "tensors": list(state),
        "extra_modules": list(adapted.extra_modules),
        **(dict(extra_meta) if extra_meta else {}),
    }
    (d / ADAPTER_META).write_text(json.dumps(meta, indent=2, default=str))
    return d


def read_adapter_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_META
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a fedsb adapter directory ({ADAPTER_META} missing)")
    return json.loads(path.read_text())


def load_adapter(adapted: AdaptedModel, directory: str | Path, *, basis_fingerprint: str) -> dict[str, Any]:
    """Load R (and head) into `adapted`, refusing an adapter trained on another basis."""
    d = Path(directory)
    meta = read_adapter_meta(d)
    if meta["basis_fingerprint"] != basis_fingerprint:
        raise CheckpointError(
            f"adapter in {d} was trained on basis {meta['basis_fingerprint'][:12]}, but the model's basis is "
            f"{basis_fingerprint[:12]}; load the basis the adapter was trained with"
        )
    if not (d / ADAPTER_TENSORS).is_file():
        raise CheckpointError(f"{d / ADAPTER_TENSORS} is missing")
    adapted.set_state(load_file(str(d / ADAPTER_TENSORS)))
    return meta


# ---- PEFT LoRA export ---------------------------------------------------------------------------------


def _peft_task_type(model: torch.nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    return None


@torch.no_grad()
def export_peft(
    adapted: AdaptedModel,
    directory: str | Path,
    *,
    base_model: str,
    include_head: bool | None = None,
) -> dict[str, Any]:
    """Write a standard PEFT LoRA directory that `peft.PeftModel.from_pretrained` loads losslessly.

    `lora_B.weight = B R` (m, r), `lora_A.weight = A` (r, n), `lora_alpha = s * r` (per-module ranks go to
    rank_pattern/alpha_pattern). Trained heads are written to head.safetensors; they are put into the PEFT
    file as `modules_to_save` only for sequence classification (or include_head=True), because vLLM rejects
    such weights. Returns a summary including the minimal vLLM `max_lora_rank`.
    """
    d = Path(directory)
    layers = _adapter_layers(adapted)
    if not layers:
        raise ValueError("the model has no adapter layers to export")
    if has_folds(adapted):
        raise ValueError(
            "updates were folded into W0 (FedEx-LoRA / FLoRA); a LoRA adapter cannot hold them: export merged"
        )
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for path, layer in layers.items():
        lora_B, lora_A = _peft_factors(layer)
        tensors[f"base_model.model.{path}.lora_B.weight"] = lora_B.contiguous()  # (m, r)
        tensors[f"base_model.model.{path}.lora_A.weight"] = lora_A.contiguous()  # (r, n)
        ranks[path] = layer.rank
    scaling = next(iter(layers.values())).scaling
    if any(layer.scaling != scaling for layer in layers.values()):
        raise ValueError("all adapter layers must share one scaling to export a PEFT adapter")
    task_type = _peft_task_type(adapted.model)
    if include_head is None:
        include_head = task_type == "SEQ_CLS"
    modules_to_save: list[str] = []
    head_tensors = {}
    for path, module in adapted.extra_modules.items():
        for name, p in module.named_parameters():
            head_tensors[f"{path}.{name}"] = p.detach().float().contiguous()
            if include_head:
                tensors[f"base_model.model.{path}.{name}"] = p.detach().contiguous()
        if include_head:
            modules_to_save.append(path)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    if head_tensors:
        save_file(head_tensors, str(d / HEAD_TENSORS))
    r_max = max(ranks.values())
    rank_pattern = {p: r for p, r in ranks.items() if r != r_max}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r_max,
        "lora_alpha": scaling * r_max,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {p: scaling * r for p, r in rank_pattern.items()},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": any(isinstance(layer.base_layer, Conv1D) for layer in layers.values()),
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
    }
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
    summary = {
        "directory": str(d),
        "rank": r_max,
        "max_lora_rank": min_vllm_lora_rank(r_max),
        "modules": len(ranks),
        "head_in_adapter": bool(modules_to_save),
        "head_file": HEAD_TENSORS if head_tensors else None,
    }
    (d / "fedsb_export.json").write_text(json.dumps(summary, indent=2))
    if summary["max_lora_rank"] is None:
        log.warning(
            "rank %d exceeds vLLM's largest max_lora_rank (512); vLLM cannot serve this adapter", r_max
        )
    else:
        log.info(
            "PEFT adapter written to %s; serve with vLLM --enable-lora --max-lora-rank %d",
            d,
            summary["max_lora_rank"],
        )
    return summary


# ---- merged model ---------------------------------------------------------------------------------------


@torch.no_grad()
def dense_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` with every 4/8-bit layer's weight dequantized to the dtype it was quantized
    from (its quantization statistics dropped): the state dict of the same model with a dense base."""
    quantized = {path: m for path, m in model.named_modules() if is_quantized(m)}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((p for p in quantized if key.startswith(p + ".")), None)
        if owner is None:
            out[key] = value
        elif key == f"{owner}.weight":
            out[key] = dequantized_weight(quantized[owner]).to(dense_dtype(quantized[owner]))  # (m, n)
        elif key == f"{owner}.bias":
            out[key] = value
    if quantized:
        log.info("merged export: %d quantized layers dequantized", len(quantized))
    return out


@torch.no_grad()
def merged_state_dict(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    """The base model's state dict with W0 + s B R A in place of every adapted weight (no wrappers); a
    4/8-bit base is dequantized first (`dense_state_dict`): the merged model is a dense checkpoint whose
    W0 is deq(W0), the weights the run trained on, not the full-precision checkpoint it was quantized from."""
    layers = _adapter_layers(adapted)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("unmerge the model before exporting it merged")
    out: dict[str, torch.Tensor] = {}
    for key, value in dense_state_dict(adapted.model).items():
        path, _, leaf = key.rpartition(".")
        owner, _, sub = path.rpartition(".")
        if sub == "base_layer" and owner in layers:
            layer = layers[owner]
            if leaf == "weight":
                delta = layer.delta_weight()  # (m, n)
                if isinstance(layer.base_layer, Conv1D):
                    delta = delta.T  # Conv1D stores (n, m)
                value = (value.float() + delta).to(value.dtype)
            out[f"{owner}.{leaf}"] = value
        elif path in layers or owner in layers:
            continue  # the adapter's own tensors (lora_sb_*, lora_A/lora_B)
        else:
            out[key] = value
    return out


def export_merged(adapted: AdaptedModel, directory: str | Path, *, tokenizer: Any | None = None) -> Path:
    """Save a plain HF checkpoint of W0 + s B R A (loads with `from_pretrained`, no fedsb needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = merged_state_dict(adapted)
    adapted.model.save_pretrained(str(d), state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    return d
