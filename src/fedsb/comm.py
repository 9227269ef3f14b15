"""Communication per round for Fed-SB and the baselines: the paper's "# Comm." and real bytes both ways.

Shapes only, never weights: a model is a shape-facts file shipped in ``fedsb/shapes/*.json`` (offline), or a
local directory / hub id whose ``config.json`` is read with ``transformers.AutoConfig`` (Llama-family and
BERT-family configs). A hub id listed as ``hf_id`` in a shipped file uses that file (offline).

Counts are **per client, per round** and summed over the adapted modules (m = out, n = in features, r capped
at min(m, n) per module; method.md 6.2):

============  ===========  ===========================================  =============================
method        upload       download (real)                              paper "# Comm." (one way)
============  ===========  ===========================================  =============================
fedit         r(m+n)       r(m+n)                                       r(m+n)
ffa           r·m          r·m                                          ½·r(m+n) (the tables' rule)
fedex         r(m+n)       min(c·r(m+n) "factors", r(m+n)+m·n "dense")  c·r(m+n)
flora         r(m+n)       c·r(m+n)                                     c·r(m+n)
fedsb         r²           r²                                           r²
ravan         h·r²         h·r²                                         h·r² (not in the paper)
fedsvd        r·m          r(m+n)                                       r(m+n) (not in the paper)
============  ===========  ===========================================  =============================

- A trained head (BERT's SNLI classifier, 768·3 + 3 = 2,307) is added **once to every message** in every
  method, as the paper does (FedEx/FLoRA: c·adapters + head once, i.e. 3541.25K for BERT at c = 3).
- Fed-SB also costs a one-time download of its frozen basis, r(m+n) per module, reported as ``basis``
  and never folded into the per-round figures (the tables leave it out); RAVAN's h heads of rank r cost
  h·r(m+n) once. FedSVD's A changes every round, so it travels with B in every download. FFA's frozen A comes from a shared
  seed and costs nothing; FedEx's download picks the cheaper encoding per module and reports which one
  (``factors``, ``dense`` or ``mixed``).
- Bytes = parameters × bytes per element of the wire dtype (float32 4, bfloat16/float16 2; int8 1 plus a
  4-byte scale per tensor, for fedsb, ravan, fedit and ffa only, the basis still float32); 1 MB = 10⁶ B.

Rounding convention (the tables' last digits are inconsistent, method.md 6.3): we keep **exact integer
counts** and display them in the table's unit (M = 10⁶ for decoders, K = 10³ for encoders) **rounded half-up
to two decimals** -- one rule, no per-cell fudging. No single rounding rule reproduces every cell (e.g.
Mistral FedIT 83.886M is printed 83.88 but Llama Fed-SB 2.8224M is printed 2.83 and 7.840M 7.85), and the
c = 25 FedEx/FLoRA cells carry an unexplained ≈ +0.2M that we do not add. Against all 24 cells of the
paper's four tables:

======================  ===============  ==================  ==============  ================
cell                    exact            ours (displayed)    paper           exact vs paper
======================  ===============  ==================  ==============  ================
Llama FedEx/FLoRA c=5   243,138,560      243.14M             243.15M         -0.004 %
Llama Fed-SB r=120      2,822,400        2.82M               2.83M           -0.27 % (largest)
Llama Fed-SB r=200      7,840,000        7.84M               7.85M           -0.13 %
Mistral-7B FedIT r=32   83,886,080       83.89M              83.88M          +0.007 %
Mistral FedEx/FLoRA     2,097,152,000    2097.15M            2097.34M        -0.009 %
Mistral Fed-SB r=120    3,225,600        3.23M               3.22M           +0.17 %
Gemma-2 FedEx/FLoRA     2,700,902,400    2700.90M            2701.12M        -0.008 %
BERT FedEx/FLoRA c=3    3,541,251        3541.25K            3541.26K        -0.0003 %
BERT Fed-SB r=48        57,603           57.60K              57.59K          +0.02 %
======================  ===============  ==================  ==============  ================

The other 15 cells match to the printed digit. Largest deviation of the exact count: 0.27 % (Llama Fed-SB
r = 120); of the displayed figure: 0.35 % (2.82 vs 2.83). ``tests/test_comm.py`` checks every cell at 0.5 %.

This module does not import torch (``fedsb comm`` stays fast); transformers is imported only to read a
config that is not shipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from fedsb.errors import FedsbError

#: (full module name, m = out_features, n = in_features)
Shape = tuple[str, int, int]

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}

#: int8 (fed.wire_dtype=int8, fed.wire_scale=tensor): tensors per adapted module in a message, each with one
#: fp32 scale (RAVAN: one per head); a trained head adds two (weight, bias). The basis stays float32.
INT8_TENSORS_PER_MODULE: dict[str, int] = {"fedsb": 1, "ffa": 1, "fedit": 2, "ravan": 1}


def int8_scale_bytes(method: str, modules: int, head_params: int, heads: int = 4) -> int:
    """Bytes of the fp32 per-tensor scales in one int8 message (refused for methods int8 cannot carry)."""
    if method not in INT8_TENSORS_PER_MODULE:
        raise FedsbError(
            field="dtype",
            value="int8",
            what=f"does not apply to {method}: int8 sends changes of a global state that is the mean of the uploads",
            fix=f"use int8 with {', '.join(INT8_TENSORS_PER_MODULE)}, or a float dtype",
        )
    per_module = INT8_TENSORS_PER_MODULE[method] * (heads if method == "ravan" else 1)
    return 4 * (modules * per_module + (2 if head_params else 0))


#: Method key -> display name, in the paper's table order.
METHOD_NAMES: dict[str, str] = {
    "fedit": "FedIT",
    "ffa": "FFA-LoRA",
    "fedex": "FedEx-LoRA",
    "flora": "FLoRA",
    "fedsb": "Fed-SB",
    "ravan": "RAVAN",
    "fedsvd": "FedSVD",
}

#: model_type values whose config we turn into shapes (q/k/v/o + gate/up/down, or BERT's six linears).
LLAMA_FAMILY: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
BERT_FAMILY: tuple[str, ...] = ("bert", "roberta", "xlm-roberta", "electra")

#: Default targets for a config read from disk/hub: the same as `fedsb run`'s 'auto' (adapters.inject).
LLAMA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS: tuple[str, ...] = ("query", "key", "value", "dense")

_UNITS: dict[str, int] = {"M": 10**6, "K": 10**3}


# ----------------------------------------------------------------------------------------------- shapes


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
    head = 0
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        labels = int(getattr(config, "num_labels", 2) or 2)
        if model_type in LLAMA_FAMILY:
            head = h * labels  # `score`, no bias
        else:
            head = h * labels + labels + (h * h + h if model_type != "bert" else 0)
    return ShapeFacts(
        name=name,
        layer_prefix=prefix,
        per_layer=per_layer,
        default_targets=targets,
        head_params=head,
        unit=unit,
        source=f"config.json ({model_type})",
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


def _matches(path: str, spec: str) -> bool:
    return path == spec or path.endswith("." + spec)


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
    chosen = [s for s in everything if any(_matches(s[0], t) for t in targets)]
    for spec in targets:
        if not any(_matches(s[0], spec) for s in everything):
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


# ------------------------------------------------------------------------------------- per-method counts


@dataclass(frozen=True)
class MethodComm:
    """Parameters per client per round for one method at one rank (bytes: multiply by the dtype size)."""

    method: str
    rank: int
    clients: int
    upload: int  # client -> server, adapters + head
    download: int  # server -> client, adapters + head
    paper: int | float  # the paper's "# Comm." (one way; c x download for FedEx/FLoRA)
    basis: int  # one-time download of a frozen basis (Fed-SB's B and A); 0 for the others
    head: int  # head parameters included once in each of upload, download and paper
    download_encoding: str | None  # FedEx only: "factors", "dense" or "mixed (k of N modules dense)"
    capped: tuple[tuple[str, int], ...]  # modules whose rank was capped at min(m, n): (name, rank used)


def _positive_int(field: str, value: object, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FedsbError(field=field, value=value, fix=fix)
    return value


def _check(
    shapes: Sequence[Shape], rank: int, clients: int, head_params: int
) -> list[tuple[str, int, int, int]]:
    _positive_int("rank", rank, "use a positive integer such as 32")
    _positive_int("clients", clients, "use a positive integer (clients per round), e.g. 5")
    if isinstance(head_params, bool) or not isinstance(head_params, int) or head_params < 0:
        raise FedsbError(
            field="head_params", value=head_params, fix="use an integer >= 0 (0 = no trained head)"
        )
    if not shapes:
        raise FedsbError(field="targets", value=list(shapes), fix="adapt at least one module")
    out = []
    for name, m, n in shapes:
        _positive_int(f"shape of {name}", m, "use positive out/in features")
        _positive_int(f"shape of {name}", n, "use positive out/in features")
        out.append((name, m, n, min(rank, m, n)))
    return out


def _capped(rows: Sequence[tuple[str, int, int, int]], rank: int) -> tuple[tuple[str, int], ...]:
    return tuple((name, r) for name, _, _, r in rows if r < rank)


def _lora(rows: Sequence[tuple[str, int, int, int]]) -> int:
    return sum(r * (m + n) for _, m, n, r in rows)


def fedit(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FedIT: A and B both ways, r(m+n) per module; the paper's figure is the same."""
    rows = _check(shapes, rank, clients, head_params)
    one = _lora(rows) + head_params
    return MethodComm("fedit", rank, clients, one, one, one, 0, head_params, None, _capped(rows, rank))


