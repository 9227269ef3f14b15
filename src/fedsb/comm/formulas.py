"""Per-method communication per client per round: upload, download, the paper's "# Comm." and a one-time
basis, in parameters, from the adapted modules' shapes (formulas: the table in `fedsb.comm`; method.md 6.2).

Every formula has the signature (shapes, rank, clients, head_params=0, **options) -> `MethodComm`; a
method's card names its formula (`fedsb.fed.registry.MethodCard.comm`). r is capped at min(m, n) per module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedsb.errors import FedsbError

#: (full module name, m = out_features, n = in_features)
Shape = tuple[str, int, int]


@dataclass(frozen=True)
class MethodComm:
    """Parameters per client per round for one method at one rank (bytes: multiply by the dtype size)."""

    method: str
    rank: int
    clients: int
    upload: int  # client -> server, adapters + head
    download: int  # server -> client, adapters + head
    paper: int | float  # the paper's "# Comm." (one way; c x download for FedEx/FLoRA)
    basis: int  # one-time download of a frozen basis (Fed-SB's B and A); 0 for the others
    head: int  # head parameters included once in each of upload, download and paper
    download_encoding: str | None  # FedEx only: "means + factors" (what its download carries)
    capped: tuple[tuple[str, int], ...]  # modules whose rank was capped at min(m, n): (name, rank used)
    #: shapes of the adapter tensors one upload carries (the head apart), as the run sends them: what an
    #: int8 message has scales for (`fedsb.comm.extras`); () for methods int8 cannot carry
    sent: tuple[tuple[int, int], ...] = ()
    #: per module, the rank of the frozen basis a LoRA-SB init computes (Fed-SB r, RAVAN h x r): the
    #: federated init's sketch width k = min(rank + oversample, m, n) (`fedsb.comm.extras`); () without one
    basis_ranks: tuple[int, ...] = ()


def _positive_int(field: str, value: object, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise FedsbError(field=field, value=value, fix=fix)
    return value


def _check(
    shapes: Sequence[Shape], rank: int, clients: int, head_params: int
) -> list[tuple[str, int, int, int]]:
    _positive_int("rank", rank, "use a positive integer such as 32")
    _positive_int("clients", clients, "use a positive integer (clients per round), e.g. 5")
    if isinstance(head_params, bool) or not isinstance(head_params, int) or head_params < 0:
        raise FedsbError(
            field="head_params", value=head_params, fix="use an integer >= 0 (0 = no trained head)"
        )
    if not shapes:
        raise FedsbError(field="targets", value=list(shapes), fix="adapt at least one module")
    out = []
    for name, m, n in shapes:
        _positive_int(f"shape of {name}", m, "use positive out/in features")
        _positive_int(f"shape of {name}", n, "use positive out/in features")
        out.append((name, m, n, min(rank, m, n)))
    return out


def _capped(rows: Sequence[tuple[str, int, int, int]], rank: int) -> tuple[tuple[str, int], ...]:
    return tuple((name, r) for name, _, _, r in rows if r < rank)


def _lora(rows: Sequence[tuple[str, int, int, int]]) -> int:
    return sum(r * (m + n) for _, m, n, r in rows)


def fedit(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FedIT: A and B both ways, r(m+n) per module; the paper's figure is the same."""
    rows = _check(shapes, rank, clients, head_params)
    one = _lora(rows) + head_params
    sent = tuple(shape for _, m, n, r in rows for shape in ((r, n), (m, r)))  # A (r, n), B (m, r)
    return MethodComm("fedit", rank, clients, one, one, one, 0, head_params, None, _capped(rows, rank), sent)


