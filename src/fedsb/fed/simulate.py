"""In-process simulator: every client trains on ONE shared frozen base model, one after another.

A client's own state is its data and, if train.keep_optimizer_state, its optimizer state; its trainable
tensors are loaded from the download before it trains, so nothing leaks between clients. Each client
hashes the basis its model actually holds before it trains (the update carries that fingerprint, so the
server's check is real), and under DP its update carries only what `fedsb.privacy.release` allows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedsb.adapters.inject import AdaptedModel
from fedsb.config import TrainConfig
from fedsb.fed.base import ClientUpdate, FederatedMethod, Tensors
from fedsb.fed.checkpoint import flatten_optimizer_state, unflatten_optimizer_state
from fedsb.fed.mixed_rank import BlockTraining, ClientRanks
from fedsb.fed.rounds import decode, encode
from fedsb.fed.wire import WIRE_DTYPES, ClientInt8
from fedsb.privacy.release import ReleaseRules
from fedsb.seeding import derive_seed
from fedsb.train.local import LossFn, StepPlan, causal_lm_loss, steps_for, train_local
from fedsb.train.schedule import round_schedule

if TYPE_CHECKING:  # Opacus loads only when DP-SGD is used
    from fedsb.privacy.ledger import PrivacyLedger
    from fedsb.privacy.mechanism import PrivacyMechanism

log = logging.getLogger("fedsb.simulate")

Batch = Mapping[str, torch.Tensor]
WIRE_KEY = "__wire__"  # the int8 wire's client states in `state_dict`


@dataclass
class ClientData:
    """A client's training data: its size N_i and `loader(seed)` giving one epoch of batches in a seeded order."""

    num_examples: int
    loader: Callable[[int], Iterable[Batch]]


