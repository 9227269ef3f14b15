"""Split a dataset over clients (IID, Dirichlet label skew, natural ids, size skew) with flwr-datasets."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    SizePartitioner,
)

from fedsb.errors import FedsbError

__all__ = ["SCHEMES", "partition_dataset", "partition_stats"]

SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "natural", "quantity")
_MAX_SIZE_DRAWS = 10  # as DirichletPartitioner: redraw sizes this often before giving up on min_size


def _quantity_sizes(n_rows: int, num_clients: int, alpha: float, min_size: int, seed: int) -> list[int]:
    """Client sizes proportional to a Dirichlet(alpha) draw, summing to ``n_rows``, each >= ``min_size``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))  # a stream apart from the row shuffle
    sizes: list[int] = []
    for _ in range(_MAX_SIZE_DRAWS):
        exact = rng.dirichlet(np.full(num_clients, alpha)) * n_rows
        floors = np.floor(exact).astype(np.int64)
        # largest remainders get the rows left over by flooring, so the sizes sum to n_rows exactly
        extra = np.argsort(-(exact - floors), kind="stable")[: n_rows - int(floors.sum())]
        floors[extra] += 1
        sizes = [int(s) for s in floors]
        if min(sizes) >= min_size:
            return sizes
    raise _too_small(sizes, min_size, f" after {_MAX_SIZE_DRAWS} size draws with alpha={alpha}")


def _too_small(sizes: list[int], min_size: int, context: str = "") -> FedsbError:
    """The error naming the first client below ``min_size`` and its size (some client must be below)."""
    small = [(i, n) for i, n in enumerate(sizes) if n < min_size]
    client, size = small[0]
    return FedsbError(
        field="min_size",
        value=min_size,
        what=f"is not met{context}: client {client} has {size} rows ({len(small)} clients below; sizes {sizes})",
        fix="lower min_size, use fewer clients, a larger alpha or more data",
    )


def _partitioner(
    scheme: str,
    ds: datasets.Dataset,
    num_clients: int | None,
    column: str | None,
    alpha: float,
    min_size: int,
    seed: int,
) -> Partitioner:
    if scheme == "iid":
        assert num_clients is not None
        return IidPartitioner(num_partitions=num_clients)
    if scheme == "dirichlet":
        assert num_clients is not None and column is not None
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=column,
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if scheme == "natural":
        assert column is not None
        return NaturalIdPartitioner(partition_by=column)
    assert num_clients is not None
    return SizePartitioner(_quantity_sizes(len(ds), num_clients, alpha, min_size, seed))


def _check_args(
    ds: datasets.Dataset,
    scheme: str,
    num_clients: int | None,
    column: str | None,
    alpha: float,
    min_size: int,
    seed: int,
) -> None:
    if scheme not in SCHEMES:
        raise FedsbError(field="scheme", value=scheme, fix=f"use one of {', '.join(SCHEMES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FedsbError(field="seed", value=seed, fix="use a non-negative integer")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise FedsbError(field="min_size", value=min_size, fix="use an integer >= 1")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
        raise FedsbError(
            field="alpha", value=alpha, fix="use a positive float (smaller = more skewed), e.g. 0.5"
        )
    if scheme in ("dirichlet", "natural"):
        if column is None:
            raise FedsbError(
                field="column",
                value=None,
                fix=f"scheme={scheme!r} needs a column to partition by, e.g. 'category'",
            )
    if column is not None and column not in ds.column_names:
        raise FedsbError(
            field="column", value=column, fix=f"use one of the dataset's columns {ds.column_names}"
        )
    if scheme == "natural" and num_clients is None:
        return
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        none_ok = " (or None for scheme='natural')" if scheme == "natural" else ""
        raise FedsbError(field="num_clients", value=num_clients, fix=f"use a positive integer{none_ok}")
    if scheme != "natural" and num_clients * min_size > len(ds):
        raise FedsbError(
            field="num_clients",
            value=num_clients,
            what=f"times min_size={min_size} exceeds the {len(ds)} rows",
            fix="use fewer clients, a smaller min_size or more data",
        )


def partition_dataset(
    ds: datasets.Dataset,
    *,
    scheme: str,
    num_clients: int | None,
    seed: int,
    column: str | None = None,
    alpha: float = 0.5,
    min_size: int = 1,
) -> list[datasets.Dataset]:
    """Split ``ds`` into per-client datasets with flwr-datasets partitioners; deterministic given ``seed``.

    Rows are first shuffled with ``seed`` (flwr's IID and size partitioners cut contiguous shards). Schemes:
    "iid" (equal sizes +-1), "dirichlet" (per-value-of-``column`` client shares ~ Dirichlet(``alpha``)),
    "natural" (client i holds the i-th sorted distinct value of ``column``; ``num_clients`` must equal the
    number of values, or be None), "quantity" (client sizes ~ Dirichlet(``alpha``), any labels). Smaller
    ``alpha`` means more skew. A client with fewer than ``min_size`` rows raises FedsbError.
    """
    _check_args(ds, scheme, num_clients, column, alpha, min_size, seed)
    shuffled = ds.shuffle(seed=seed, keep_in_memory=True)
    partitioner = _partitioner(scheme, shuffled, num_clients, column, alpha, min_size, seed)
    partitioner.dataset = shuffled

    if scheme == "natural":
        values = sorted(shuffled.unique(column))
        if num_clients is not None and num_clients != len(values):
            raise FedsbError(
                field="num_clients",
                value=num_clients,
                what=f"does not match the {len(values)} distinct values of column {column!r} ({values})",
                fix=f"set num_clients={len(values)} or None for scheme='natural'",
            )
    with warnings.catch_warnings():
        # DirichletPartitioner warns on each redraw before reaching min_partition_size; we report failure once
        warnings.filterwarnings("ignore", message="The specified min_partition_size")
        try:
            parts = [partitioner.load_partition(i) for i in range(partitioner.num_partitions)]
        except ValueError as err:
            if scheme != "dirichlet":
                raise
            raise FedsbError(
                field="min_size",
                value=min_size,
                what=f"was not reached in repeated Dirichlet draws with alpha={alpha} ({err})",
                fix="raise alpha, lower min_size, use fewer clients or more data",
            ) from err

    sizes = [len(p) for p in parts]
    if min(sizes) < min_size:
        raise _too_small(sizes, min_size)
    return parts


def partition_stats(parts: list[datasets.Dataset], column: str | None = None) -> dict[str, Any]:
    """Sizes (with min/max/mean/total) and, if ``column`` is given, each client's value histogram."""
    if not parts:
        raise FedsbError(field="parts", value=[], fix="pass the list returned by partition_dataset")
    sizes = [len(p) for p in parts]
    stats: dict[str, Any] = {
        "num_clients": len(parts),
        "sizes": sizes,
        "total": int(sum(sizes)),
        "min": int(min(sizes)),
        "max": int(max(sizes)),
        "mean": float(np.mean(sizes)),
    }
    if column is not None:
        missing = [i for i, p in enumerate(parts) if column not in p.column_names]
        if missing:
            raise FedsbError(
                field="column",
                value=column,
                what=f"is missing in clients {missing}",
                fix=f"use one of {parts[missing[0]].column_names}",
            )
        histograms = [dict(sorted(Counter(p[column]).items())) for p in parts]
        stats["values"] = sorted({v for h in histograms for v in h})
        stats["histograms"] = histograms
    return stats
