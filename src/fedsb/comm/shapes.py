"""Shape facts of a model for `fedsb comm`: its adaptable linear layers (name, m = out, n = in), no weights.

A model is a shape-facts file shipped in ``fedsb/shapes/*.json`` (offline), or a local directory / hub id
whose ``config.json`` is read with ``transformers.AutoConfig`` (Llama-family and BERT-family configs; a hub
id listed as ``hf_id`` in a shipped file uses that file). Targets are matched as `fedsb run` matches them
(`fedsb.adapters.targets`). No torch; transformers only to read a config that is not shipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from fedsb.adapters.targets import BERT_TARGETS, LLAMA_TARGETS, matches
from fedsb.errors import FedsbError

__all__ = [
    "BERT_TARGETS",
    "LLAMA_TARGETS",
]  # the defaults for a config read from disk/hub: `fedsb run`'s 'auto'

#: (full module name, m = out_features, n = in_features)
Shape = tuple[str, int, int]

#: model_type values whose config we turn into shapes (q/k/v/o + gate/up/down, or BERT's six linears).
LLAMA_FAMILY: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
BERT_FAMILY: tuple[str, ...] = ("bert", "roberta", "xlm-roberta", "electra")


@dataclass(frozen=True)
class ShapeFacts:
    """What the calculator needs to know about a model: linear shapes per layer, no weights."""

    name: str
    layer_prefix: str
    per_layer: tuple[tuple[tuple[str, int, int], ...], ...]  # layer i: ((relative name, m, n), ...)
    default_targets: tuple[str, ...]
    head_params: int
    unit: str  # "M" or "K": the paper's display unit for this kind of model
    source: str
    head_shapes: tuple[tuple[int, ...], ...] = ()  # the head's tensors (weights (out, in), biases (out,))

    @property
    def num_layers(self) -> int:
        return len(self.per_layer)

    def all_modules(self) -> list[Shape]:
        return [
            (f"{self.layer_prefix}.{i}.{rel}", m, n)
            for i, modules in enumerate(self.per_layer)
            for rel, m, n in modules
        ]


def _shapes_dir() -> Any:
    return resources.files("fedsb") / "shapes"


def shipped_models() -> list[str]:
    """Names of the shape-facts files shipped with the package (usable offline)."""
    return sorted(p.name[: -len(".json")] for p in _shapes_dir().iterdir() if p.name.endswith(".json"))


@cache
def _load_shipped(name: str) -> ShapeFacts:
    data = json.loads((_shapes_dir() / f"{name}.json").read_text(encoding="utf-8"))
    return ShapeFacts(
        name=data["name"],
        layer_prefix=data["layer_prefix"],
        per_layer=(tuple((rel, int(mn[0]), int(mn[1])) for rel, mn in data["modules"].items()),)
        * int(data["num_layers"]),
        default_targets=tuple(data["default_targets"]),
        head_params=int(data["head_params"]),
        unit=data["unit"],
        source=data["source"],
        head_shapes=tuple(tuple(int(d) for d in shape) for shape in data.get("head_shapes", [])),
    )


@cache
def _shipped_hf_ids() -> dict[str, str]:
    out = {}
    for name in shipped_models():
        data = json.loads((_shapes_dir() / f"{name}.json").read_text(encoding="utf-8"))
        if data.get("hf_id"):
            out[data["hf_id"].lower()] = name
    return out


def _llama_layer(cfg: Any) -> tuple[tuple[str, int, int], ...]:
    h, ff, heads = int(cfg.hidden_size), int(cfg.intermediate_size), int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    return (
        ("self_attn.q_proj", q, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.v_proj", kv, h),
        ("self_attn.o_proj", h, q),
        ("mlp.gate_proj", ff, h),
        ("mlp.up_proj", ff, h),
        ("mlp.down_proj", h, ff),
    )


def _bert_layer(cfg: Any) -> tuple[tuple[str, int, int], ...]:
    h, ff = int(cfg.hidden_size), int(cfg.intermediate_size)
    return (
        ("attention.self.query", h, h),
        ("attention.self.key", h, h),
        ("attention.self.value", h, h),
        ("attention.output.dense", h, h),
        ("intermediate.dense", ff, h),
        ("output.dense", h, ff),
    )


def facts_from_config(config: Any, name: str = "config") -> ShapeFacts:
    """Shape facts from a `transformers` config object (Llama or BERT family); no weights involved.

    Heterogeneous configs (transformers' ``per_layer_config``) are read layer by layer. A
    ``*ForSequenceClassification`` architecture counts its classifier as the head (BERT: h·labels + labels;
    RoBERTa/ELECTRA: dense h·h + h, then h·labels + labels; Llama-family ``score``: h·labels).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    if model_type in LLAMA_FAMILY:
        layer_fn, prefix, targets, unit = _llama_layer, "model.layers", LLAMA_TARGETS, "M"
    elif model_type in BERT_FAMILY:
        layer_fn, prefix, targets, unit = _bert_layer, "encoder.layer", BERT_TARGETS, "K"
    else:
        raise FedsbError(
            field="model",
            value=name,
            what=f"has model_type {model_type!r}, whose layer shapes comm cannot derive",
            fix=f"use a shipped shape ({', '.join(shipped_models())}) or a config of model_type "
            f"{', '.join(LLAMA_FAMILY + BERT_FAMILY)}",
        )
    try:
        layers = int(text.num_hidden_layers)
        if getattr(text, "is_heterogeneous", False):
            layer_cfgs = [text.per_layer_config[i] for i in range(layers)]
            skipped = [i for i, c in enumerate(layer_cfgs) if getattr(c, "skip", None)]
            if skipped:
                raise FedsbError(
                    field="model",
                    value=name,
                    what=f"skips sub-modules in layer(s) {skipped}, which comm does not model",
                    fix="use a config without per-layer 'skip', or pass the shapes to the method functions",
                )
            per_layer = tuple(layer_fn(c) for c in layer_cfgs)
        else:
            per_layer = (layer_fn(text),) * layers
        h = int(text.hidden_size)
    except (AttributeError, TypeError, ValueError) as exc:
        raise FedsbError(
            field="model",
            value=name,
            what=f"has a {model_type} config comm cannot read ({exc})",
            fix="check its config.json (hidden_size, intermediate_size, num_hidden_layers, heads)",
        ) from None
    head_shapes: tuple[tuple[int, ...], ...] = ()
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        labels = int(getattr(config, "num_labels", 2) or 2)
        if model_type in LLAMA_FAMILY:
            head_shapes = ((labels, h),)  # `score`, no bias
        elif model_type == "bert":
            head_shapes = ((labels, h), (labels,))  # classifier
        else:  # classifier.dense, then classifier.out_proj
            head_shapes = ((h, h), (h,), (labels, h), (labels,))
    head = sum(math.prod(shape) for shape in head_shapes)
    return ShapeFacts(
        name=name,
        layer_prefix=prefix,
        per_layer=per_layer,
        default_targets=targets,
        head_params=head,
        unit=unit,
        source=f"config.json ({model_type})",
        head_shapes=head_shapes,
    )


def resolve_model(model: str) -> ShapeFacts:
    """Shape facts for a shipped name (or its hub id), else a local directory / hub id's config.json.

    A shipped name wins over a directory of the same name (write ``./bert-base`` for the directory).
    """
    if not isinstance(model, str) or not model.strip():
        raise FedsbError(
            field="model", value=model, fix=f"name a model, e.g. one of {', '.join(shipped_models())}"
        )
    key = model.strip()
    if key.lower() in shipped_models() and not key.startswith((".", "/", "~")):
        return _load_shipped(key.lower())
    if key.lower() in _shipped_hf_ids():
        return _load_shipped(_shipped_hf_ids()[key.lower()])
    path = Path(key).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise FedsbError(
            field="model",
            value=model,
            what="is a path without a config.json",
            fix="point at a model directory",
        )
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path) if path.exists() else key)
    except Exception as exc:  # OSError (not found / offline), ValueError (unknown model_type), ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise FedsbError(
            field="model",
            value=model,
            what=f"is neither a shipped shape nor a readable config ({first})",
            fix=f"use one of the shipped shapes ({', '.join(shipped_models())}), a local directory with a "
            "config.json, or a hub id (needs hub access or the HF cache)",
        ) from None
    return facts_from_config(config, name=model)