class InProcessExecutor:
    """Trains the sampled clients sequentially on the shared model and yields their updates."""

    def __init__(
        self,
        method: FederatedMethod,
        adapted: AdaptedModel,
        clients: Mapping[str, ClientData],
        train_cfg: TrainConfig,
        *,
        rounds: int,
        seed: int,
        wire_dtype: str = "float32",
        wire_scale: str = "tensor",
        error_feedback: bool = False,
        loss_fn: LossFn = causal_lm_loss,
        progress: bool = False,
        privacy: PrivacyLedger | None = None,
        mechanism: PrivacyMechanism | None = None,
        client_ranks: ClientRanks | None = None,
    ) -> None:
        self.method = method
        self.adapted = adapted
        self.clients = dict(clients)
        self.cfg = train_cfg
        self.rounds = rounds
        self.seed = seed
        self.wire_dtype = WIRE_DTYPES[wire_dtype]
        self.wire_scale = wire_scale
        self.error_feedback = error_feedback
        #: int8 wire: each client's reconstruction of the global state and its rounding error
        self.wire_clients: dict[str, ClientInt8] = {}
        self.loss_fn = loss_fn
        self.progress = progress
        self.privacy = privacy  # the run's accounts (DP-SGD: one per client), persisted across rounds
        # what a client may send (fedsb.privacy.release); under DP its losses and timings stay here
        self.release = mechanism.release if mechanism is not None else ReleaseRules()
        self.optimizer_states: dict[str, dict[str, Any]] = {}
        self.client_ranks = client_ranks  # partition.client_ranks: who trains and sends only R[:r_i, :r_i]

    def train_round(self, round: int, client_ids: Sequence[str], download: Tensors) -> Iterator[ClientUpdate]:
        for cid in client_ids:
            yield self.train_client(round, cid, download)

    def train_client(self, round: int, cid: str, download: Tensors) -> ClientUpdate:
        """One client's round: load the global state, train locally, return its (wire-encoded) update."""
        data = self.clients[cid]
        dp = self.privacy.dpsgd_for(cid) if self.privacy is not None else None
        privacy_metrics: dict[str, float] = {}
        self.method.client_receive(self.adapted, self.receive(cid, download), round)
        fingerprint = self.method.client_fingerprint(self.adapted)  # of the basis this model trains on
        steps = steps_for(data.num_examples, self.cfg)
        schedule, offset = round_schedule(
            base_lr=self.cfg.lr,
            kind=self.cfg.schedule,
            warmup_ratio=self.cfg.warmup_ratio,
            scope=self.cfg.schedule_scope,
            steps_per_round=steps,
            rounds=self.rounds,
            round=round,
        )

        def make_epoch(epoch: int) -> Iterable[Batch]:
            return data.loader(derive_seed(self.seed, "data", cid, round, epoch))

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"  {cid} steps", leave=False)
        params = self.adapted.trainable_parameters()
        block = self.client_ranks.train_block(cid, params) if self.client_ranks is not None else None
        try:
            result, opt_state = train_local(
                self.adapted.model,
                params,
                make_epoch,
                self.cfg,
                StepPlan(
                    steps=steps,
                    schedule=schedule,
                    step_offset=offset,
                    optimizer_state=self.optimizer_states.get(cid) if self.cfg.keep_optimizer_state else None,
                    seed=derive_seed(self.seed, "dropout", cid, round),
                    on_step=_step_callback(bar, block),
                ),
                loss_fn=self.loss_fn,
                privacy=dp,
            )
        finally:
            if block is not None:
                block.close()
        if bar is not None:
            bar.close()
        if dp is not None:
            from fedsb.privacy.dpsgd import private_state

            privacy_metrics = private_state(dp)
        if self.cfg.keep_optimizer_state:
            self.optimizer_states[cid] = opt_state
        metrics = {
            "loss": result.mean_loss,
            "first_loss": result.losses[0] if result.losses else float("nan"),
            "steps": result.steps,
            "seconds": result.seconds,
            **privacy_metrics,
        }
        if self.release.private:
            log.debug("%s round %d (kept on the client under DP): %s", cid, round, metrics)
            metrics = self.release.metrics(metrics)
        return ClientUpdate(
            client_id=cid,
            round=round,
            num_examples=data.num_examples,
            tensors=self.upload(cid, self.client_tensors(cid)),
            basis_fingerprint=fingerprint,
            metrics=metrics,
        )

    def client_tensors(self, cid: str) -> Tensors:
        """What the method uploads, each R cut to the client's block under partition.client_ranks."""
        tensors = self.method.client_upload(self.adapted)
        return self.client_ranks.crop(cid, tensors) if self.client_ranks is not None else tensors

    # ---- the wire, client side ------------------------------------------------------------------------------
    def receive(self, cid: str, download: Tensors) -> Tensors:
        """The global state a client trains from: the download in fp32, or its int8 reconstruction."""
        if self.wire_dtype != torch.int8:
            return decode(download)
        if cid not in self.wire_clients:
            self.wire_clients[cid] = ClientInt8(self.wire_scale, self.error_feedback)
        return self.wire_clients[cid].receive(download)

    def upload(self, cid: str, tensors: Tensors) -> Tensors:
        """What the client sends: its tensors in the wire dtype, or their int8 change (with scales)."""
        if self.wire_dtype != torch.int8:
            return encode(tensors, self.wire_dtype)
        return self.wire_clients[cid].upload(tensors)

    # ---- client-side state for checkpoints ------------------------------------------------------------------
    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        """(tensors keyed `<client>/<param>/<key>` and `__wire__/<client>/...`, on the CPU; JSON metadata)
        of the kept optimizer states and the int8 wire's client side."""
        tensors: Tensors = {}
        meta: dict[str, Any] = {}
        for cid, state in self.optimizer_states.items():
            t, m = flatten_optimizer_state(cid, state)
            tensors.update(t)
            meta[cid] = m
        if self.wire_clients:
            meta[WIRE_KEY] = {}
            for cid, client in self.wire_clients.items():
                t, meta[WIRE_KEY][cid] = client.state_dict()
                tensors.update({f"{WIRE_KEY}/{cid}/{k}": v for k, v in t.items()})
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Inverse of `state_dict` (the optimizer moves each state tensor to its parameter's device)."""
        self.optimizer_states = {
            cid: unflatten_optimizer_state(cid, dict(tensors), m)
            for cid, m in meta.items()
            if cid != WIRE_KEY
        }
        self.wire_clients = {}
        for cid, m in meta.get(WIRE_KEY, {}).items():
            prefix = f"{WIRE_KEY}/{cid}/"
            client = ClientInt8(self.wire_scale, self.error_feedback)
            client.load_state_dict(
                {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}, m
            )
            self.wire_clients[cid] = client


def _step_callback(bar: Any, block: BlockTraining | None) -> Callable[[int, float], None] | None:
    """After each optimizer step: hold R outside the client's block (mixed ranks), advance the bar."""
    if bar is None and block is None:
        return None

    def on_step(k: int, loss: float) -> None:
        if block is not None:
            block.project()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")

    return on_step
