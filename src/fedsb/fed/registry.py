"""The federated methods by name: one card each, torch-free, and every name list derived from the cards.

A method is two things. Its class (`fedsb.fed.base.FederatedMethod`, with torch) holds the rules: what
trains, what travels, how the server combines and installs the updates, whether that is exact. Its card
(`MethodCard`, here) holds what the rest of fedsb must know about it WITHOUT importing torch: its display
name, what it supports (client-level DP, SecAgg+, server optimizers and int8 deltas, DP-SGD, a quantized
base, Flower), which settings it reads, and its per-round communication formula for `fedsb comm`. The
config checks, `fedsb compare`, `fedsb comm`, the Flower client and the privacy mechanisms ask the cards
(`card`, `method_names`, `names_where`); none keeps a list of its own. A method's class finds its card
under its `name` (`FederatedMethod.card()`).

Adding a method: its class in `fedsb/fed/<name>.py` and a `register(MethodCard(...))` here (or, for a
method outside the package, anywhere before the config naming it is loaded).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedsb.errors import FedsbError


@dataclass(frozen=True)
class MethodCard:
    """What one method supports, torch-free (every field is read by exactly the check named with it).

    `implementation` and `comm` are objects or "module:attribute" references (loaded lazily, so listing the
    cards imports neither torch nor the method modules).
    """

    name: str  # fed.method
    display_name: str  # in `fedsb comm` tables
    implementation: str | type  # the FederatedMethod subclass (`fedsb.fed.base.get_method_class`)
    #: the aggregate is a weighted mean of the tensors clients send: client-level DP (privacy.mode=client)
    #: can clip and noise it, SecAgg+ can compute it (`privacy.mechanism.ClientLevel`, `flower.secagg`)
    mean_aggregate: bool
    #: the global state is that mean and is what every download carries: server optimizers
    #: (fed.server_optimizer) step it and int8 wire deltas (fed.wire_dtype=int8) are changes of it (config)
    mean_state: bool
    #: every round's update is folded into each party's W0 (a Flower run cannot be resumed: flower.client)
    folds: bool = False
    #: why it cannot run over Flower (None: it can; `flower.client.check_flower_config`)
    flower_refusal: str | None = None
    #: the setting naming its basis init (lora-sb, lora-xs, random) when its setup computes a frozen basis;
    #: None: it ignores init.* (config_audit)
    basis_init: str | None = None
    #: its own config section, read only with this method (config_audit)
    section: str | None = None
    #: False: it trains every weight without adapters and ignores adapter.* (config_audit)
    adapters: bool = True
    #: why DP-SGD (privacy.mode=sample) cannot train it (None: it can; `privacy.mechanism.RecordLevel`)
    sample_dp_refusal: str | None = None
    #: why it cannot train on a 4/8-bit frozen base (model.quantize; None: it can; `job.check_quantized_method`)
    quantized_base_refusal: str | None = None
    #: per client per round counts (shapes, rank, clients, head_params, **options) -> `comm.formulas.MethodComm`;
    #: None: `fedsb comm` has no row for it (`fedsb run --dry-run` then counts the trained tensors both ways)
    comm: str | Callable[..., Any] | None = None
    #: keywords of `comm_table` its formula also takes (RAVAN: heads)
    comm_options: tuple[str, ...] = ()
    #: tensors per adapted module (per head, with a `heads` option) in an int8 message, each with one fp32
    #: scale; 0: int8 does not apply (its global state is not the mean of the uploads)
    int8_tensors: int = 0
    #: its R is ordered by the shared basis' singular directions, so a client of rank r_i can train and send
    #: only the leading r_i x r_i block (partition.client_ranks: config, `fedsb.fed.mixed_rank`, `fedsb comm`)
    mixed_ranks: bool = False


_CARDS: dict[str, MethodCard] = {}


def register(card: MethodCard) -> MethodCard:
    """Add `card` under `card.name` (a name registered twice is refused)."""
    if card.name in _CARDS:
        raise FedsbError(
            field="method name", value=card.name, what="is registered already", fix="pick another"
        )
    _CARDS[card.name] = card
    return card


def unregister(name: str) -> None:
    """Remove the method `name` (tests register throw-away methods)."""
    del _CARDS[name]


def method_names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_CARDS)


def names_where(predicate: Callable[[MethodCard], bool]) -> tuple[str, ...]:
    """The registered methods whose card satisfies `predicate`."""
    return tuple(name for name, c in _CARDS.items() if predicate(c))


def card(name: str) -> MethodCard:
    """The card of method `name` (FedsbError naming fed.method otherwise)."""
    if name not in _CARDS:
        raise FedsbError(field="fed.method", value=name, fix=f"use one of: {', '.join(_CARDS)}")
    return _CARDS[name]


def resolve(ref: str | Any) -> Any:
    """A "module:attribute" reference loaded (an object is returned as it is)."""
    if not isinstance(ref, str):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


_FORMULAS = "fedsb.comm.formulas"
_FOLDS_W0 = "it folds a dense update into W0 every round, which a 4/8-bit W0 cannot hold without requantizing"
# in the paper's table order (the order of `fedsb comm`'s rows), then full fine-tuning
for _card in (
    MethodCard("fedit", "FedIT", "fedsb.fed.fedit:FedIT", mean_aggregate=True, mean_state=True,
               comm=f"{_FORMULAS}:fedit", int8_tensors=2),
    MethodCard("ffa", "FFA-LoRA", "fedsb.fed.ffa:FFALoRA", mean_aggregate=True, mean_state=True,
               comm=f"{_FORMULAS}:ffa", int8_tensors=1),
    MethodCard("fedex", "FedEx-LoRA", "fedsb.fed.fedex:FedExLoRA", mean_aggregate=False, mean_state=False,
               folds=True, quantized_base_refusal=_FOLDS_W0, comm=f"{_FORMULAS}:fedex"),
    MethodCard("flora", "FLoRA", "fedsb.fed.flora:FLoRA", mean_aggregate=False, mean_state=False,
               folds=True, quantized_base_refusal=_FOLDS_W0, comm=f"{_FORMULAS}:flora"),
    MethodCard("fedsb", "Fed-SB", "fedsb.fed.fedsb:FedSB", mean_aggregate=True, mean_state=True,
               basis_init="init.method", comm=f"{_FORMULAS}:fedsb", int8_tensors=1, mixed_ranks=True),
    MethodCard("ravan", "RAVAN", "fedsb.fed.ravan:Ravan", mean_aggregate=True, mean_state=True,
               basis_init="ravan.init", section="ravan", comm=f"{_FORMULAS}:ravan", comm_options=("heads",),
               int8_tensors=1),
    MethodCard("fedsvd", "FedSVD", "fedsb.fed.fedsvd:FedSVD", mean_aggregate=True, mean_state=False,
               comm=f"{_FORMULAS}:fedsvd"),
    MethodCard("full", "full fine-tuning", "fedsb.fed.full:FullFineTune", mean_aggregate=True,
               mean_state=True, adapters=False,
               sample_dp_refusal="Opacus rejects trainable modules with buffers",
               quantized_base_refusal="it trains every weight of the base, and 4/8-bit weights do not train"),
):  # fmt: skip
    register(_card)
