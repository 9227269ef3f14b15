"""Peak training memory of one client, estimated without weights: a meta-device model and a traced forward.

    peak ~ weights + optimizer state + max(activations, gradients + optimizer-step temporaries)
           (+ gradients when train.grad_accum > 1 keeps them across micro-batches)

- weights: every frozen parameter in the base dtype (or 4/8-bit for the linear weights of a quantized base:
  `QUANTIZED_BYTES`), the adapters' own tensors in fp32, and, under bf16 autocast of an fp32 base, the bf16
  copies autocast makes of every linear weight (autograd keeps them for the backward pass);
- optimizer: AdamW two states per trained element, SGD one with momentum (none without);
- activations: exactly the tensors autograd saves for backward in one training forward of batch x sequence
  tokens (all of them labelled: the worst case), traced with `saved_tensors_hooks` on the meta device (no
  memory, no compute; SDPA traced as the fused kernels CPU and CUDA run, which keep q, k, v, the output and
  the log-sum-exp), plus the backward's first gradients of the fp32 logits (`LOGIT_COPIES` of them); with
  gradient checkpointing every block's input, plus the larger of the logits' copies and one block's saved
  tensors (a block is recomputed only after the backward has passed the head and freed the logits'
  gradients: activations = saved + max(copies x logits, one block)); an int8 base's layers also
  keep their inputs (bitsandbytes' CPU training matmul).

Allocator slack, the CUDA context (~0.5 GiB) and the interpreter's own memory are not included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedsb.models.quantize import KEEP_DENSE, QUANTIZED_BYTES

#: fp32 tensors of the logits' size alive at the start of backward (logits, their fp32 view, the loss grad)
LOGIT_COPIES = 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one client's training step, by kind (see the module docstring), and their peak."""

    frozen_weights: int
    adapter_weights: int
    trained_weights: int
    autocast_copies: int
    gradients: int
    optimizer: int
    step_temporaries: int
    saved_activations: int
    logits: int
    grads_held: bool  # train.grad_accum > 1: gradients stay alive through the next forward

    @property
    def weights(self) -> int:
        return self.frozen_weights + self.adapter_weights + self.trained_weights + self.autocast_copies

    recomputed_block: int = 0  # gradient checkpointing: one block's saved tensors (see the module docstring)

    @property
    def activations(self) -> int:
        return self.saved_activations + max(LOGIT_COPIES * self.logits, self.recomputed_block)

    @property
    def total(self) -> int:
        held = self.gradients if self.grads_held else 0
        return (
            self.weights
            + self.optimizer
            + held
            + max(self.activations, self.gradients + self.step_temporaries - held)
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weights": self.weights, "activations": self.activations, "total": self.total}


def estimate_memory(
    model: nn.Module,
    *,
    batch: int,
    seq: int,
    classify: bool = False,
    optimizer: str = "adamw",
    momentum: float = 0.0,
    bf16_autocast: bool = False,
    grad_accum: int = 1,
    quantize: str = "none",
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Estimate the training peak of `model`: a meta-device model with its adapters injected and exactly
    the trained tensors requiring gradients (built by `fedsb.plan`). `quantize`: none, nf4 or int8 (int8's
    CPU/XPU training matmul keeps each quantized layer's input for backward as well; nf4 keeps nothing
    but its packed weight). `gradient_checkpointing`: each decoder block keeps only its input; one block's
    own saved tensors are recomputed at a time in the backward pass."""
    if quantize != "none" and quantize not in QUANTIZED_BYTES:
        raise ValueError(f"quantize={quantize!r}: use none or one of {', '.join(QUANTIZED_BYTES)}")
    trained = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    trained_ids = {id(p) for p in trained}
    adapter_ids = {id(p) for m in _adapter_modules(model) for p in m.parameters(recurse=False)}
    frozen = adapter = 0
    quantized = _quantizable_weights(model) if quantize != "none" else set()
    for p in model.parameters():
        if id(p) in trained_ids:
            continue
        if id(p) in adapter_ids:
            adapter += _nbytes(p)
        elif id(p) in quantized:
            frozen += int(p.numel() * QUANTIZED_BYTES[quantize])
        else:
            frozen += _nbytes(p)
    trained_bytes = sum(_nbytes(p) for p in trained)
    states = {"adamw": 2, "sgd": 1 if momentum > 0 else 0}[optimizer]
    fp32_base = any(p.dtype == torch.float32 for p in model.parameters() if id(p) not in adapter_ids)
    autocast_copies = 0
    if bf16_autocast and fp32_base and quantize == "none":
        autocast_copies = sum(
            m.weight.numel() * 2 for m in _linears(model) if id(m.weight) not in adapter_ids
        )
    trace_dtype = torch.bfloat16 if bf16_autocast else None
    saved, block, logits = traced_activations(
        model,
        batch=batch,
        seq=seq,
        classify=classify,
        dtype=trace_dtype,
        checkpointed=gradient_checkpointing,
        keeps_inputs=quantized if quantize == "int8" else set(),
    )
    return MemoryEstimate(
        frozen_weights=frozen,
        adapter_weights=adapter,
        trained_weights=trained_bytes,
        autocast_copies=autocast_copies,
        gradients=trained_bytes,
        optimizer=states * trained_bytes,
        step_temporaries=trained_bytes,
        saved_activations=saved,
        logits=logits,
        grads_held=grad_accum > 1,
        recomputed_block=block,
    )


def traced_activations(
    model: nn.Module,
    *,
    batch: int,
    seq: int,
    classify: bool = False,
    dtype: torch.dtype | None = None,
    checkpointed: bool = False,
    keeps_inputs: set[int] = frozenset(),  # type: ignore[assignment]
) -> tuple[int, int, int]:
    """(bytes autograd saves for backward through the whole forward, bytes one recomputed block saves,
    bytes of the fp32 logits) in one training forward of a meta model on `batch` x `seq` tokens; `dtype`
    casts the floating activations (bf16 autocast's compute dtype).

    `checkpointed` (gradient checkpointing of the decoder blocks): the first count holds every block's
    input (what the checkpoint keeps) and what is saved outside the blocks; the second the largest block's
    own saved tensors (recomputed one at a time in backward; 0 without checkpointing).
    `keeps_inputs`: ids of linear weights whose layers also keep their input."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}
    block_saved: dict[int, dict[int, int]] = {}  # block -> its own saved tensors
    current: list[int] = []  # the block being traced (checkpointed only)

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params:
            into = block_saved.setdefault(current[-1], {}) if current else saved
            into[id(base)] = base.numel() * base.element_size()
        return t

    def enter(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        saved[id(hidden)] = hidden.numel() * hidden.element_size()  # the checkpoint keeps the block input
        current.append(id(module))

    def leave(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        current.pop()

    def keep_input(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        into = block_saved.setdefault(current[-1], {}) if current else saved
        into[id(x)] = x.numel() * x.element_size()

    handles = [
        m.register_forward_pre_hook(keep_input)
        for m in model.modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and id(m.weight) in keeps_inputs
    ]
    if checkpointed:
        for m in model.modules():
            if isinstance(m, GradientCheckpointingLayer):
                handles.append(m.register_forward_pre_hook(enter, with_kwargs=True))
                handles.append(m.register_forward_hook(leave, with_kwargs=True))

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    was_training = model.training
    model.train()
    try:
        with _fused_attention_trace(), _compute_dtype(model, dtype):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if classify:
                    labels = torch.zeros(batch, dtype=torch.long, device="meta")
                    logits = model(input_ids=ids).logits  # (B, labels)
                    F.cross_entropy(logits.float(), labels)
                else:
                    logits = model(input_ids=ids).logits  # (B, T, V)
                    pred = logits[:, :-1].float()  # position t predicts token t + 1
                    F.cross_entropy(pred.reshape(-1, pred.shape[-1]), ids[:, 1:].reshape(-1))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    blocks = max((sum(b.values()) for b in block_saved.values()), default=0)
    return sum(saved.values()), blocks, logits.numel() * 4


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel while tracing: saves what flash/efficient SDPA saves."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)  # (B, H, T, D)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, T)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:  # never run (tracing only)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _traced_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *a: Any, **k: Any):
    """transformers' attention-function signature; (B, H, T, D) in, (B, T, H, D) out."""
    return _FusedAttention.apply(query, key, value).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _fused_attention_trace() -> Iterator[None]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _traced_sdpa
    try:
        yield
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original


@contextlib.contextmanager
def _compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Cast the meta model's floating parameters to `dtype` for the trace (free on meta), then back."""
    if dtype is None:
        yield
        return
    before = {p: p.data for p in model.parameters()}
    for p in before:
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in before.items():
            p.data = data


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _adapter_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of the adapters themselves (not their frozen base layers): their tensors are fp32."""
    from fedsb.adapters.layer import AdapterLayer

    out: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, AdapterLayer):
            base = set(map(id, m.base_layer.modules()))
            out.extend(sub for sub in m.modules() if id(sub) not in base)
    return out


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _quantizable_weights(model: nn.Module) -> set[int]:
    """ids of the linear weights a 4/8-bit base quantizes (`fedsb.models.quantize.quantize_model`): every
    nn.Linear and Conv1D of the base outside the heads it keeps dense."""
    from transformers.pytorch_utils import Conv1D

    adapters = set(map(id, _adapter_modules(model)))
    out = set()
    for path, m in model.named_modules():
        dense = set(path.split(".")) & set(KEEP_DENSE)
        if isinstance(m, nn.Linear | Conv1D) and not dense and id(m) not in adapters:
            out.add(id(m.weight))
    return out
