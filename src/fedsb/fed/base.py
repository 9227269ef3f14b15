"""The interface every federated method implements, in two parts, and the weighted-mean aggregator.

`ServerRule` (the server's side): what the server broadcasts each round (`download`) and once
(`setup_payload`), what an update must contain (`upload_spec`), how it combines a round's updates
(`new_aggregator`) and how the result becomes the new global model (`apply`), and what it checkpoints.
`ClientContract` (a client's side): install a download (`client_receive`), say what it sends
(`client_upload`) and which shared basis it holds (`client_fingerprint`). `FederatedMethod` is both, plus
how the method is built (`create`, `from_setup`, `inject`); every member has a FedAvg default except
`create`. The round loop, the simulator and the Flower app only talk to these. What a method supports
(DP, SecAgg+, Flower, int8, its comm formula) is on its card in `fedsb.fed.registry` (`card()`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from fedsb.adapters.inject import AdaptedModel
from fedsb.errors import FedsbError
from fedsb.fed import registry

if TYPE_CHECKING:
    from fedsb.config import RunConfig

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What arrives from one client in one round (tensors in the wire dtype)."""

    client_id: str
    round: int
    num_examples: int
    tensors: Tensors
    basis_fingerprint: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class WeightedMean:
    """Streaming sum_i w_i T_i / sum_i w_i per tensor, accumulated in float64 in one flat buffer.

    w_i = N_i (weighting='examples') or 1 ('uniform'). One instance per round: nothing from an earlier
    round can leak into this round's aggregate. All updates must carry the same tensor names and shapes
    (the round loop validates them first).
    """

    def __init__(self, weighting: str = "examples") -> None:
        if weighting not in ("examples", "uniform"):
            raise FedsbError(field="fed.weighting", value=weighting, fix="use 'examples' or 'uniform'")
        self.weighting = weighting
        self.layout: list[tuple[str, torch.Size]] = []
        self.flat_sum: torch.Tensor | None = None  # (sum of numel,) float64
        self.total_weight = 0.0
        self.count = 0

    def weight_of(self, num_examples: int) -> float:
        return float(num_examples) if self.weighting == "examples" else 1.0

    def add(self, tensors: Mapping[str, torch.Tensor], num_examples: int) -> None:
        if self.flat_sum is None:
            self.layout = [(k, t.shape) for k, t in tensors.items()]
            self.flat_sum = torch.zeros(sum(t.numel() for t in tensors.values()), dtype=torch.float64)
        flat = torch.cat([tensors[k].detach().reshape(-1) for k, _ in self.layout]).to(torch.float64)
        self.flat_sum.add_(flat, alpha=self.weight_of(num_examples))
        self.total_weight += self.weight_of(num_examples)
        self.count += 1

    def result(self) -> Tensors:
        if self.flat_sum is None:
            raise RuntimeError("no updates were aggregated")
        mean = (self.flat_sum / self.total_weight).to(torch.float32)
        out: Tensors = {}
        offset = 0
        for k, shape in self.layout:
            n = shape.numel()
            out[k] = mean[offset : offset + n].reshape(shape).clone()
            offset += n
        return out


@dataclass
class SetupContext:
    """What a method needs to build its adapted model: the config, seeds, and (for LoRA-SB) init data.

    `setup_dir` holds the one-time setup (Fed-SB's basis) so a resumed run loads it instead of recomputing.
    `data_info` describes the init data (`PreparedData.init_info`: source, federated, pool_size,
    num_samples, note); it is read, never written: what the setup did comes back as the method's
    `init_report`.
    """

    cfg: RunConfig
    init_batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]] | None = None
    num_samples: int | None = None
    loss_fn: Callable[..., torch.Tensor] | None = None
    setup_dir: Path | None = None
    resume: bool = False
    data_info: Mapping[str, Any] = field(default_factory=dict)
    #: client id -> its data (`ClientData`): the parties of init.source=federated
    clients: Mapping[str, Any] | None = None
    #: init.source=federated: (every client id in partition order, the init's `InitClient`s) -> how to reach
    #: them (`fedsb.init.federated.InitParties`; None: in process); the Flower ServerApp's goes over the Grid
    init_parties: Callable[[list[str], list[Any]], Any] | None = None


@dataclass(frozen=True)
class InitReport:
    """What a method's one-time setup read and computed (results.json's and the manifest's "init").

    `used_data`: it read the configured init data (whose source, size and note then stand); otherwise it
    read none and `note` says what it did instead. `basis`: eta, eta_rule, method and seconds of a computed
    basis (empty: none)."""

    used_data: bool = False
    note: str = "no initialization data read"
    basis: Mapping[str, Any] = field(default_factory=dict)

    def describe(self, data_info: Mapping[str, Any]) -> dict[str, Any]:
        """`data_info` (the init data's description) as this setup used it."""
        out = dict(data_info)
        if not self.used_data:
            out.update(num_samples=0, federated=True, note=self.note)
        out.update(self.basis)
        return out