def select_modules(facts: ShapeFacts, targets: Sequence[str] | None = None) -> list[Shape]:
    """The adapted modules: every module whose full name equals a target or ends with ``.<target>`` (PEFT)."""
    if targets is None:
        targets = facts.default_targets
    if isinstance(targets, str) or not targets:
        raise FedsbError(
            field="targets", value=targets, fix="give a non-empty list of names, e.g. q_proj v_proj"
        )
    leaves = ", ".join(dict.fromkeys(rel.rsplit(".", 1)[-1] for rel, _, _ in facts.per_layer[0]))
    for spec in targets:
        if not isinstance(spec, str) or not spec or spec.startswith("re:"):
            raise FedsbError(
                field="targets", value=spec, fix=f"use plain module names (no regular expressions): {leaves}"
            )
    everything = facts.all_modules()
    chosen = [s for s in everything if any(matches(s[0], t) for t in targets)]
    for spec in targets:
        if not any(matches(s[0], spec) for s in everything):
            raise FedsbError(
                field="targets",
                value=spec,
                what=f"matches no adaptable module of {facts.name}",
                fix=f"use names of its linear layers: {leaves}",
            )
    return chosen


def module_shapes(model: str, targets: list[str] | None = None) -> tuple[list[Shape], int]:
    """(name, m, n) for every adapted module of `model`, and the extra (head) parameters trained with them.

    `model`: a shipped shape name (see `shipped_models`), its hub id, a local directory with a config.json,
    or a hub id (read with `transformers.AutoConfig`; no weights). `targets`: PEFT-style names; None = the
    model's defaults (the paper's for shipped models, `fedsb run`'s 'auto' for configs).
    """
    facts = resolve_model(model)
    return select_modules(facts, targets), facts.head_params