def ffa(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FFA-LoRA: only B (m x r) travels; the paper's figure is exactly half of FedIT's adapters (+ head)."""
    rows = _check(shapes, rank, clients, head_params)
    real = sum(r * m for _, m, _, r in rows) + head_params
    full = _lora(rows)
    paper = (full // 2 if full % 2 == 0 else full / 2) + head_params
    sent = tuple((m, r) for _, m, _, r in rows)  # B (m, r)
    return MethodComm(
        "ffa", rank, clients, real, real, paper, 0, head_params, None, _capped(rows, rank), sent
    )


def fedex(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FedEx-LoRA: upload r(m+n); download the new means (mean B, mean A: r(m+n)) and the c clients' stacked
    factors of the residual to fold (c·r(m+n)), i.e. (c+1)·r(m+n) per module: what `fedsb.fed.fedex` sends
    from round 2 on (round 1 downloads the means alone). The paper's figure is c·r(m+n)."""
    rows = _check(shapes, rank, clients, head_params)
    lora = _lora(rows)
    return MethodComm(
        "fedex",
        rank,
        clients,
        lora + head_params,
        (clients + 1) * lora + head_params,
        clients * lora + head_params,
        0,
        head_params,
        "means + factors",
        _capped(rows, rank),
    )


def flora(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FLoRA: upload r(m+n); every client downloads the stack of all c adapters, c·r(m+n) (= the paper)."""
    rows = _check(shapes, rank, clients, head_params)
    lora = _lora(rows)
    down = clients * lora + head_params
    return MethodComm(
        "flora", rank, clients, lora + head_params, down, down, 0, head_params, None, _capped(rows, rank)
    )


def fedsb(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """Fed-SB: R (r x r) both ways, independent of c, m and n; the basis B, A (r(m+n)) once, separately."""
    rows = _check(shapes, rank, clients, head_params)
    one = sum(r * r for _, _, _, r in rows) + head_params
    sent = tuple((r, r) for _, _, _, r in rows)  # R (r, r)
    return MethodComm(
        "fedsb",
        rank,
        clients,
        one,
        one,
        one,
        _lora(rows),
        head_params,
        None,
        _capped(rows, rank),
        sent,
        tuple(r for _, _, _, r in rows),
    )


def ravan(
    shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0, *, heads: int = 4
) -> MethodComm:
    """RAVAN: h heads of r x r (s_k H_k) both ways, h r^2 per module; its frozen bases h r (m + n) once.

    A module too small for h heads of rank r gets heads of rank min(m, n) // h (as `fedsb run` builds)."""
    rows = _check(shapes, rank, clients, head_params)
    _positive_int("heads", heads, "use a positive number of heads, e.g. 4")
    per_head = [(name, m, n, min(rank, min(m, n) // heads)) for name, m, n, _ in rows]
    for name, m, n, r in per_head:
        if r == 0:
            raise FedsbError(
                field="heads",
                value=heads,
                what=f"exceeds min(m, n) = {min(m, n)} of {name}",
                fix="use fewer heads",
            )
    one = sum(heads * r * r for _, _, _, r in per_head) + head_params
    basis = sum(heads * r * (m + n) for _, m, n, r in per_head)
    sent = tuple((r, r) for _, _, _, r in per_head for _ in range(heads))  # s_k H_k (r, r) per head
    return MethodComm(
        "ravan",
        rank,
        clients,
        one,
        one,
        one,
        basis,
        head_params,
        None,
        _capped(per_head, rank),
        sent,
        tuple(heads * r for _, _, _, r in per_head),
    )


def fedsvd(shapes: Sequence[Shape], rank: int, clients: int, head_params: int = 0) -> MethodComm:
    """FedSVD: upload B (r m); download the re-factorized A and B, r (m + n), every round. Not in the Fed-SB
    tables: its "# Comm." column shows the download (the larger direction)."""
    rows = _check(shapes, rank, clients, head_params)
    up = sum(r * m for _, m, _, r in rows) + head_params
    down = _lora(rows) + head_params
    return MethodComm("fedsvd", rank, clients, up, down, down, 0, head_params, None, _capped(rows, rank))
