"""The one round loop: sample, broadcast, train, validate, aggregate, evaluate, checkpoint.

Shared by the in-process simulator and the Flower app: both provide a `ClientExecutor` that turns a
round's download into client updates; everything else happens here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from fedsb.errors import CheckpointError, UpdateRejected
from fedsb.fed.base import ClientUpdate, FederatedMethod, Tensors
from fedsb.fed.ledger import Ledger
from fedsb.fed.mixed_rank import ClientRanks
from fedsb.fed.sampling import ClientSampler
from fedsb.fed.server_opt import ServerOptimizer
from fedsb.fed.validate import validate_update
from fedsb.fed.wire import cast, server_wire
from fedsb.privacy.release import ReleaseRules

log = logging.getLogger("fedsb.rounds")


class RoundFailed(RuntimeError):
    """Fewer than `min_clients` usable updates arrived in a round."""


class ClientExecutor(Protocol):
    """Runs local training for the sampled clients and yields their updates as they arrive.

    An executor with `secure_aggregation = True` instead offers `aggregate_round(round, client_ids,
    download, upload_spec) -> (weighted mean of the updates | None, ids of the clients in it)`: the server
    then never sees a single update (SecAgg+, `fedsb.flower.secagg.SecAggExecutor`).
    """

    def train_round(
        self, round: int, client_ids: Sequence[str], download: Tensors
    ) -> Iterator[ClientUpdate]: ...


encode = cast  # a float wire dtype: what actually travels, on the CPU


def decode(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Back to fp32 for training and aggregation."""
    return {k: v.to(torch.float32) for k, v in tensors.items()}


