"""The federated init's exchanges as numbers (init.source=federated, `fedsb.init.federated`), torch-free:
how many releases each client makes, the sketch width k and the one-time ledger lines. `fedsb comm` and
`fedsb run --dry-run` count the init's bytes with the same lines the run's ledger records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["exchange_lines", "exchange_params_per_client", "releases_per_client", "sketch_width"]


def releases_per_client(exchange: str) -> int:
    """Releases of each init client's data: 1 for init.exchange=dense (G_i), 2 for sketch (G_i Omega, Q^T G_i)."""
    return 1 if exchange == "dense" else 2


def sketch_width(rank: int, oversample: int, shape: tuple[int, int]) -> int:
    """k = rank + oversample, at most min(m, n)."""
    return min(rank + max(oversample, 0), min(shape))


def exchange_lines(
    exchange: str, clients: int, shapes: Mapping[str, tuple[int, int]], widths: Mapping[str, int]
) -> list[dict[str, Any]]:
    """The init's one-time ledger lines: item, direction, clients and numbers per module per client."""
    if exchange == "dense":
        return [
            {
                "item": "federated init: gradient sum G_i (m x n per layer, fp32)",
                "direction": "up",
                "clients": clients,
                "sizes": {p: m * n for p, (m, n) in shapes.items()},
            }
        ]
    return [
        {
            "item": "federated init exchange 1: sketch Y_i = G_i Omega (m x k per layer, fp32)",
            "direction": "up",
            "clients": clients,
            "sizes": {p: m * widths[p] for p, (m, _) in shapes.items()},
        },
        {
            "item": "federated init: range basis Q (m x k per layer, fp32; Omega comes from the shared seed)",
            "direction": "down",
            "clients": clients,
            "sizes": {p: m * widths[p] for p, (m, _) in shapes.items()},
        },
        {
            "item": "federated init exchange 2: Z_i = Q^T G_i (k x n per layer, fp32)",
            "direction": "up",
            "clients": clients,
            "sizes": {p: widths[p] * n for p, (_, n) in shapes.items()},
        },
    ]


def exchange_params_per_client(
    exchange: str, shapes: Mapping[str, tuple[int, int]], widths: Mapping[str, int]
) -> int:
    """Numbers one init client sends and receives over the whole init (all lines of `exchange_lines`):
    dense sum_m m n; sketch sum_m (2 m k + k n)."""
    return sum(sum(line["sizes"].values()) for line in exchange_lines(exchange, 1, shapes, widths))
