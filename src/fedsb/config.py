"""Run configuration: validated dataclasses, YAML presets and `section.field=value` overrides.

Every field carries a help string; `__post_init__` raises `ConfigError` naming the field, the value and
the fix. The resolved configuration is written next to every run's results.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from fedsb.errors import ConfigError
from fedsb.privacy.mechanism import MECHANISMS, PrivacyMechanism, mechanism_named, mode_help

#: the `device` setting's syntax (availability is checked by `fedsb.device.resolve_device`)
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_RE = r"auto|cpu|mps|cuda(:\d+)?"


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - dataclass field with help metadata
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _check(ok: bool, name: str, value: Any, fix: str, what: str = "is not valid") -> None:
    if not ok:
        raise ConfigError(field=name, value=value, fix=fix, what=what)


def _positive_int(name: str, value: Any, *, allow_none: bool = False, zero: bool = False) -> None:
    if value is None and allow_none:
        return
    lo = 0 if zero else 1
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= lo,
        name,
        value,
        f"use an integer >= {lo}" + (" (or null)" if allow_none else ""),
    )


def _positive_float(name: str, value: Any, *, zero: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = (
        isinstance(value, int | float) and not isinstance(value, bool) and (value >= 0 if zero else value > 0)
    )
    _check(
        ok, name, value, "use a number " + (">= 0" if zero else "> 0") + (" (or null)" if allow_none else "")
    )


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, value, f"use one of: {', '.join(choices)}")


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m", "builtin alias (fedsb models), local checkpoint directory or HF hub id")
    dtype: str = _f(
        "auto",
        "frozen base model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16; "
        "R, heads and optimizer state always stay float32",
    )
    quantize: str = _f(
        "none",
        "frozen base in 4 or 8 bits through bitsandbytes: none, nf4 (4-bit NormalFloat, ~0.56 bytes per "
        "linear weight) or int8 (LLM.int8()); every linear layer but the heads; with model.dtype=auto the "
        "rest of the base is bfloat16; adapters, R and optimizer state stay float32",
    )
    device_map: str | None = _f(
        None,
        "null (the whole model on `device`) or auto (spread a local/hub checkpoint over the visible GPUs "
        "with accelerate, for a model one GPU cannot hold; needs device=cuda)",
    )
    hub: bool = _f(
        False,
        "download model.name from the Hugging Face hub if it is not a builtin, a directory or in the local hub "
        "cache (needs network; false: unknown names fail at once)",
    )

    def __post_init__(self) -> None:
        _check(
            isinstance(self.name, str) and bool(self.name),
            "model.name",
            self.name,
            "name a model, e.g. smollm2-135m",
        )
        _choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _choice("model.quantize", self.quantize, ("none", "nf4", "int8"))
        _check(self.device_map in (None, "auto"), "model.device_map", self.device_map, "use null or auto")
        _check(isinstance(self.hub, bool), "model.hub", self.hub, "use true or false")


@dataclass
class AdapterConfig:
    rank: int = _f(32, "r: R is r x r per adapted layer")
    targets: Any = _f(
        "auto", "layer names / 're:<regex>' to adapt, or 'auto' for the architecture's defaults"
    )
    rank_overflow: str = _f("cap", "when r > min(out, in) of a layer: 'cap' (warn) or 'error'")
    scaling: float | None = _f(
        None,
        "s = alpha / r in W0 + s (update); null = the method's default: 1.0 for Fed-SB (alpha = r), "
        "0.5 for the LoRA baselines (alpha 16 at r 32, as in the paper)",
    )
    dropout: float = _f(0.0, "dropout on the adapter input")
    extra_trainable: Any = _f(
        "auto", "extra trained modules (a classification head): 'auto' or a list of names"
    )

    def __post_init__(self) -> None:
        _positive_int("adapter.rank", self.rank)
        ok = self.targets == "auto" or (
            isinstance(self.targets, list) and self.targets and all(isinstance(t, str) for t in self.targets)
        )
        _check(ok, "adapter.targets", self.targets, "use 'auto' or a list such as [q_proj, v_proj]")
        _choice("adapter.rank_overflow", self.rank_overflow, ("cap", "error"))
        _positive_float("adapter.scaling", self.scaling, allow_none=True)
        _check(
            isinstance(self.dropout, int | float) and 0 <= self.dropout < 1,
            "adapter.dropout",
            self.dropout,
            "use a value in [0, 1)",
        )
        ok = self.extra_trainable == "auto" or isinstance(self.extra_trainable, list)
        _check(
            ok,
            "adapter.extra_trainable",
            self.extra_trainable,
            "use 'auto' or a list of module names ([] for none)",
        )


@dataclass
class InitConfig:
    method: str = _f("lora-sb", "basis: lora-sb (gradient SVD), lora-xs (SVD of W0) or random (orthonormal)")
    source: str = _f(
        "server",
        "data for the gradient estimate: 'server' (a proxy sample the server holds; federated), "
        "'pooled' (the clients' pooled training data, as in the paper; not federated) or 'federated' (each "
        "sampled client's gradient over its own n_i examples, sent as a sketch or a sum, noised under DP; "
        "init.exchange; in the simulator and over Flower, refused with SecAgg+)",
    )
    server_size: int = _f(256, "examples in the server's proxy sample (source=server)")
    num_samples: int | None = _f(
        None, "n examples for the gradient estimate; null = max(min_samples, fraction x data)"
    )
    sample_fraction: float = _f(0.001, "default n as a fraction of the init data (the paper's ~0.1%)")
    min_samples: int = _f(32, "lower bound for the default n")
    batch_size: int = _f(8, "batch size of the gradient estimate")
    eta: float = _f(1e-4, "step size of the approximated first step dW = -eta sign(G) (eta_rule=fixed)")
    eta_rule: str = _f(
        "fixed", "'fixed' (use eta) or 'official' (lr / (warmup_ratio x T), the official code)"
    )
    svd: str = _f("exact", "truncated SVD: exact or randomized")
    oversample: int = _f(10, "randomized SVD oversampling (q = r + oversample)")
    power_iters: int = _f(4, "randomized SVD power iterations")
    exchange: str = _f(
        "sketch",
        "init.source=federated: 'sketch' (randomized SVD of the sum in two exchanges of k(m+n) per layer, "
        "k = rank + oversample; SVD of the UN-SIGNED sum, sign is not linear) or 'dense' (each client's "
        "m x n gradient sum once; the server takes -eta sign(sum) as LoRA-SB)",
    )
    clip_norm: float = _f(
        1.0,
        "init.source=federated under DP: per-example L2 clip C of the init gradients (all layers together)",
    )
    noise_multiplier: float = _f(
        1.0,
        "init.source=federated under DP: sigma of the init's releases (N(0, (sigma C)^2) per entry); composed "
        "into each participating client's account",
    )

    def __post_init__(self) -> None:
        _choice("init.method", self.method, ("lora-sb", "lora-xs", "random"))
        _choice("init.source", self.source, ("server", "pooled", "federated"))
        _choice("init.exchange", self.exchange, ("sketch", "dense"))
        _positive_float("init.clip_norm", self.clip_norm)
        _positive_float("init.noise_multiplier", self.noise_multiplier)
        _positive_int("init.server_size", self.server_size)
        _positive_int("init.num_samples", self.num_samples, allow_none=True)
        _check(
            isinstance(self.sample_fraction, int | float) and 0 < self.sample_fraction <= 1,
            "init.sample_fraction",
            self.sample_fraction,
            "use a fraction in (0, 1]",
        )
        _positive_int("init.min_samples", self.min_samples)
        _positive_int("init.batch_size", self.batch_size)
        _positive_float("init.eta", self.eta)
        _choice("init.eta_rule", self.eta_rule, ("fixed", "official"))
        _choice("init.svd", self.svd, ("exact", "randomized"))
        _positive_int("init.oversample", self.oversample, zero=True)
        _positive_int("init.power_iters", self.power_iters, zero=True)


@dataclass
class RavanConfig:
    heads: int = _f(4, "RAVAN (fed.method=ravan): heads h per layer, each r x r with r = adapter.rank")
    init: str = _f(
        "random",
        "RAVAN's frozen head bases: random (orthonormal, the heads mutually orthogonal), lora-xs (SVD of "
        "W0) or lora-sb (gradient SVD, the init.* settings); one rank-h*r basis split into h heads",
    )
    train_scales: bool = _f(True, "RAVAN: train the per-head scales s_h (false: fixed at 1)")

    def __post_init__(self) -> None:
        _positive_int("ravan.heads", self.heads)
        _choice("ravan.init", self.init, ("random", "lora-xs", "lora-sb"))
        _check(
            isinstance(self.train_scales, bool), "ravan.train_scales", self.train_scales, "use true or false"
        )


@dataclass
class DataConfig:
    task: str = _f("arithmetic", "task name (fedsb tasks)")
    train_size: int | None = _f(2000, "training examples pooled over all clients (null = whole split)")
    test_size: int | None = _f(200, "held-out evaluation examples (null = whole split)")
    eval_split: str = _f("test", "split evaluated each round: test (report) or validation (tuning)")
    max_length: int = _f(96, "maximum tokens of prompt + answer")
    pad_to_multiple: int = _f(8, "round padded batch lengths up to a multiple of this (bounds kernel caches)")
    options: dict = _f(
        {}, "task-specific options, e.g. {max_value: 50, template_split: false} for arithmetic"
    )
    cache: bool = _f(True, "cache tokenized client shards and init data on disk ($FEDSB_CACHE/tokenized)")

    def __post_init__(self) -> None:
        _check(
            isinstance(self.task, str) and bool(self.task),
            "data.task",
            self.task,
            "name a task, e.g. arithmetic",
        )
        _positive_int("data.train_size", self.train_size, allow_none=True)
        _positive_int("data.test_size", self.test_size, allow_none=True)
        _choice("data.eval_split", self.eval_split, ("test", "validation"))
        _positive_int("data.max_length", self.max_length)
        _positive_int("data.pad_to_multiple", self.pad_to_multiple)
        _check(isinstance(self.options, dict), "data.options", self.options, "use a mapping of option: value")
        _check(isinstance(self.cache, bool), "data.cache", self.cache, "use true or false")


@dataclass
class PartitionConfig:
    scheme: str = _f("iid", "iid, dirichlet (over column), natural (one column value per client), quantity")
    num_clients: int | None = _f(4, "number of clients (null with scheme=natural: one per column value)")
    alpha: float = _f(0.5, "Dirichlet concentration (dirichlet, quantity)")
    column: str | None = _f(None, "column for dirichlet/natural (null = the task's own category column)")
    min_size: int = _f(1, "smallest allowed client dataset")
    client_ranks: list | None = _f(
        None,
        "fed.method=fedsb: rank r_i <= adapter.rank of each client, in client order (e.g. [8, 16, 32]); "
        "client i trains and uploads only R[:r_i, :r_i] and the global R stays the exact weighted mean of "
        "the client models (null: every client at adapter.rank)",
    )

    def __post_init__(self) -> None:
        _choice("partition.scheme", self.scheme, ("iid", "dirichlet", "natural", "quantity"))
        _positive_int("partition.num_clients", self.num_clients, allow_none=self.scheme == "natural")
        _positive_float("partition.alpha", self.alpha)
        _positive_int("partition.min_size", self.min_size)
        if self.client_ranks is not None:
            ranks = self.client_ranks
            ok = isinstance(ranks, list | tuple) and all(
                isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks
            )
            _check(
                ok and len(ranks) > 0,
                "partition.client_ranks",
                ranks,
                "use a list of positive integers, one per client, e.g. [2, 4, 4]",
            )
            self.client_ranks = list(ranks)


@dataclass
class TrainConfig:
    optimizer: str = _f("adamw", "local optimizer: adamw or sgd")
    lr: float = _f(5e-3, "learning rate")
    weight_decay: float = _f(0.0, "weight decay")
    betas: list = _f([0.9, 0.999], "AdamW betas")
    eps: float = _f(1e-6, "AdamW epsilon")
    momentum: float = _f(0.0, "SGD momentum")
    batch_size: int = _f(8, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    local_steps: int | None = _f(16, "optimizer steps per client per round (null: use local_epochs)")
    local_epochs: float | None = _f(
        None, "epochs over the client's data per round (when local_steps is null)"
    )
    schedule: str = _f(
        "linear", "learning-rate schedule after warm-up: constant, linear or cosine (decay to 0)"
    )
    warmup_ratio: float = _f(0.05, "fraction of the schedule spent warming up linearly")
    schedule_scope: str = _f(
        "global", "'global': one schedule across all rounds; 'round': restart every round"
    )
    keep_optimizer_state: bool = _f(
        False, "keep each client's optimizer state across rounds (else fresh each round)"
    )
    max_grad_norm: float | None = _f(1.0, "clip the gradient norm of the trained tensors (null: no clipping)")
    bf16: bool = _f(True, "bf16 autocast on CPU (about 1.8x faster; R and optimizer state stay fp32)")
    gradient_checkpointing: bool = _f(
        False,
        "recompute each block's activations in the backward pass instead of keeping them (less memory, "
        "about one more forward per step; transformers' gradient checkpointing, non-reentrant)",
    )

    def __post_init__(self) -> None:
        _choice("train.optimizer", self.optimizer, ("adamw", "sgd"))
        _positive_float("train.lr", self.lr)
        _positive_float("train.weight_decay", self.weight_decay, zero=True)
        ok = (
            isinstance(self.betas, list | tuple)
            and len(self.betas) == 2
            and all(0 <= b < 1 for b in self.betas)
        )
        _check(ok, "train.betas", self.betas, "use two numbers in [0, 1), e.g. [0.9, 0.999]")
        _positive_float("train.eps", self.eps)
        _positive_float("train.momentum", self.momentum, zero=True)
        _positive_int("train.batch_size", self.batch_size)
        _positive_int("train.grad_accum", self.grad_accum)
        _positive_int("train.local_steps", self.local_steps, allow_none=True)
        _positive_float("train.local_epochs", self.local_epochs, allow_none=True)
        one_of = "set exactly one of train.local_steps and train.local_epochs (the other null)"
        if self.local_steps is not None and self.local_epochs is not None:
            raise ConfigError(
                field="train.local_epochs",
                value=self.local_epochs,
                what=f"conflicts with train.local_steps={self.local_steps} (the default unless you set it)",
                fix=one_of + ", e.g. train.local_steps=null to train by epochs",
            )
        _check(
            self.local_steps is not None or self.local_epochs is not None, "train.local_steps", None, one_of
        )
        _choice("train.schedule", self.schedule, ("constant", "linear", "cosine"))
        _check(
            0 <= self.warmup_ratio < 1, "train.warmup_ratio", self.warmup_ratio, "use a fraction in [0, 1)"
        )
        _choice("train.schedule_scope", self.schedule_scope, ("global", "round"))
        _positive_float("train.max_grad_norm", self.max_grad_norm, allow_none=True)
        _check(
            isinstance(self.gradient_checkpointing, bool),
            "train.gradient_checkpointing",
            self.gradient_checkpointing,
            "use true or false",
        )


#: fed.server_optimizer's values (fedsb.fed.server_opt builds them)
SERVER_OPTIMIZERS = ("avg", "avgm", "adam", "yogi")


@dataclass
class FedConfig:
    method: str = _f("fedsb", "federated method")
    rounds: int = _f(3, "communication rounds")
    clients_per_round: float = _f(1.0, "fraction (0, 1] or count (> 1) of clients sampled each round")
    min_clients: int = _f(1, "a round fails if fewer accepted updates remain")
    weighting: str = _f("examples", "aggregation weights: 'examples' (N_i / sum N_j) or 'uniform'")
    wire_dtype: str = _f(
        "float32",
        "dtype of tensors on the wire: float32, bfloat16, float16, or int8 (the change R - last global R, "
        "absmax-quantized with fp32 scales: exact up to quantization error; fed.wire_scale, fed.error_feedback)",
    )
    wire_scale: str = _f(
        "tensor",
        "fed.wire_dtype=int8: one absmax scale per tensor (4 bytes each) or per row (4 bytes per row)",
    )
    error_feedback: bool = _f(
        False,
        "fed.wire_dtype=int8: each client adds its last upload's rounding error to its next change before "
        "quantizing (client-side error feedback; downloads always carry the server's residual)",
    )
    server_optimizer: str = _f(
        "avg",
        "server update on the pseudo-gradient mean_i T_i - T: avg (plain weighted mean, as the paper), "
        "avgm (FedAvgM: SGD with momentum), adam (FedAdam), yogi (FedYogi); methods whose global state "
        "is that mean only (fedsb, ravan, fedit, ffa, full)",
    )
    server_lr: float | None = _f(None, "server learning rate (null: 1.0 for avgm, 0.01 for adam and yogi)")
    server_momentum: float = _f(0.9, "fed.server_optimizer=avgm: momentum of the server's SGD")
    server_betas: list = _f([0.9, 0.99], "fed.server_optimizer=adam or yogi: (beta1, beta2)")
    server_eps: float = _f(1e-3, "fed.server_optimizer=adam or yogi: eps (tau in Reddi et al. 2021)")
    max_update_norm: float | None = _f(
        None, "reject updates whose Frobenius norm exceeds this (null: no bound)"
    )
    keep_checkpoints: int = _f(2, "number of round checkpoints kept on disk")

    def __post_init__(self) -> None:
        from fedsb.fed.registry import method_names

        _choice("fed.method", self.method, method_names())
        _positive_int("fed.rounds", self.rounds)
        _positive_float("fed.clients_per_round", self.clients_per_round)
        ok = self.clients_per_round <= 1 or float(self.clients_per_round).is_integer()
        _check(
            ok,
            "fed.clients_per_round",
            self.clients_per_round,
            "use a fraction <= 1 or a whole number of clients",
        )
        _positive_int("fed.min_clients", self.min_clients)
        _choice("fed.weighting", self.weighting, ("examples", "uniform"))
        _choice("fed.wire_dtype", self.wire_dtype, ("float32", "bfloat16", "float16", "int8"))
        _choice("fed.wire_scale", self.wire_scale, ("tensor", "row"))
        _check(
            isinstance(self.error_feedback, bool),
            "fed.error_feedback",
            self.error_feedback,
            "use true or false",
        )
        _choice("fed.server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        _positive_float("fed.server_lr", self.server_lr, allow_none=True)
        _check(
            isinstance(self.server_momentum, int | float) and 0 <= self.server_momentum < 1,
            "fed.server_momentum",
            self.server_momentum,
            "use a number in [0, 1), e.g. 0.9",
        )
        ok = (
            isinstance(self.server_betas, list | tuple)
            and len(self.server_betas) == 2
            and all(isinstance(b, int | float) and 0 <= b < 1 for b in self.server_betas)
        )
        _check(ok, "fed.server_betas", self.server_betas, "use two numbers in [0, 1), e.g. [0.9, 0.99]")
        _positive_float("fed.server_eps", self.server_eps)
        _positive_float("fed.max_update_norm", self.max_update_norm, allow_none=True)
        _positive_int("fed.keep_checkpoints", self.keep_checkpoints)


@dataclass
class PrivacyConfig:
    mode: str = _f("none", mode_help())
    target_epsilon: float | None = _f(
        None, "epsilon for the WHOLE planned training (all rounds); the noise multiplier is solved from it"
    )
    noise_multiplier: float | None = _f(None, "sigma, instead of target_epsilon")
    delta: float | None = _f(
        None,
        "delta (null: min(1e-5, 1/(10 N)) with N = the client's examples for mode=sample, the number of "
        "clients for mode=client); a delta >= 1/N is refused unless privacy.allow_large_delta=true",
    )
    allow_large_delta: bool = _f(
        False,
        "accept a privacy.delta >= 1/N (a mechanism that may publish a whole record is then (0, delta)-DP)",
    )
    reproducible_noise: bool = _f(
        False,
        "research only: draw DP noise and Poisson sampling from the run seed (repeatable, bit-identical "
        "resume) instead of the OS CSPRNG; the guarantee then does NOT hold against a reader of the config",
    )
    max_grad_norm: float = _f(0.1, "mode=sample: per-example clipping norm C of the trained tensors")
    head_clip_share: float | None = _f(
        None,
        "mode=sample: the classification head's share f of the squared clipping budget: each example's head "
        "gradient is clipped to C sqrt(f), its adapter gradient to C sqrt(1 - f), so the total stays <= C and "
        "the noise and epsilon are unchanged (null: one flat clip at C over all trained tensors, where a "
        "fresh head takes ~99.8 % of it)",
    )
    accountant: str = _f("prv", "privacy accountant: prv (Opacus default) or rdp")
    poisson: bool = _f(
        True,
        "mode=sample: Poisson sampling with rate train.batch_size / N_client (false: shuffled batches, "
        "accounted as if Poisson: not a proven bound)",
    )
    clip_update: float = _f(1.0, "mode=client: clip each client's update (all its tensors) to this L2 norm")

    def __post_init__(self) -> None:
        _choice("privacy.mode", self.mode, tuple(MECHANISMS))
        _positive_float("privacy.target_epsilon", self.target_epsilon, allow_none=True)
        _positive_float("privacy.noise_multiplier", self.noise_multiplier, zero=True, allow_none=True)
        if self.delta is not None:
            _check(
                isinstance(self.delta, float | int) and 0 < self.delta < 1,
                "privacy.delta",
                self.delta,
                "use a probability in (0, 1), well below 1/N (null: min(1e-5, 1/(10 N)))",
            )
        _check(
            isinstance(self.allow_large_delta, bool),
            "privacy.allow_large_delta",
            self.allow_large_delta,
            "use true or false",
        )
        _check(
            isinstance(self.reproducible_noise, bool),
            "privacy.reproducible_noise",
            self.reproducible_noise,
            "use true or false",
        )
        _positive_float("privacy.max_grad_norm", self.max_grad_norm)
        f = self.head_clip_share
        _check(
            f is None or (isinstance(f, int | float) and not isinstance(f, bool) and 0 < f < 1),
            "privacy.head_clip_share",
            f,
            "use a fraction strictly between 0 and 1, e.g. 0.5 (the head's share of C^2), or null for one "
            "flat clip",
        )
        _choice("privacy.accountant", self.accountant, ("prv", "rdp"))
        _positive_float("privacy.clip_update", self.clip_update)
        self.mechanism.check_settings(self)

    @property
    def mechanism(self) -> PrivacyMechanism:
        """The privacy mechanism of `mode` (`fedsb.privacy.mechanism`): what it changes in the run."""
        return mechanism_named(self.mode)

    @property
    def enabled(self) -> bool:
        return self.mechanism.private


@dataclass
class EvalConfig:
    every: int = _f(1, "evaluate the global model every k rounds (and always after the last)")
    initial: bool = _f(
        True, "evaluate the untuned model (W0) before round 1; false skips it (one evaluation fewer per run)"
    )
    batch_size: int = _f(32, "evaluation batch size")
    max_new_tokens: int | None = _f(None, "generation length (null: the task's default)")
    bf16: bool | None = _f(None, "bf16 autocast for evaluation (null: same as train.bf16)")
    scorer: str = _f(
        "auto",
        "generate (greedy decoding + answer extraction), likelihood (argmax of option log-likelihoods; "
        "multiple-choice tasks) or auto (the task's default); head tasks always use their classifier",
    )
    normalize: str = _f("sum", "likelihood scorer: sum or per-token mean of each option's log-probabilities")

    def __post_init__(self) -> None:
        _positive_int("eval.every", self.every)
        _positive_int("eval.batch_size", self.batch_size)
        _positive_int("eval.max_new_tokens", self.max_new_tokens, allow_none=True)
        _choice("eval.scorer", self.scorer, ("auto", "generate", "likelihood"))
        _choice("eval.normalize", self.normalize, ("sum", "mean"))


def _report_to(value: Any) -> list[str]:
    """`report_to` as a list of distinct tracker names (a single name, or 'none', also accepted)."""
    from fedsb.tracking import TRACKER_NAMES

    if value is None or value == "none":
        return []
    names = [value] if isinstance(value, str) else value
    fix = f"use a list of {', '.join(TRACKER_NAMES)} (e.g. report_to=[csv,tensorboard]), or [] for none"
    _check(isinstance(names, list) and all(isinstance(n, str) for n in names), "report_to", value, fix)
    for name in names:
        _check(name in TRACKER_NAMES, "report_to", value, fix, what=f"names an unknown tracker {name!r}")
    _check(len(set(names)) == len(names), "report_to", value, fix, what="names a tracker twice")
    return list(names)


@dataclass
class RunConfig:
    seed: int = _f(0, "master seed: sampling, partitions, data order, init")
    device: str = _f(
        "auto",
        "where the model trains and evaluates: auto (CUDA when available, else CPU), cpu, cuda, cuda:N or "
        "mps; aggregation, the ledger and checkpoints stay on the CPU",
    )
    output_dir: str | None = _f(None, "results directory (null: runs/<timestamp>)")
    threads: int | None = _f(None, "torch threads (null: all cores)")
    deterministic: bool = _f(True, "torch deterministic algorithms (bit-identical resume)")
    progress: bool = _f(True, "progress bars (drawn only on a terminal; otherwise one log line per round)")
    report_to: list[str] = _f(
        ["csv"],
        "experiment tracking, any of csv (metrics.csv in the run directory), tensorboard (<run>/tensorboard), "
        "wandb (offline unless WANDB_MODE is set), mlflow (a file store in <run>/mlruns unless "
        "MLFLOW_TRACKING_URI is set); [] for none; wandb and mlflow are skipped with a warning when not installed",
    )
    export: bool = _f(
        True,
        "export the final model: a standard PEFT LoRA adapter where lossless, a merged checkpoint for "
        "methods that fold updates into W0 (fedex, flora)",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    init: InitConfig = field(default_factory=InitConfig)
    ravan: RavanConfig = field(default_factory=RavanConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool),
            "seed",
            self.seed,
            "use an integer",
        )
        _positive_int("threads", self.threads, allow_none=True)
        self.report_to = _report_to(self.report_to)
        _check(
            isinstance(self.device, str) and re.fullmatch(DEVICE_RE, self.device) is not None,
            "device",
            self.device,
            f"use {DEVICE_CHOICES}",
        )
        if self.model.device_map is not None and not self.device.startswith(("cuda", "auto")):
            raise ConfigError(
                field="model.device_map",
                value=self.model.device_map,
                what=f"needs CUDA devices, but device={self.device}",
                fix="set device=cuda (or auto on a GPU machine), or model.device_map=null",
            )
        if self.fed.min_clients > self.expected_clients_per_round():
            raise ConfigError(
                field="fed.min_clients",
                value=self.fed.min_clients,
                what=f"exceeds the {self.expected_clients_per_round()} clients sampled per round",
                fix="lower fed.min_clients or sample more clients (fed.clients_per_round)",
            )
        self._check_privacy()
        self._check_server_state()
        self._check_client_ranks()
        mech = (
            self.privacy.mechanism
        )  # a private mechanism without per-client accounts protects whole clients
        if self.init.source == "federated" and mech.private and not mech.accounts_per_client:
            raise ConfigError(
                field="init.source",
                value="federated",
                what=f"is privatized per example (record level), but privacy.mode={self.privacy.mode} protects whole clients",
                fix="use privacy.mode=sample (or none), or init.source server",
            )
        from fedsb.config_audit import check_unused

        check_unused(self, warn=False)  # a privacy setting that does nothing is an error in any config

    def _check_privacy(self) -> None:
        self.privacy.mechanism.check(self)

    def _check_server_state(self) -> None:
        """Server optimizers and int8 deltas act on a global state that is the weighted mean of the
        uploads and is what a download carries; methods that fold, stack or re-factorize have none."""
        from fedsb.fed import registry

        method = self.fed.method
        if registry.card(method).mean_state:
            return
        why = (
            f"fed.method={method} has no global state that is the mean of the uploads "
            "(it folds, stacks or re-factorizes the clients' factors)"
        )
        fix = f"use fed.method {', '.join(registry.names_where(lambda c: c.mean_state))}"
        if self.fed.server_optimizer != "avg":
            raise ConfigError(
                field="fed.server_optimizer",
                value=self.fed.server_optimizer,
                what=f"needs a pseudo-gradient mean - global, but {why}",
                fix=f"{fix}, or fed.server_optimizer=avg",
            )
        if self.fed.wire_dtype == "int8":
            raise ConfigError(
                field="fed.wire_dtype",
                value="int8",
                what=f"sends changes of the global state, but {why}",
                fix=f"{fix}, or fed.wire_dtype float32, bfloat16 or float16",
            )

    def _check_client_ranks(self) -> None:
        """partition.client_ranks: one rank <= adapter.rank per client, for a method whose R is ordered by
        the basis' singular directions, on a wire that sends tensors (int8 sends changes of the full R)."""
        from fedsb.fed import registry

        ranks, name = self.partition.client_ranks, "partition.client_ranks"
        if ranks is None:
            return
        if not registry.card(self.fed.method).mixed_ranks:
            raise ConfigError(
                field=name,
                value=ranks,
                what=f"needs an R ordered by singular directions, but fed.method={self.fed.method} has none",
                fix="use fed.method=fedsb, or partition.client_ranks=null",
            )
        n = self.partition.num_clients
        if n is None:
            raise ConfigError(
                field=name,
                value=ranks,
                what="needs a known number of clients",
                fix="set partition.num_clients (the natural partition's count)",
            )
        if len(ranks) != n:
            raise ConfigError(
                field=name,
                value=ranks,
                what=f"has {len(ranks)} entries for partition.num_clients={n}",
                fix=f"give one rank per client ({n} entries)",
            )
        big = [r for r in ranks if r > self.adapter.rank]
        if big:
            raise ConfigError(
                field=name,
                value=ranks,
                what=f"holds {big[0]} > adapter.rank={self.adapter.rank}",
                fix=f"use ranks <= {self.adapter.rank}, or raise adapter.rank",
            )
        if self.fed.wire_dtype == "int8":
            raise ConfigError(
                field=name,
                value=ranks,
                what="does not work with fed.wire_dtype=int8 (its changes and scales are of the full R)",
                fix="use fed.wire_dtype float32, bfloat16 or float16, or partition.client_ranks=null",
            )

    def expected_clients_per_round(self) -> int:
        n = self.partition.num_clients
        if n is None:  # natural partition: known once the data is loaded
            return self.fed.min_clients
        cpr = self.fed.clients_per_round
        return min(n, int(cpr)) if cpr > 1 else max(1, round(cpr * n))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- building from dicts, YAML and overrides ------------------------------------------------------------


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {name: t for name, t in hints.items() if dataclasses.is_dataclass(t)}


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Coerce a YAML/CLI value to a field's annotated type (ints stay ints, '1e-3' becomes a float)."""
    if value is None:
        return None
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        for opt in options:
            try:
                return _coerce(value, opt, name)
            except (ConfigError, ValueError, TypeError):
                continue
        return value
    if annotation is Any or origin is Literal:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(field=name, value=value, fix="use true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(field=name, value=value, fix="use an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(field=name, value=value, fix="use an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(field=name, value=value, fix="use a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(field=name, value=value, fix="use a number such as 3e-3") from None
    if annotation is str:
        return value if isinstance(value, str) else str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}{unknown[0]}"
        raise ConfigError(
            field=where,
            value=data[unknown[0]],
            what="is not a known setting",
            fix=f"use one of: {', '.join(sorted(names))}",
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        t = hints[key]
        if dataclasses.is_dataclass(t):
            if not isinstance(value, dict):
                raise ConfigError(field=f"{prefix}{key}", value=value, fix="give a mapping of settings")
            kwargs[key] = _build(t, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, t, f"{prefix}{key}")
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested mapping (unknown keys are errors)."""
    return _build(RunConfig, data, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], '1e-3' parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(
            field="override", value=text, fix="write overrides as section.key=value, e.g. fed.rounds=5"
        )
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(field="override", value=text, fix="name the setting, e.g. fed.rounds=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        if raw.strip()[:1] not in ("{", "["):  # a plain string such as a path with ': ' in it
            return path, raw
        raise ConfigError(
            field=".".join(path),
            value=raw,
            what=f"is not valid YAML ({_yaml_problem(exc)})",
            fix="write mappings as {key: value, ...} and lists as [a, b], quoting strings with , : [ ] { }",
        ) from None
    return path, value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """'line L, column C: <problem>' from a YAML error (1-based, as editors count)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(problem)


def merge_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to a nested dict (returns a new dict)."""
    out = _deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(field=".".join(path), value=value, fix=f"{part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (_deepcopy(v) if isinstance(v, dict) else v) for k, v in d.items()}


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            field="--config",
            value=str(path),
            what="does not exist",
            fix="pass a YAML file, e.g. configs/default.yaml",
        )
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            field="--config",
            value=str(path),
            what=f"is not valid YAML at {_yaml_problem(exc)}",
            fix="correct the file there (indent sections by two spaces, close every [ and {)",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            field="--config", value=str(path), what=f"cannot be read ({exc})", fix="pass a readable YAML file"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(field="--config", value=str(path), fix="the file must hold a mapping of sections")
    return data


def resolve_config(config_file: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- overrides, validated; settings set but without effect (`config_audit`; an
    override counts even at its default value) are an error (privacy) or a logged warning."""
    from fedsb.config_audit import check_unused, given_keys

    data = merge_overrides(load_yaml(config_file) if config_file else {}, overrides or [])
    cfg = config_from_dict(data)
    check_unused(cfg, given_keys(merge_overrides({}, overrides or []), _section_types()))
    return cfg


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_fields() -> list[tuple[str, Any, str]]:
    """(dotted name, default, help) for every setting, for `fedsb run --help`."""
    rows: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(RunConfig):
        if f.name in _section_types():
            for g in dataclasses.fields(_section_types()[f.name]):
                default = g.default if g.default is not dataclasses.MISSING else g.default_factory()  # type: ignore[misc]
                rows.append((f"{f.name}.{g.name}", default, g.metadata.get("help", "")))
        else:
            rows.append((f.name, f.default, f.metadata.get("help", "")))
    return rows