@dataclass
class RoundRecord:
    """What happened in one round (stored in the results and in checkpoints)."""

    round: int
    sampled: list[str]
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    train_loss: float = float("nan")
    eval: dict[str, Any] | None = None
    privacy: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Server:
    """Server-side round logic around a `FederatedMethod`; holds no model code of its own."""

    def __init__(
        self,
        method: FederatedMethod,
        sampler: ClientSampler,
        ledger: Ledger,
        *,
        wire_dtype: str = "float32",
        wire_scale: str = "tensor",
        min_clients: int = 1,
        max_update_norm: float | None = None,
        aggregator: Callable[[Tensors, int], Any] | None = None,
        declared_sizes: Mapping[str, int] | None = None,
        release: ReleaseRules | None = None,
        server_optimizer: ServerOptimizer | None = None,
        client_ranks: ClientRanks | None = None,
    ) -> None:
        self.method = method
        self.sampler = sampler
        self.ledger = ledger
        self.wire = server_wire(wire_dtype, wire_scale)  # cast, or int8 changes (fedsb.fed.wire)
        self.min_clients = min_clients
        self.max_update_norm = max_update_norm
        self.aggregator = aggregator  # (global state, round) -> the round's aggregator; default the method's
        self.declared_sizes = declared_sizes  # under DP: the public sizes of the privacy plan, checked
        self.release = release or ReleaseRules()  # what the records may hold about each client
        self.server_optimizer = server_optimizer  # None: the new global state is the aggregate itself
        self.client_ranks = client_ranks  # partition.client_ranks: uploads of R[:r_i, :r_i] (fed.mixed_rank)
        self.history: list[RoundRecord] = []

    def applied_through(self, client_ids: Sequence[str]) -> int:
        """The last round whose update all of `client_ids` are known to have applied: a client whose update
        of round t was accepted trained on the download of round t, so it holds round t - 1."""
        last = dict.fromkeys(client_ids, 0)
        for record in self.history:
            for cid in record.accepted:
                if cid in last:
                    last[cid] = max(last[cid], record.round - 1)
        return min(last.values(), default=0)

    def held_entry(self, client_ids: Sequence[str]) -> int:
        """The oldest int8 wire entry any of `client_ids` is known to hold (-1: one holds none): a client
        whose update of round t was accepted received round t's download, entries through t - 1."""
        last = dict.fromkeys(client_ids, -1)
        for record in self.history:
            for cid in record.accepted:
                if cid in last:
                    last[cid] = max(last[cid], record.round - 1)
        return min(last.values(), default=-1)

    def run_round(self, round: int, executor: ClientExecutor, *, progress: bool = False) -> RoundRecord:
        """Train and aggregate round `round` (1-based); raises `RoundFailed` below `min_clients`."""
        t0 = time.perf_counter()
        sampled = self.sampler.sample(round)
        record = RoundRecord(round=round, sampled=sampled)
        state = self.method.download(since=self.applied_through(sampled))
        download = self.wire.download(state, round=round, since=self.held_entry(sampled))
        for cid in sampled:
            self.ledger.record(
                round=round, client=cid, direction="down", tensors=download, dtype=self.wire.name
            )
        secure = getattr(executor, "secure_aggregation", False)
        collect = self._collect_secure if secure else self._collect
        count, result, client_seconds = collect(round, executor, download, record, progress)
        seen = set(record.accepted)
        record.dropped = [c for c in sampled if c not in seen and c not in record.rejected]
        if record.dropped:
            log.warning("round %d: no update from %s", round, ", ".join(record.dropped))
        if count < self.min_clients:
            reasons = "; ".join(f"{c}: {r}" for c, r in record.rejected.items()) or "none rejected"
            raise RoundFailed(
                f"round {round}: {count} usable update(s), fed.min_clients={self.min_clients} "
                f"(sampled {len(sampled)}, rejected {len(record.rejected)}, dropped {len(record.dropped)}; {reasons})"
            )
        t_agg = time.perf_counter()
        self.method.apply(self._step(result()), round)
        now = time.perf_counter()
        seconds = {"total": now - t0, "clients": client_seconds, "aggregate": now - t_agg}
        record.seconds = self.release.round_seconds(seconds)
        self.history.append(record)
        self.method.release_history(self.applied_through(self.sampler.client_ids))
        self.wire.release(self.held_entry(self.sampler.client_ids))
        return record

    # ---- server-side state for checkpoints ------------------------------------------------------------------
    def state_dict(self) -> tuple[Tensors, dict[str, Any]]:
        """(tensors, JSON metadata) of the server's own state beyond the global one: the server optimizer's
        and the int8 wire's (the clients' reconstruction and the entries not every client holds)."""
        tensors, wire_meta = self.wire.state_dict()
        meta: dict[str, Any] = {"wire": wire_meta} if wire_meta else {}
        if self.server_optimizer is not None:
            opt_tensors, meta["server_optimizer"] = self.server_optimizer.state_dict()
            tensors.update(opt_tensors)
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Inverse of `state_dict`; a checkpoint without server-optimizer state is refused under one."""
        if self.server_optimizer is not None:
            if "server_optimizer" not in meta:
                raise CheckpointError(
                    f"the checkpoint holds no {self.server_optimizer.name} server-optimizer state "
                    "(it was written with fed.server_optimizer=avg)"
                )
            self.server_optimizer.load_state_dict(tensors, meta["server_optimizer"])
        if self.wire.delta:
            if "wire" not in meta:
                raise CheckpointError("the checkpoint holds no int8 wire state (it was written without int8)")
            self.wire.load_state_dict(tensors, meta["wire"])

    def _step(self, aggregate: Tensors) -> Tensors:
        """The new global state: the aggregate, or the server optimizer's step along aggregate - state."""
        if self.server_optimizer is None:
            return aggregate
        return self.server_optimizer.step(self.method.state, aggregate)

    def _collect(
        self, round: int, executor: ClientExecutor, download: Tensors, record: RoundRecord, progress: bool
    ) -> tuple[int, Callable[[], Tensors], float]:
        """Validate and aggregate each client's update as it arrives: (count, the aggregate, client seconds).

        Fills the record's accepted, rejected and client metrics and the round's weighted training loss.
        """
        sampled = record.sampled
        reference = self.wire.reference(self.method.state)  # what every client starts this round from
        wire_spec = self.wire.upload_spec(self.method.upload_spec())
        spec = {k: shape for k, (shape, _) in wire_spec.items()}
        dtypes = {k: dtype for k, (_, dtype) in wire_spec.items()}
        aggregator = (
            self.aggregator(reference, round) if self.aggregator is not None else self.method.new_aggregator()
        )
        seen: set[str] = set()
        weighted_loss, loss_weight = 0.0, 0.0
        client_seconds = 0.0
        bar = tqdm(total=len(sampled), desc=f"round {round} clients", leave=False, disable=not progress)
        for update, waited in _timed(executor.train_round(round, sampled, download)):
            # a private client keeps its timings: count the time the server waited for the update instead
            # (not recorded under DP: `ReleaseRules.round_seconds`)
            client_seconds += float(self.release.metrics(update.metrics).get("seconds", waited))
            ranks, cid = self.client_ranks, update.client_id
            try:
                validate_update(
                    update,
                    round=round,
                    spec=ranks.upload_spec(cid, spec) if ranks is not None else spec,
                    wire_dtype=dtypes,
                    fingerprint=self.method.basis_fingerprint,
                    sampled=sampled,
                    seen=seen,
                    reference=ranks.crop(cid, reference) if ranks is not None else reference,
                    max_norm=self.max_update_norm,
                    declared_sizes=self.declared_sizes,
                    private=self.release.private,
                    decode=self.wire.decode_upload if self.wire.delta else None,
                )
            except UpdateRejected as exc:
                log.warning("round %d: %s", round, exc)
                record.rejected[update.client_id] = exc.reason
                if update.client_id in sampled and update.client_id not in seen:
                    self._record_up(round, update, "rejected")
                continue
            self._record_up(round, update, "ok")
            tensors = self.wire.decode_upload(update.tensors)
            if ranks is not None:  # the client's model: R^t outside the block it sent
                tensors = ranks.fill(cid, tensors, reference)
            aggregator.add(tensors, update.num_examples)
            seen.add(update.client_id)
            record.accepted.append(update.client_id)
            metrics = self.release.metrics(update.metrics)  # under DP: what the accountant covers
            record.client_metrics[update.client_id] = {"num_examples": update.num_examples, **metrics}
            w = aggregator.weight_of(update.num_examples)
            if "loss" in metrics:
                weighted_loss += w * float(metrics["loss"])
                loss_weight += w
            bar.update(1)
        bar.close()
        # nan when no client sent a loss (under DP losses stay on the clients)
        record.train_loss = weighted_loss / loss_weight if loss_weight else float("nan")
        return aggregator.count, aggregator.result, client_seconds

    def _collect_secure(
        self, round: int, executor: Any, download: Tensors, record: RoundRecord, progress: bool
    ) -> tuple[int, Callable[[], Tensors], float]:
        """A secure-aggregation executor hands over only the weighted mean of the round's updates (and who
        is in it): no single update to validate, so the mean's shapes and finiteness are checked instead."""
        t0 = time.perf_counter()
        spec = self.method.upload_spec()
        mean, aggregated = executor.aggregate_round(round, record.sampled, download, spec)
        record.accepted = list(aggregated)
        if not aggregated:
            return 0, dict, time.perf_counter() - t0
        if set(mean) != set(spec) or any(tuple(mean[k].shape) != tuple(spec[k]) for k in spec):
            raise RoundFailed(
                f"round {round}: the secure aggregate does not match the global state's tensors"
            )
        bad = [k for k, t in mean.items() if not torch.isfinite(t).all()]
        if bad:
            raise RoundFailed(f"round {round}: the secure aggregate of {bad[:3]} is not finite")
        return len(aggregated), lambda: decode(mean), time.perf_counter() - t0

    def _record_up(self, round: int, update: ClientUpdate, status: str) -> None:
        self.ledger.record(
            round=round,
            client=update.client_id,
            direction="up",
            tensors=update.tensors,
            dtype=self.wire.name,
            status=status,
        )


