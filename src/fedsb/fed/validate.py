"""Checks on a client update before it may enter the aggregate; each failure has a logged reason."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping

import torch

from fedsb.errors import UpdateRejected
from fedsb.fed.base import ClientUpdate, Tensors
from fedsb.fed.wire import SCALE, WIRE_DTYPES

__all__ = ["WIRE_DTYPES", "validate_update"]


def validate_update(
    update: ClientUpdate,
    *,
    round: int,
    spec: Mapping[str, tuple[int, ...]],
    wire_dtype: torch.dtype | Mapping[str, torch.dtype],
    fingerprint: str | None,
    sampled: Collection[str],
    seen: Collection[str],
    reference: Mapping[str, torch.Tensor] | None = None,
    max_norm: float | None = None,
    declared_sizes: Mapping[str, int] | None = None,
    private: bool = False,
    decode: Callable[[Tensors], Tensors] | None = None,
) -> None:
    """Raise `UpdateRejected` with a reason if the update must not be aggregated.

    Checks, in order: round (stale or future), client sampled this round, duplicate, example count (under
    DP: equal to the public size in `declared_sizes`, the privacy plan's), basis fingerprint, key set,
    shapes, dtype, finite values, and the norm bound: the Frobenius norm of the change
    sqrt(sum_k ||T_k - reference_k||^2) over all tensors (the change a client proposes, not its state).
    `wire_dtype` is one dtype for every tensor or one per name; `decode` turns the wire tensors into the
    client's state for the norm (int8 changes: reference + dequantized change), and int8 scales must be >= 0.

    `private` (any DP mode): the reason is written to logs and results, so it names the failed check and
    public values only, never one computed from the update (its norm, the count it sent).
    """
    cid = update.client_id
    if update.round != round:
        raise UpdateRejected(
            cid, f"update is for round {update.round}, the server is in round {round} (stale or future)"
        )
    if cid not in sampled:
        raise UpdateRejected(cid, f"client was not sampled in round {round}")
    if cid in seen:
        raise UpdateRejected(cid, f"duplicate update: client already reported in round {round}")
    if (
        isinstance(update.num_examples, bool)
        or not isinstance(update.num_examples, int)
        or update.num_examples <= 0
    ):
        sent = "num_examples" if private else f"num_examples={update.num_examples!r}"
        raise UpdateRejected(cid, f"{sent} must be a positive integer")
    if declared_sizes is not None and update.num_examples != declared_sizes.get(cid):
        sent = "num_examples" if private else f"num_examples={update.num_examples}"
        raise UpdateRejected(
            cid,
            f"{sent} differs from the size the privacy plan used ({declared_sizes.get(cid)}); under DP a "
            "client declares its planned size",
        )
    if fingerprint is not None and update.basis_fingerprint != fingerprint:
        got = (update.basis_fingerprint or "none")[:12]
        raise UpdateRejected(cid, f"basis fingerprint {got} does not match the server's {fingerprint[:12]}")
    keys = set(update.tensors)
    unexpected, missing = sorted(keys - set(spec)), sorted(set(spec) - keys)
    if unexpected:
        raise UpdateRejected(
            cid, f"unexpected tensors {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}"
        )
    if missing:
        raise UpdateRejected(cid, f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    for name, t in update.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise UpdateRejected(cid, f"{name} is a {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(spec[name]):
            raise UpdateRejected(cid, f"{name} has shape {tuple(t.shape)}, expected {tuple(spec[name])}")
        expected = wire_dtype[name] if isinstance(wire_dtype, Mapping) else wire_dtype
        if t.dtype != expected:
            raise UpdateRejected(cid, f"{name} has dtype {t.dtype}, expected the wire dtype {expected}")
        if not torch.isfinite(t).all():
            raise UpdateRejected(cid, f"{name} contains NaN or Inf")
        if name.endswith(SCALE) and (t < 0).any():
            raise UpdateRejected(cid, f"{name} holds a negative int8 scale")
    if max_norm is not None:
        sq = 0.0
        state = decode(update.tensors) if decode is not None else update.tensors
        for name, t in state.items():
            ref = reference[name].float() if reference is not None else 0.0
            sq += float(torch.sum((t.float() - ref) ** 2))
        norm = math.sqrt(sq)
        if norm > max_norm:
            value = "" if private else f" {norm:.4g}"
            raise UpdateRejected(cid, f"update norm{value} exceeds fed.max_update_norm={max_norm:g}")
