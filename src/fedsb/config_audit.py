"""Settings that another setting makes ineffective: an error for privacy settings, else a warning naming them.

A setting counts as *set* when its value differs from its default, or when the user's overrides give it
a non-null value (`given`: dotted keys, `given_keys`; `privacy.max_grad_norm=0.1` typed on the command
line was meant, default or not). A YAML file counts by its values only: it may be a saved config.yaml,
which holds every key, most at their defaults. So `privacy.target_epsilon=3` with `privacy.mode=none` is
an error wherever it comes from. Each rule lists the settings it covers, when they take
effect, why not otherwise, and the fix; `privacy.*` stands for every privacy field but the mode itself, so
fields added to `PrivacyConfig` later are covered without a new rule.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedsb.errors import ConfigError
from fedsb.fed import registry
from fedsb.privacy.mechanism import MECHANISMS, own_settings

RunConfig = Any  # a fedsb.config.RunConfig (not imported: fedsb.config imports this module)

log = logging.getLogger("fedsb.config")

_GRADIENT_ESTIMATE = tuple(
    f"init.{k}"
    for k in ("source", "server_size", "num_samples", "sample_fraction", "min_samples", "batch_size", "eta")
) + ("init.eta_rule",)


def _basis_init_setting(cfg: RunConfig) -> str:
    """The setting naming the method's basis init (its card's `basis_init`; init.method for the others)."""
    return registry.card(cfg.fed.method).basis_init or "init.method"


def _basis_methods() -> tuple[str, ...]:
    return registry.names_where(lambda c: c.basis_init is not None)


def _basis_init(cfg: RunConfig) -> str:
    """The basis init the method uses: lora-sb, lora-xs or random."""
    section, _, name = _basis_init_setting(cfg).partition(".")
    return getattr(getattr(cfg, section), name)


@dataclass(frozen=True)
class Rule:
    """`keys` take effect only when `used(cfg)`; otherwise setting them is an error or a warning."""

    keys: tuple[str, ...]
    used: Callable[[RunConfig], bool]
    because: Callable[[RunConfig], str]
    fix: str
    error: bool = False


def _privacy_rules() -> tuple[Rule, ...]:
    """Privacy settings without a DP mechanism, or of another mechanism (errors); settings a mechanism
    overrides (warnings). Each mechanism declares what it reads and overrides (`fedsb.privacy.mechanism`)."""
    dp = [m for m in MECHANISMS.values() if m.private]
    rules = [
        Rule(
            ("privacy.*",),
            lambda c: c.privacy.mechanism.private,
            lambda c: f"privacy.mode={c.privacy.mode} (the run is not private)",
            "set "
            + " or ".join(f"privacy.mode={m.name} ({m.short})" for m in dp)
            + ", or remove the privacy "
            "settings",
            error=True,
        )
    ]
    for m in dp:
        own = own_settings(m)
        if own:
            rules.append(
                Rule(
                    own,
                    lambda c, own=own: set(own) <= set(c.privacy.mechanism.reads),
                    lambda c, m=m, own=own: (
                        f"{'it configures' if len(own) == 1 else 'they configure'} {m.configures} "
                        f"(privacy.mode={m.name}); {c.privacy.mechanism.clipping}"
                    ),
                    f"remove {'it' if len(own) == 1 else 'them'}, or use privacy.mode={m.name}",
                    error=True,
                )
            )
    for m in dp:
        for o in m.overrides:
            rules.append(
                Rule(
                    o.keys,
                    lambda c, m=m, o=o: c.privacy.mechanism is not m or not o.applies(c),
                    lambda c, o=o: o.because,
                    o.fix,
                )
            )
    return tuple(rules)


RULES: tuple[Rule, ...] = (
    *_privacy_rules(),
    Rule(
        ("fed.clients_per_round",),
        lambda c: (
            c.fed.clients_per_round <= 1
            or c.partition.num_clients is None
            or int(c.fed.clients_per_round) <= c.partition.num_clients
        ),
        lambda c: (
            f"only partition.num_clients={c.partition.num_clients} clients exist; every round samples all"
        ),
        "use at most partition.num_clients clients, or a fraction such as 0.5",
    ),
    Rule(
        ("init.*",),
        lambda c: registry.card(c.fed.method).basis_init is not None,
        lambda c: (
            f"fed.method={c.fed.method} computes no basis (only {', '.join(_basis_methods())} read init.*)"
        ),
        "remove the init settings, or use fed.method=fedsb",
    ),
    Rule(
        ("init.method",),
        lambda c: _basis_init_setting(c) == "init.method",
        lambda c: f"fed.method={c.fed.method} takes its basis init from {_basis_init_setting(c)}",
        "set that setting instead of init.method",
    ),
    Rule(
        ("ravan.*",),
        lambda c: registry.card(c.fed.method).section == "ravan",
        lambda c: f"the ravan section configures fed.method=ravan, not {c.fed.method}",
        "remove the ravan settings, or use fed.method=ravan",
    ),
    Rule(
        ("adapter.*",),
        lambda c: registry.card(c.fed.method).adapters,
        lambda c: "fed.method=full trains every weight, without adapters",
        "remove the adapter settings, or use an adapter method",
    ),
    Rule(
        _GRADIENT_ESTIMATE,
        lambda c: _basis_init(c) == "lora-sb",
        lambda c: f"{_basis_init_setting(c)}={_basis_init(c)} needs no gradient estimate (only lora-sb does)",
        "remove them, or use lora-sb as the basis init",
    ),
    Rule(
        ("init.svd", "init.oversample", "init.power_iters"),
        lambda c: _basis_init(c) != "random",
        lambda c: f"{_basis_init_setting(c)}=random draws its bases without an SVD",
        "remove them, or use lora-sb or lora-xs as the basis init",
    ),
    Rule(
        ("init.oversample",),
        lambda c: (
            c.init.svd == "randomized" or (c.init.source == "federated" and c.init.exchange == "sketch")
        ),
        lambda c: "init.svd=exact computes the SVD without oversampling (and no federated sketch is taken)",
        "remove it, or use init.svd=randomized or init.source=federated with init.exchange=sketch",
    ),
    Rule(
        ("init.power_iters",),
        lambda c: (
            c.init.svd == "randomized" and not (c.init.source == "federated" and c.init.exchange == "sketch")
        ),
        lambda c: (
            "init.svd=exact computes the SVD without power iterations"
            if c.init.svd == "exact"
            else "the federated sketch takes none (each would cost two more exchanges)"
        ),
        "remove it, or use init.svd=randomized",
    ),
    Rule(
        ("init.exchange",),
        lambda c: c.init.source == "federated",
        lambda c: f"init.source={c.init.source} exchanges nothing with the clients for the init",
        "remove it, or use init.source=federated",
    ),
    Rule(
        ("init.clip_norm", "init.noise_multiplier"),
        lambda c: c.init.source == "federated" and c.privacy.enabled,
        lambda c: "they privatize the federated init's releases (init.source=federated under DP)",
        "remove them, or use init.source=federated with privacy.mode=sample",
    ),
    Rule(
        ("init.server_size",),
        lambda c: c.init.source == "server",
        lambda c: (
            f"init.source={c.init.source} estimates the gradient on the clients' "
            + ("pooled data" if c.init.source == "pooled" else "own data, on each client")
        ),
        "remove init.server_size, or use init.source=server",
    ),
    Rule(
        ("init.sample_fraction", "init.min_samples"),
        lambda c: c.init.num_samples is None,
        lambda c: f"init.num_samples={c.init.num_samples} fixes the sample size",
        "remove them, or set init.num_samples=null",
    ),
    Rule(
        ("init.eta",),
        lambda c: c.init.eta_rule == "fixed",
        lambda c: "init.eta_rule=official derives the step size from train.lr and train.warmup_ratio",
        "remove init.eta, or use init.eta_rule=fixed",
    ),
    Rule(
        ("train.momentum",),
        lambda c: c.train.optimizer == "sgd",
        lambda c: f"train.optimizer={c.train.optimizer} has no momentum setting (sgd only)",
        "remove train.momentum, or use train.optimizer=sgd",
    ),
    Rule(
        ("train.betas", "train.eps"),
        lambda c: c.train.optimizer == "adamw",
        lambda c: f"train.optimizer={c.train.optimizer} has no betas or eps (adamw only)",
        "remove them, or use train.optimizer=adamw",
    ),
    Rule(
        ("fed.server_lr",),
        lambda c: c.fed.server_optimizer != "avg",
        lambda c: "fed.server_optimizer=avg installs the weighted mean itself, without a server step",
        "remove fed.server_lr, or use fed.server_optimizer avgm, adam or yogi",
    ),
    Rule(
        ("fed.server_momentum",),
        lambda c: c.fed.server_optimizer == "avgm",
        lambda c: f"fed.server_optimizer={c.fed.server_optimizer} has no momentum setting (avgm only)",
        "remove fed.server_momentum, or use fed.server_optimizer=avgm",
    ),
    Rule(
        ("fed.server_betas", "fed.server_eps"),
        lambda c: c.fed.server_optimizer in ("adam", "yogi"),
        lambda c: f"fed.server_optimizer={c.fed.server_optimizer} has no betas or eps (adam and yogi only)",
        "remove them, or use fed.server_optimizer=adam or yogi",
    ),
    Rule(
        ("fed.wire_scale", "fed.error_feedback"),
        lambda c: c.fed.wire_dtype == "int8",
        lambda c: f"fed.wire_dtype={c.fed.wire_dtype} sends the tensors themselves, unquantized",
        "remove them, or use fed.wire_dtype=int8",
    ),
    Rule(
        ("train.schedule_scope",),
        lambda c: c.train.schedule != "constant" or c.train.warmup_ratio > 0,
        lambda c: "train.schedule=constant with train.warmup_ratio=0 has no schedule to restart",
        "remove train.schedule_scope, or use a decaying train.schedule or a warm-up",
    ),
    Rule(
        ("partition.alpha",),
        lambda c: c.partition.scheme in ("dirichlet", "quantity"),
        lambda c: f"partition.scheme={c.partition.scheme} draws no Dirichlet shares",
        "remove partition.alpha, or use partition.scheme=dirichlet or quantity",
    ),
    Rule(
        ("partition.column",),
        lambda c: c.partition.scheme in ("dirichlet", "natural"),
        lambda c: f"partition.scheme={c.partition.scheme} does not partition by a column",
        "remove partition.column, or use partition.scheme=dirichlet or natural",
    ),
    Rule(
        ("eval.normalize",),
        lambda c: c.eval.scorer != "generate",
        lambda c: "eval.scorer=generate scores decoded answers, not option log-likelihoods",
        "remove eval.normalize, or use eval.scorer=likelihood",
    ),
    Rule(
        ("eval.max_new_tokens",),
        lambda c: c.eval.scorer != "likelihood",
        lambda c: "eval.scorer=likelihood generates no tokens",
        "remove eval.max_new_tokens, or use eval.scorer=generate",
    ),
)


@dataclass(frozen=True)
class Unused:
    """Settings one rule found set but ineffective in this configuration."""

    settings: tuple[tuple[str, Any], ...]  # (dotted key, value)
    because: str
    fix: str
    error: bool

    def message(self) -> str:
        names = ", ".join(f"{k}={v!r}" for k, v in self.settings)
        verb = "has" if len(self.settings) == 1 else "have"
        return f"{names} {verb} no effect: {self.because}; fix: {self.fix}"

    def as_error(self) -> ConfigError:
        (key, value), others = self.settings[0], self.settings[1:]
        also = (
            f" (nor {'have' if len(others) > 1 else 'has'} {', '.join(k for k, _ in others)})"
            if others
            else ""
        )
        return ConfigError(field=key, value=value, what=f"has no effect: {self.because}{also}", fix=self.fix)


def given_keys(data: Mapping[str, Any], sections: Iterable[str]) -> frozenset[str]:
    """Dotted keys of a user's nested config mapping (a section's own keys; data.options is one key)."""
    names = set(sections)
    out = set()
    for key, value in data.items():
        if key in names and isinstance(value, Mapping):
            out.update(f"{key}.{k}" for k in value)
        else:
            out.add(key)
    return frozenset(out)


def _expand(cfg: RunConfig, key: str) -> list[str]:
    section, _, name = key.partition(".")
    if name != "*":
        return [key]
    switch = "mode" if section == "privacy" else None  # privacy.* means every privacy field but the mode
    return [f"{section}.{f.name}" for f in dataclasses.fields(getattr(cfg, section)) if f.name != switch]


def _is_set(cfg: RunConfig, key: str, given: frozenset[str]) -> tuple[bool, Any]:
    section, _, name = key.partition(".")
    obj = getattr(cfg, section)
    value = getattr(obj, name)
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return (value != default or (key in given and value is not None)), value


def unused_settings(cfg: RunConfig, given: frozenset[str] = frozenset()) -> list[Unused]:
    """Every rule's set-but-ineffective settings (a key reported once, by the first rule that finds it)."""
    found: list[Unused] = []
    reported: set[str] = set()
    for rule in RULES:
        if rule.used(cfg):
            continue
        hits = []
        for key in (k for pattern in rule.keys for k in _expand(cfg, pattern)):
            is_set, value = _is_set(cfg, key, given)
            if is_set and key not in reported:
                hits.append((key, value))
                reported.add(key)
        if hits:
            found.append(Unused(tuple(hits), rule.because(cfg), rule.fix, rule.error))
    return found


def check_unused(cfg: RunConfig, given: frozenset[str] = frozenset(), *, warn: bool = True) -> list[str]:
    """Raise the first error (a privacy setting that does nothing); log each warning (with `warn`) and
    return the warning messages."""
    found = unused_settings(cfg, given)
    for item in found:
        if item.error:
            raise item.as_error()
    messages = [item.message() for item in found]
    if warn:
        for text in messages:
            log.warning("%s", text)
    return messages