def _timed(updates: Iterable[ClientUpdate]) -> Iterator[tuple[ClientUpdate, float]]:
    """Each update with the seconds spent waiting for it."""
    it = iter(updates)
    while True:
        t = time.perf_counter()
        try:
            update = next(it)
        except StopIteration:
            return
        yield update, time.perf_counter() - t


def run_rounds(
    server: Server,
    executor: ClientExecutor,
    *,
    start_round: int,
    rounds: int,
    evaluate: Callable[[int], dict[str, Any]] | None = None,
    eval_every: int = 1,
    on_round_end: Callable[[RoundRecord], None] | None = None,
    progress: bool = False,
) -> list[RoundRecord]:
    """Rounds start_round..rounds; evaluate every `eval_every` rounds and after the last; then `on_round_end`."""
    done: list[RoundRecord] = []
    bar = tqdm(
        range(start_round, rounds + 1),
        desc="rounds",
        disable=not progress,
        initial=start_round - 1,
        total=rounds,
    )
    for t in bar:
        record = server.run_round(t, executor, progress=progress)
        if evaluate is not None and (t % eval_every == 0 or t == rounds):
            t_eval = time.perf_counter()
            server.method.install_global()
            record.eval = evaluate(t)
            record.seconds["eval"] = time.perf_counter() - t_eval
        if on_round_end is not None:
            t_cb = time.perf_counter()
            on_round_end(record)
            record.seconds["checkpoint"] = time.perf_counter() - t_cb
        postfix = {"loss": f"{record.train_loss:.3f}"}
        if record.eval and "accuracy" in record.eval:
            postfix["acc"] = f"{record.eval['accuracy']:.3f}"
        bar.set_postfix(postfix)
        done.append(record)
    return done
