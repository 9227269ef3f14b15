"""What a run's settings add to a method's per-round formula, torch-free: mixed ranks
(partition.client_ranks), int8 scales (fed.wire_dtype=int8, fed.wire_scale) and the federated init's
one-time exchanges (init.source=federated). `fedsb comm` (from shapes) and `fedsb run --dry-run` (from the
meta model's modules) both count with these functions, and both equal the ledger of a real run.

- Mixed ranks: a client of rank r_i uploads the leading block of each module's R, sum_m min(r_i, r_m)^2,
  plus the head whole; it downloads the full R (its forward pass uses it). A round's upload is the sum over
  its sampled clients: exact when every client is sampled, the expectation c x mean_i otherwise.
- int8: one byte per entry plus a 4-byte fp32 scale per tensor (fed.wire_scale=tensor) or per row of a 2-D
  tensor (row), both ways. A download carries one entry per round since the least recent of its sampled
  clients last took part: one entry at full participation (the count here), more under partial participation.
- Federated init: every init client sends (and, sketch, receives) fp32 numbers once: dense m n per module;
  sketch m k up, m k down (Q), k n up, k = min(r + init.oversample, m, n) (`fedsb.init.exchange`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction

from fedsb.init.exchange import exchange_params_per_client, sketch_width

SCALE_BYTES = 4  # an int8 scale travels as fp32
INIT_BYTES = 4  # the federated init's releases travel as fp32


def scale_count(shape: Sequence[int], per: str) -> int:
    """Scales of one int8 tensor: rows of a 2-D (or higher) tensor with per='row', else 1."""
    return int(shape[0]) if per == "row" and len(shape) >= 2 else 1


def int8_scale_bytes(shapes: Iterable[Sequence[int]], per: str) -> int:
    """Bytes of the fp32 scales of one int8 message carrying tensors of `shapes`."""
    return SCALE_BYTES * sum(scale_count(shape, per) for shape in shapes)


def mixed_rank_uploads(
    module_ranks: Sequence[int], client_ranks: Sequence[int], head: int = 0
) -> dict[int, int]:
    """r_i -> numbers a client of rank r_i uploads per round: sum_m min(r_i, r_m)^2 + head (a module whose
    rank r_m is below r_i is sent whole)."""
    return {r: sum(min(r, rm) ** 2 for rm in module_ranks) + head for r in sorted(set(client_ranks))}


def mean_upload(by_rank: Mapping[int, int], client_ranks: Sequence[int]) -> Fraction:
    """The expected upload of a sampled client (every client equally likely): mean_i by_rank[r_i]."""
    return Fraction(sum(by_rank[r] for r in client_ranks), len(client_ranks))


def round_bytes(clients: int, up: Fraction | int, down: int, width: int, scales: int = 0) -> int:
    """Bytes of one round over `clients` sampled clients: c ((up + down) width + 2 scales), rounded to an
    integer when `up` is an expectation."""
    return round(clients * ((up + down) * width + 2 * scales))


def federated_init_params(
    exchange: str, shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], oversample: int
) -> int:
    """Numbers one init client exchanges over the whole federated init (up and down, fp32 on the wire)."""
    widths = {p: sketch_width(ranks[p], oversample, shape) for p, shape in shapes.items()}
    return exchange_params_per_client(exchange, shapes, widths)