class ServerRule:
    """The server's side of a method: its global state and how a round's updates change it.

    The default is FedAvg of the trainable tensors: download the global trainable state, aggregate the
    uploads with a weighted mean, install it. Methods whose rule differs (folding residuals, stacking
    factors, re-factorizing) override `new_aggregator`, `apply` and `download`.
    """

    adapted: AdaptedModel
    weighting: str
    state: Tensors  # the global trainable state (fp32)

    # ---- one-time setup ----------------------------------------------------------------------------------
    @property
    def basis_fingerprint(self) -> str | None:
        """Fingerprint of the shared frozen basis every update must carry (None: nothing shared)."""
        return None

    def verify_basis(self, before: str) -> None:
        """Raise if the server model's shared basis changed since it was set up (nothing to check here)."""
        return None

    def setup_payload(self) -> Tensors:
        """Tensors every client receives once before round 1 (e.g. Fed-SB's B and A)."""
        return {}

    # ---- per round --------------------------------------------------------------------------------------
    def download(self, since: int | None = None) -> Tensors:
        """What the server sends every sampled client at the start of a round.

        `since`: the last round whose update every receiving client is known to have applied; methods that
        fold updates into W0 also send every fold after it (None: the last round's only). Others ignore it.
        """
        return {k: v.clone() for k, v in self.state.items()}

    def release_history(self, applied_by_all: int) -> None:
        """Forget per-round history every client has applied through round `applied_by_all` (none here)."""
        return None

    def upload_spec(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor an update must contain (nothing more, nothing less)."""
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def new_aggregator(self) -> WeightedMean:
        return WeightedMean(self.weighting)

    def apply(self, aggregate: Tensors, round: int) -> None:
        """Make round `round`'s aggregate the new global state and install it in the server's model."""
        self.state = {k: v.clone() for k, v in aggregate.items()}
        self.adapted.set_state(self.state)

    def install_global(self) -> None:
        """Put the global state into the server's model (before evaluation or export)."""
        self.adapted.set_state(self.state)

    def untuned_state(self) -> Tensors:
        """A trainable state under which the model computes exactly W0 (for the 'before' evaluation)."""
        return {k: v.clone() for k, v in self.state.items()}

    # ---- checkpointing ------------------------------------------------------------------------------------
    def state_tensors(self) -> Tensors:
        """Everything the server must checkpoint to resume (the global state, and any folds)."""
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.state) - set(tensors)
        if missing:
            raise KeyError(f"checkpoint lacks global tensors: {sorted(missing)[:3]}")
        self.state = {k: tensors[k].to(torch.float32).clone() for k in self.state}
        self.install_global()


class ClientContract:
    """A client's side of a method: install what the server sent, say what goes back. The simulator and the
    Flower client call these on the client's own adapted model (the server's copy of the method only
    supplies the rule; `self` holds no client state)."""

    upload_spec: Callable[[], dict[str, tuple[int, ...]]]  # the server rule's: what an update must contain

    def client_fingerprint(self, adapted: AdaptedModel) -> str | None:
        """Client side: the fingerprint of the basis `adapted` holds now (None: nothing shared)."""
        return None

    def client_receive(self, adapted: AdaptedModel, payload: Mapping[str, torch.Tensor], round: int) -> None:
        """Client side: install the downloaded global state before training round `round`."""
        adapted.set_state({k: v.to(torch.float32) for k, v in payload.items()})

    def client_upload(self, adapted: AdaptedModel) -> Tensors:
        """Client side: what it sends after local training (the tensors the rule's `upload_spec` names)."""
        return adapted.get_state(self.upload_spec())


class FederatedMethod(ServerRule, ClientContract, ABC):
    """One federated method: its server rule, its client contract, and how it is built on a model.

    `create` (the server, or the simulator's shared model) injects the adapters and does the one-time setup,
    recording what it read in `init_report`; a Flower client rebuilds the method with `from_setup` from the
    server's `setup_payload`; `inject` describes the adapters without initializing them (planning).
    `name` is the key of its card in `fedsb.fed.registry`; `exact` whether its aggregate equals the mean of
    the clients' updates (tested for every method).
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    default_scaling: ClassVar[float] = 1.0

    def __init__(self, adapted: AdaptedModel, *, weighting: str = "examples") -> None:
        self.adapted = adapted
        self.weighting = weighting
        self.state = adapted.get_state()
        self.init_report = InitReport()  # what the one-time setup read (set by `create`)

    @classmethod
    def card(cls) -> registry.MethodCard:
        """What this method supports (torch-free, registered under `name`)."""
        return registry.card(cls.name)

    @classmethod
    @abstractmethod
    def create(cls, model: nn.Module, ctx: SetupContext) -> FederatedMethod:
        """Inject this method's adapters into `model` (the server's, or the shared simulator model)."""

    @classmethod
    def from_setup(
        cls, model: nn.Module, cfg: RunConfig, setup: Mapping[str, torch.Tensor], fingerprint: str
    ) -> FederatedMethod:
        """A client's copy of the method from the server's one-time setup payload (its frozen basis).

        Only methods with a `setup_payload` (and a `basis_fingerprint`) receive one."""
        raise FedsbError(
            field="setup payload",
            value=cls.name,
            what="was sent a frozen basis, but this method has none",
            fix="use the same fedsb version on the server and on every client",
        )

    @classmethod
    def inject(cls, model: nn.Module, cfg: RunConfig) -> AdaptedModel:
        """This method's adapter layers on `model` with placeholder values: shapes, dtypes, devices and what
        trains are exact, nothing is initialized (planning a run on a meta-device model: `fedsb.plan`)."""
        raise NotImplementedError(f"{cls.__name__} does not describe its adapters for planning")

    @classmethod
    def scaling_of(cls, cfg: RunConfig) -> float:
        """s = adapter.scaling, or the method's default when it is null."""
        return cls.default_scaling if cfg.adapter.scaling is None else float(cfg.adapter.scaling)


def get_method_class(name: str) -> type[FederatedMethod]:
    """The method class registered under `name` (its card's `implementation`)."""
    return registry.resolve(registry.card(name).implementation)