def ffa(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FFA-LoRA: only B (m x r) travels; the paper's figure is exactly half of FedIT's adapters (+ head)."""
    rows = _check(shapes, rank, clients, head_params)
    real = sum(r * m for _, m, _, r in rows) + head_params
    full = _lora(rows)
    paper = (full // 2 if full % 2 == 0 else full / 2) + head_params
    return MethodComm("ffa", rank, clients, real, real, paper, 0, head_params, None, _capped(rows, rank))


def fedex(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FedEx-LoRA: upload r(m+n); download the cheaper of all c clients' factors c·r(m+n) or the means plus
    the dense residual r(m+n) + m·n, per module (ties -> factors); the paper's figure is c·r(m+n)."""
    rows = _check(shapes, rank, clients, head_params)
    down, dense = 0, 0
    for _, m, n, r in rows:
        factors, residual = clients * r * (m + n), r * (m + n) + m * n
        if residual < factors:
            down, dense = down + residual, dense + 1
        else:
            down += factors
    encoding = (
        "factors"
        if dense == 0
        else "dense"
        if dense == len(rows)
        else f"mixed ({dense} of {len(rows)} dense)"
    )
    lora = _lora(rows)
    return MethodComm(
        "fedex",
        rank,
        clients,
        lora + head_params,
        down + head_params,
        clients * lora + head_params,
        0,
        head_params,
        encoding,
        _capped(rows, rank),
    )


def flora(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FLoRA: upload r(m+n); every client downloads the stack of all c adapters, c·r(m+n) (= the paper)."""
    rows = _check(shapes, rank, clients, head_params)
    lora = _lora(rows)
    down = clients * lora + head_params
    return MethodComm(
        "flora", rank, clients, lora + head_params, down, down, 0, head_params, None, _capped(rows, rank)
    )


def fedsb(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """Fed-SB: R (r x r) both ways, independent of c, m and n; the basis B, A (r(m+n)) once, separately."""
    rows = _check(shapes, rank, clients, head_params)
    one = sum(r * r for _, _, _, r in rows) + head_params
    return MethodComm(
        "fedsb", rank, clients, one, one, one, _lora(rows), head_params, None, _capped(rows, rank)
    )


def ravan(
    shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0, *, heads: int = 4
) -> MethodComm:
    """RAVAN: h heads of r x r (s_k H_k) both ways, h r^2 per module; its frozen bases h r (m + n) once.

    A module too small for h heads of rank r gets heads of rank min(m, n) // h (as `fedsb run` builds)."""
    rows = _check(shapes, rank, clients, head_params)
    _positive_int("heads", heads, "use a positive number of heads, e.g. 4")
    per_head = [(name, m, n, min(rank, min(m, n) // heads)) for name, m, n, _ in rows]
    for name, m, n, r in per_head:
        if r == 0:
            raise FedsbError(
                field="heads",
                value=heads,
                what=f"exceeds min(m, n) = {min(m, n)} of {name}",
                fix="use fewer heads",
            )
    one = sum(heads * r * r for _, _, _, r in per_head) + head_params
    basis = sum(heads * r * (m + n) for _, m, n, r in per_head)
    return MethodComm(
        "ravan", rank, clients, one, one, one, basis, head_params, None, _capped(per_head, rank)
    )


def fedsvd(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FedSVD: upload B (r m); download the re-factorized A and B, r (m + n), every round. Not in the Fed-SB
    tables: its "# Comm." column shows the download (the larger direction)."""
    rows = _check(shapes, rank, clients, head_params)
    up = sum(r * m for _, m, _, r in rows) + head_params
    down = _lora(rows) + head_params
    return MethodComm("fedsvd", rank, clients, up, down, down, 0, head_params, None, _capped(rows, rank))


METHODS: dict[str, Callable[..., MethodComm]] = {
    "fedit": fedit,
    "ffa": ffa,
    "fedex": fedex,
    "flora": flora,
    "fedsb": fedsb,
    "ravan": ravan,
    "fedsvd": fedsvd,
}

#: Method -> the extra options its function takes (from `comm_table`'s keywords of the same name).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {"ravan": ("heads",)}


# ------------------------------------------------------------------------------------------------ table


def format_count(params: float, unit: str) -> str:
    """`params` in `unit` (M or K), rounded half-up to two decimals: the convention of this module."""
    value = Decimal(params) / _UNITS[unit]
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _method_key(method: object) -> str:
    key = (
        method.lower().replace("-lora", "").replace("-", "").replace("_", "")
        if isinstance(method, str)
        else None
    )
    if key not in METHODS:
        raise FedsbError(field="method", value=method, fix=f"use one of {', '.join(METHODS)}")
    return key


def _capped_summary(capped: Sequence[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, r in capped:
        out.setdefault(name.rsplit(".", 1)[-1], r)
    return out


def comm_table(
    model: str,
    methods: Sequence[str],
    ranks: Sequence[int] | Mapping[str, Sequence[int]],
    clients: int,
    targets: list[str] | None = None,
    dtype: str = "float32",
    *,
    head_params: int | None = None,
    heads: int = 4,
) -> list[dict[str, Any]]:
    """One row per (method, rank): paper "# Comm.", upload/download params and bytes, one-time basis.

    `ranks` applies to every method, or maps a method to its own ranks (e.g. {"fedit": [32], "fedsb": [120]}).
    `head_params` overrides the model's head size (None = the shape facts' value). `heads`: RAVAN's number
    of heads (its rank is per head).
    """
    if dtype not in DTYPE_BYTES:
        raise FedsbError(field="dtype", value=dtype, fix=f"use one of {', '.join(DTYPE_BYTES)}")
    if isinstance(methods, str) or not methods:
        raise FedsbError(
            field="method", value=methods, fix=f"give a list of methods from {', '.join(METHODS)}"
        )
    keys = [_method_key(m) for m in methods]
    per_method: dict[str, Sequence[int]] = {}
    for raw, key in zip(methods, keys, strict=True):
        if isinstance(ranks, Mapping):
            given = ranks.get(raw, ranks.get(key))
            if given is None:
                raise FedsbError(field="rank", value=dict(ranks), fix=f"give ranks for method {raw!r}")
        else:
            given = ranks
        if isinstance(given, int | str) or not given:
            raise FedsbError(
                field="rank", value=given, fix="give a non-empty list of positive integers, e.g. [32]"
            )
        per_method[key] = given
    _positive_int("clients", clients, "use a positive integer (clients per round), e.g. 5")
    facts = resolve_model(model)
    shapes = select_modules(facts, targets)
    head = facts.head_params if head_params is None else head_params
    width = DTYPE_BYTES[dtype]
    rows = []
    for key in keys:
        for rank in per_method[key]:
            options = {k: {"heads": heads}[k] for k in METHOD_OPTIONS.get(key, ())}
            res = METHODS[key](shapes, rank, clients, head, **options)
            scales = int8_scale_bytes(key, len(shapes), res.head, heads) if dtype == "int8" else 0
            rows.append(
                {
                    "model": facts.name,
                    "method": key,
                    "method_name": METHOD_NAMES[key],
                    "rank": rank,
                    "clients": clients,
                    "modules": len(shapes),
                    "head_params": res.head,
                    "paper_comm": res.paper,
                    "paper_unit": facts.unit,
                    "paper_comm_display": format_count(res.paper, facts.unit),
                    "dtype": dtype,
                    "bytes_per_param": width,
                    "upload_params": res.upload,
                    "upload_bytes": res.upload * width + scales,
                    "download_params": res.download,
                    "download_bytes": res.download * width + scales,
                    "download_encoding": res.download_encoding,
                    "basis_params": res.basis,
                    "basis_bytes": res.basis * (4 if dtype == "int8" else width),
                    **options,
                    "capped_modules": len(res.capped),
                    "capped_to": _capped_summary(res.capped),
                }
            )
    return rows


def format_table(rows: Sequence[Mapping[str, Any]], header: str = "") -> str:
    """The aligned text table printed by `fedsb comm`."""
    if not rows:
        return header
    unit = rows[0]["paper_unit"]
    cols = [
        "method",
        "r",
        "c",
        f"# Comm. ({unit})",
        "upload params",
        "upload",
        "download params",
        "download",
        "once: basis params",
        "basis",
    ]
    table = [cols]
    notes: list[str] = []
    for row in rows:
        rank = str(row["rank"])
        if row["capped_modules"]:
            capped = ", ".join(f"{k} -> {v}" for k, v in row["capped_to"].items())
            rank += "*"
            notes.append(
                f"* {row['method_name']} r={row['rank']}: rank capped at min(m, n) on "
                f"{row['capped_modules']} of {row['modules']} modules ({capped})"
            )
        download = format_bytes(row["download_bytes"])
        if row["download_encoding"]:
            download += f" ({row['download_encoding']})"
        basis = row["basis_params"] > 0
        table.append(
            [
                row["method_name"],
                rank,
                str(row["clients"]),
                row["paper_comm_display"],
                f"{row['upload_params']:,}",
                format_bytes(row["upload_bytes"]),
                f"{row['download_params']:,}",
                download,
                f"{row['basis_params']:,}" if basis else "-",
                format_bytes(row["basis_bytes"]) if basis else "-",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    left = {0, 1, 2}
    lines = [header] if header else []
    for line in table:
        cells = [
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.extend(notes)
    return "\n".join(lines)


def describe(model: str, targets: list[str] | None, rows: Sequence[Mapping[str, Any]]) -> str:
    """The header above the table: what was counted and how."""
    facts = resolve_model(model)
    shapes = select_modules(facts, targets)
    leaves = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _, _ in shapes))
    prefix = f"{facts.layer_prefix}."
    layers = len({name[len(prefix) :].split(".", 1)[0] for name, _, _ in shapes if name.startswith(prefix)})
    row = rows[0] if rows else {"head_params": facts.head_params, "dtype": "float32", "bytes_per_param": 4}
    unit = "10^6" if facts.unit == "M" else "10^3"
    head = row["head_params"]
    head_text = f"head {head:,} params, counted once per message" if head else "no trained head"
    return "\n".join(
        [
            f"{facts.name}: {len(shapes)} adapted modules ({layers} layers x {leaves}); {head_text}",
            f"per client per round; params exact; bytes as {row['dtype']} ({row['bytes_per_param']} B/param, "
            "1 MB = 10^6 B)" + (" = fed.wire_dtype's default" if row["dtype"] == "float32" else ""),
            f"# Comm. = the paper's one-way figure in {facts.unit} ({unit} params, rounded half-up); "
            "FedEx/FLoRA: the c x download",
        ]
    )


# -------------------------------------------------------------------------------------------------- CLI

COMM_EPILOG = """\
examples:
  fedsb comm --model llama-3.2-3b --methods fedit ffa fedex flora --rank 32 --clients 5
  fedsb comm --model gemma-2-9b --methods fedit:32 fedex:32 fedsb:120,160,200 --clients 25
  fedsb comm --model bert-base --methods fedsb --rank 32 48 64 --clients 3 --dtype bfloat16 --json
  fedsb comm --model ./my-model-dir --methods fedsb --rank 64 --clients 10 --targets q_proj v_proj
  fedsb comm --model bert-base --methods fedsb:64 ravan:32 fedsvd:8 --heads 4 --clients 5

a METHOD:R1,R2 item gives that method its own ranks; --rank applies to the others.
"""


def add_comm_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the `comm` subcommand to an argparse subparsers object (handler: `cmd_comm`)."""
    from fedsb.argparsing import Renamed

    p = subparsers.add_parser(
        "comm",
        parents=list(parents),
        help="communication per round for Fed-SB and the baselines (no weights, offline for shipped shapes)",
        description="Per-client, per-round communication of Fed-SB, FedIT, FFA-LoRA, FedEx-LoRA, FLoRA, RAVAN "
        "and FedSVD: the paper's '# Comm.' figure, real upload/download parameters and bytes, and the one-time "
        f"frozen bases (Fed-SB, RAVAN). Shipped shapes: {', '.join(shipped_models())}; or a local model directory / hub id "
        "(its config.json only).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=COMM_EPILOG,
    )
    p.add_argument("--model", required=True, help="shipped shape name, model directory or hub id")
    p.add_argument(
        "--methods",
        "--method",
        dest="method",
        action=Renamed,
        deprecated=["--method"],
        nargs="+",
        default=list(METHODS),
        metavar="METHOD[:R,...]",
        help=f"methods ({', '.join(METHODS)}; default all), optionally with their own ranks "
        "(--method: deprecated alias)",
    )
    p.add_argument(
        "--rank", nargs="+", type=int, default=[32], metavar="R", help="ranks for every method [32]"
    )
    p.add_argument("--clients", type=int, required=True, metavar="C", help="clients per round")
    p.add_argument("--targets", nargs="+", metavar="NAME", help="adapted modules (default: the model's)")
    p.add_argument(
        "--dtype",
        default="float32",
        help=f"wire dtype for bytes: {', '.join(DTYPE_BYTES)} [float32, fed.wire_dtype's default in runs]",
    )
    p.add_argument("--head-params", type=int, metavar="N", help="trained head size (default: the model's)")
    p.add_argument("--heads", type=int, default=4, metavar="H", help="RAVAN's heads (rank = per head) [4]")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=cmd_comm)


def _parse_methods(
    specs: Sequence[str], default_ranks: Sequence[int]
) -> tuple[list[str], dict[str, list[int]]]:
    methods: list[str] = []
    ranks: dict[str, list[int]] = {}
    for spec in specs:
        name, _, rank_text = spec.partition(":")
        key = _method_key(name)
        if rank_text:
            try:
                given = [int(r) for r in rank_text.split(",") if r.strip()]
            except ValueError:
                raise FedsbError(
                    field="method", value=spec, fix="write METHOD:R1,R2 with integer ranks"
                ) from None
        else:
            given = list(default_ranks)
        if key not in ranks:
            methods.append(key)
            ranks[key] = []
        ranks[key].extend(r for r in given if r not in ranks[key])
    return methods, ranks


def cmd_comm(args: argparse.Namespace) -> int:
    """Run `fedsb comm`: print the table (or JSON); a user error prints `fedsb: error: ...` and returns 2."""
    try:
        methods, ranks = _parse_methods(args.method, args.rank)
        rows = comm_table(
            args.model,
            methods,
            ranks,
            args.clients,
            targets=args.targets,
            dtype=args.dtype,
            head_params=args.head_params,
            heads=args.heads,
        )
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(format_table(rows, describe(args.model, args.targets, rows)))
    except FedsbError as exc:
        print(f"fedsb: error: {exc}", file=sys.stderr)
        return 2
    return 0
