"""Find target layers in any HF model, wrap them with adapter layers, and name the trainable state.

Target specs: a plain name matches a module whose dotted path equals it or ends with ``.<name>`` (PEFT's
rule); ``re:<pattern>`` matches by `re.fullmatch` on the whole path. The trainable, communicated state is
listed explicitly from the adapter layers and the extra modules -- never by a substring of a key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fedsb.adapters.layer import SUPPORTED_BASE_LAYERS, LoraSBLinear, linear_dims
from fedsb.adapters.targets import (  # noqa: F401 (re-exported: the defaults live in targets)
    BERT_TARGETS,
    DEFAULT_EXCLUDE,
    DEFAULT_TARGETS,
    GPT2_TARGETS,
    HEAD_NAMES,
    LLAMA_TARGETS,
    excluded,
    matches,
)
from fedsb.errors import FedsbError

log = logging.getLogger("fedsb.adapters")


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The default target names for the model's architecture family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise FedsbError(
            field="target_modules",
            value="auto",
            what=f"has no default for model_type {model_type!r}",
            fix="name the layers to adapt, e.g. target_modules=[q_proj, v_proj] "
            f"(defaults exist for: {', '.join(sorted(DEFAULT_TARGETS))})",
        )
    return DEFAULT_TARGETS[model_type]


def find_target_modules(
    model: nn.Module, targets: Sequence[str], *, exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> dict[str, nn.Module]:
    """Module path -> layer for every supported layer matched by `targets` and not excluded.

    Raises a `FedsbError` for an empty target list, a target that matches nothing, or a target that matches
    only layers of an unsupported type.
    """
    if isinstance(targets, str) or not targets:
        raise FedsbError(field="target_modules", value=targets, fix="give a non-empty list of layer names")
    for spec in targets:
        if not isinstance(spec, str) or not spec:
            raise FedsbError(field="target_modules", value=spec, fix="each target must be a non-empty string")
        if spec.startswith("re:"):
            try:
                re.compile(spec[3:])
            except re.error as exc:
                raise FedsbError(
                    field="target_modules", value=spec, fix=f"fix the regular expression ({exc})"
                ) from None
    found: dict[str, nn.Module] = {}
    hits: dict[str, int] = dict.fromkeys(targets, 0)
    unsupported: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path or excluded(path, exclude):
            continue
        for spec in targets:
            if matches(path, spec):
                if isinstance(module, SUPPORTED_BASE_LAYERS):
                    found[path] = module
                    hits[spec] += 1
                else:
                    unsupported.setdefault(spec, type(module).__name__)
    missing = [t for t, n in hits.items() if n == 0]
    if missing:
        leaf_names = sorted(
            {p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, SUPPORTED_BASE_LAYERS)}
        )
        spec = missing[0]
        why = (
            f" (it matches a {unsupported[spec]}, which is not a linear layer)" if spec in unsupported else ""
        )
        raise FedsbError(
            field="target_modules",
            value=spec,
            what=f"matches no adaptable layer{why}",
            fix=f"use names of linear layers in this model: {', '.join(leaf_names)}",
        )
    return found


def resolve_targets(
    model: nn.Module, targets: Sequence[str] | str, exclude: Sequence[str] = DEFAULT_EXCLUDE
) -> dict[str, nn.Module]:
    """Module path -> base layer for `targets` ('auto' = the architecture family's defaults)."""
    specs = default_targets(model) if targets == "auto" else targets
    return find_target_modules(model, specs, exclude=exclude)


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def resolve_ranks(
    modules: Mapping[str, nn.Module], rank: int, *, rank_overflow: str = "cap"
) -> dict[str, int]:
    """Rank per module: `rank`, capped at min(m, n) with a warning (or an error with rank_overflow='error')."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise FedsbError(field="rank", value=rank, fix="use a positive integer such as 32")
    if rank_overflow not in ("cap", "error"):
        raise FedsbError(field="rank_overflow", value=rank_overflow, fix="use 'cap' or 'error'")
    ranks: dict[str, int] = {}
    capped: dict[str, int] = {}
    for path, module in modules.items():
        m, n = linear_dims(module)
        limit = min(m, n)
        if rank > limit:
            if rank_overflow == "error":
                raise FedsbError(
                    field="rank",
                    value=rank,
                    what=f"is larger than layer {path} ({m} x {n}) allows",
                    fix=f"use rank <= {limit}, or rank_overflow='cap' to cap it per layer",
                )
            capped[path] = limit
        ranks[path] = min(rank, limit)
    if capped:
        log.warning(
            "rank %d exceeds min(out, in) of %d layer(s); capped per layer (e.g. %s -> %d)",
            rank,
            len(capped),
            next(iter(capped)),
            next(iter(capped.values())),
        )
    return ranks


def find_extra_modules(model: nn.Module, extra: Sequence[str] | str) -> dict[str, nn.Module]:
    """Extra trainable modules (e.g. a classification head) by name; 'auto' finds a task head if any."""
    if extra == "auto":
        if not type(model).__name__.endswith("ForSequenceClassification"):
            return {}
        names = [n for n in HEAD_NAMES if _has_module(model, n)]
        if not names:
            log.warning("no classification head named %s found; the head stays frozen", HEAD_NAMES)
        return {n: model.get_submodule(n) for n in names[:1]}
    if isinstance(extra, str):
        raise FedsbError(field="extra_trainable", value=extra, fix="use 'auto' or a list of module names")
    out: dict[str, nn.Module] = {}
    for spec in extra:
        matched = {p: m for p, m in model.named_modules() if p and matches(p, spec)}
        if not matched:
            raise FedsbError(
                field="extra_trainable",
                value=spec,
                what="matches no module",
                fix="name a module of the model, e.g. 'classifier' or 'score'",
            )
        # keep the outermost matches only (a head's own children are covered by the head)
        for p, m in matched.items():
            if not any(p.startswith(q + ".") for q in matched):
                out[p] = m
    return out


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


LayerFactory = Callable[[str, nn.Module, int], nn.Module]


@dataclass
class AdaptedModel:
    """A model with adapter layers injected, plus the explicit list of what trains.

    `layers` maps module paths to adapter layers; `extra_modules` maps module paths to other trained modules
    (a classification head). Trainable tensor names are the model's own `named_parameters()` keys, e.g.
    ``model.layers.0.self_attn.q_proj.lora_sb_R.weight`` and ``classifier.weight``.
    """

    model: nn.Module
    layers: dict[str, nn.Module]
    extra_modules: dict[str, nn.Module] = field(default_factory=dict)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for every trained tensor, in a stable order (layers, then extra modules)."""
        params: dict[str, nn.Parameter] = {}
        for path, layer in self.layers.items():
            for suffix in layer.trainable_names:
                params[f"{path}.{suffix}"] = layer.get_parameter(suffix)
        seen = {id(p) for p in params.values()}
        for path, module in self.extra_modules.items():
            for suffix, p in module.named_parameters():
                if id(p) not in seen:  # tied weights (embeddings = LM head) count once
                    params[f"{path}.{suffix}"] = p
                    seen.add(id(p))
        return params

    def trainable_names(self) -> list[str]:
        return list(self.trainable_parameters())

    def get_state(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Detached fp32 CPU copies of the named trainable tensors (all of them by default): the state that
        is communicated, aggregated and checkpointed lives on the CPU whatever the model's device."""
        params = self.trainable_parameters()
        keys = list(params) if names is None else list(names)
        unknown = [k for k in keys if k not in params]
        if unknown:
            raise KeyError(f"not trainable tensors of this model: {unknown[:3]}")
        return {k: params[k].detach().to(device="cpu", dtype=torch.float32).clone() for k in keys}

    @torch.no_grad()
    def set_state(self, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
        """Copy tensors (from any device) into the named trainable parameters; with strict=True the key sets
        must agree."""
        params = self.trainable_parameters()
        unknown = [k for k in state if k not in params]
        missing = [k for k in params if k not in state] if strict else []
        if unknown or missing:
            raise KeyError(
                f"state does not match the trainable tensors: unknown {unknown[:3]}, missing {missing[:3]}"
            )
        for k, t in state.items():
            p = params[k]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{k}: shape {tuple(t.shape)} does not match {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))

    def state_spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every trainable tensor (what a client update must look like)."""
        return {k: (tuple(p.shape), p.dtype) for k, p in self.trainable_parameters().items()}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    def set_trainable(self) -> None:
        """Freeze everything, then enable gradients on exactly the trainable tensors."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters().values():
            p.requires_grad_(True)

    def merge(self) -> None:
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()


def inject_adapters(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    make_layer: LayerFactory,
    ranks: Mapping[str, int],
    *,
    extra_trainable: Sequence[str] | str = (),
) -> AdaptedModel:
    """Replace each module in `modules` by `make_layer(path, module, rank)`; freeze all else.

    `modules` comes from `find_target_modules` (and `ranks` from `resolve_ranks`) so the caller can inspect
    the targets before anything changes (the LoRA-SB init estimates gradients on the plain model first).
    """
    extra = find_extra_modules(model, extra_trainable)
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, nn.Module] = {}
    for path, module in modules.items():
        if model.get_submodule(path) is not module:
            raise ValueError(f"module {path} is not part of this model (or was already replaced)")
        layer = make_layer(path, module, ranks[path])
        _set_submodule(model, path, layer)
        layers[path] = layer
    adapted = AdaptedModel(model=model, layers=layers, extra_modules=extra)
    adapted.set_trainable()
    return adapted


def lora_sb_factory(*, scaling: float = 1.0, dropout: float = 0.0) -> LayerFactory:
    """A `make_layer` callback building `LoraSBLinear` layers with zero factors (set them afterwards)."""

    def make(path: str, base: nn.Module, rank: int) -> nn.Module:
        return LoraSBLinear(base, rank, scaling=scaling, dropout=dropout)

    return make


def check_model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the base model; only fp32, bf16 and fp16 are supported."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    bad = dtypes - {torch.float32, torch.bfloat16, torch.float16}
    if bad:
        raise FedsbError(
            field="dtype",
            value=str(sorted(map(str, bad))[0]),
            fix="load the model in float32, bfloat16 or float16",
        )
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        if dt in dtypes:
            return dt
    raise FedsbError(
        field="model", value=type(model).__name__, fix="pass a model with floating-point weights"
    )
