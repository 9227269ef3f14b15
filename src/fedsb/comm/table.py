"""`fedsb comm`'s rows and text: one row per (method, rank) with parameters and bytes both ways, the
paper's "# Comm." rounded half-up to two decimals in its unit, and the aligned table printed by the CLI.

The methods and their formulas, display names and int8 tensor counts come from the method registry's cards
(`fedsb.fed.registry`), so a registered method with a `comm` formula gets a row with no edit here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

from fedsb.comm import extras
from fedsb.comm.formulas import MethodComm, _positive_int
from fedsb.comm.shapes import resolve_model, select_modules
from fedsb.errors import FedsbError
from fedsb.fed import registry

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}

_UNITS: dict[str, int] = {"M": 10**6, "K": 10**3}


class _FormulaView(Mapping[str, Any]):
    """Live and read-only: every registered method with a comm formula -> `value(card)`, in registration
    order (the paper's table order for the built-in methods)."""

    def __init__(self, value: Callable[[registry.MethodCard], Any]) -> None:
        self._value = value

    @staticmethod
    def _names() -> tuple[str, ...]:
        return registry.names_where(lambda c: c.comm is not None)

    def __getitem__(self, name: str) -> Any:
        if name not in self._names():
            raise KeyError(name)
        return self._value(registry.card(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


#: method -> its formula, (shapes, rank, clients, head_params, **options) -> MethodComm
METHODS: Mapping[str, Callable[..., MethodComm]] = _FormulaView(lambda c: registry.resolve(c.comm))
#: method -> display name
METHOD_NAMES: Mapping[str, str] = _FormulaView(lambda c: c.display_name)


def int8_scale_bytes(
    method: str,
    res: MethodComm,
    modules: int,
    head_shapes: Sequence[Sequence[int]] | None,
    per: str = "tensor",
    heads: int = 4,
) -> int:
    """Bytes of the fp32 scales in one int8 message (fed.wire_dtype=int8): one per tensor (per='tensor') or
    per row of a 2-D tensor ('row') of the adapter tensors the formula sends (`MethodComm.sent`; a formula
    without them: the card's `int8_tensors` per module, per head with a `heads` option, per tensor only)
    and of the head (`head_shapes`; None = a head of unknown shape, counted as a weight and a bias, per
    tensor only). Refused for methods int8 cannot carry (`MethodCard.int8_tensors` = 0). The basis stays
    float32."""
    card = registry.card(method)
    if not card.int8_tensors:
        int8 = registry.names_where(lambda c: c.int8_tensors > 0)
        raise FedsbError(
            field="dtype",
            value="int8",
            what=f"does not apply to {method}: int8 sends changes of a global state that is the mean of the uploads",
            fix=f"use int8 with {', '.join(int8)}, or a float dtype",
        )
    unknown_head = bool(res.head) and head_shapes is None
    if per == "row" and (not res.sent or unknown_head):
        what = "a head given by its size only (head_params)" if res.sent else f"{method}'s tensors"
        raise FedsbError(
            field="wire_scale",
            value="row",
            what=f"needs the rows of every tensor sent, but the shapes of {what} are unknown",
            fix="use wire_scale tensor"
            + (", or leave head_params to the model's config (its classifier's shapes)" if res.sent else ""),
        )
    if res.sent:
        adapters = extras.int8_scale_bytes(res.sent, per)
    else:
        per_module = card.int8_tensors * (heads if "heads" in card.comm_options else 1)
        adapters = extras.SCALE_BYTES * modules * per_module
    if not res.head:
        return adapters
    if head_shapes is None:
        return adapters + 2 * extras.SCALE_BYTES  # a weight and a bias
    return adapters + extras.int8_scale_bytes(head_shapes, per)


def format_count(params: float, unit: str) -> str:
    """`params` in `unit` (M or K), rounded half-up to two decimals: the convention of `fedsb.comm`."""
    value = Decimal(params) / _UNITS[unit]
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def method_key(method: object) -> str:
    key = (
        method.lower().replace("-lora", "").replace("-", "").replace("_", "")
        if isinstance(method, str)
        else None
    )
    if key not in METHODS:
        raise FedsbError(field="method", value=method, fix=f"use one of {', '.join(METHODS)}")
    return key


def _capped_summary(capped: Sequence[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, r in capped:
        out.setdefault(name.rsplit(".", 1)[-1], r)
    return out


def comm_table(
    model: str,
    methods: Sequence[str],
    ranks: Sequence[int] | Mapping[str, Sequence[int]],
    clients: int,
    targets: list[str] | None = None,
    dtype: str = "float32",
    *,
    head_params: int | None = None,
    heads: int = 4,
    client_ranks: Sequence[int] | None = None,
    wire_scale: str = "tensor",
    federated_init: str | None = None,
    oversample: int = 10,
) -> list[dict[str, Any]]:
    """One row per (method, rank): paper "# Comm.", upload/download params and bytes, one-time basis.

    `ranks` applies to every method, or maps a method to its own ranks (e.g. {"fedit": [32], "fedsb": [120]}).
    `head_params` overrides the model's head size (None = the shape facts' value). `heads`: RAVAN's number
    of heads (its rank is per head). A run's settings (`fedsb.comm.extras`): `client_ranks` =
    partition.client_ranks (one rank per client of the federation; uploads are their mean, the round their
    sum when every client is sampled), `wire_scale` = fed.wire_scale (with dtype int8), `federated_init` =
    init.exchange of init.source=federated (sketch or dense; None: the basis comes from the server) with
    `oversample` = init.oversample.
    """
    if dtype not in DTYPE_BYTES:
        raise FedsbError(field="dtype", value=dtype, fix=f"use one of {', '.join(DTYPE_BYTES)}")
    if isinstance(methods, str) or not methods:
        raise FedsbError(
            field="method", value=methods, fix=f"give a list of methods from {', '.join(METHODS)}"
        )
    keys = [method_key(m) for m in methods]
    per_method = _ranks_per_method(methods, keys, ranks)
    _positive_int("clients", clients, "use a positive integer (clients per round), e.g. 5")
    _check_settings(keys, per_method, clients, dtype, client_ranks, wire_scale, federated_init, oversample)
    facts = resolve_model(model)
    shapes = select_modules(facts, targets)
    head = facts.head_params if head_params is None else head_params
    head_shapes = facts.head_shapes if head_params is None else None
    width = DTYPE_BYTES[dtype]
    rows = []
    for key in keys:
        for rank in per_method[key]:
            options = {k: {"heads": heads}[k] for k in registry.card(key).comm_options}
            res = METHODS[key](shapes, rank, clients, head, **options)
            scales = (
                int8_scale_bytes(key, res, len(shapes), head_shapes, wire_scale, heads)
                if dtype == "int8"
                else 0
            )
            exact_up, by_rank = _upload(res, client_ranks)
            up = int(exact_up) if exact_up.denominator == 1 else float(exact_up)
            init = _init_params(res, shapes, federated_init, oversample)
            rows.append(
                {
                    "model": facts.name,
                    "method": key,
                    "method_name": METHOD_NAMES[key],
                    "rank": rank,
                    "clients": clients,
                    "modules": len(shapes),
                    "head_params": res.head,
                    "paper_comm": res.paper,
                    "paper_unit": facts.unit,
                    "paper_comm_display": format_count(res.paper, facts.unit),
                    "dtype": dtype,
                    "bytes_per_param": width,
                    "wire_scale": wire_scale if dtype == "int8" else None,
                    "scale_bytes": scales,
                    "client_ranks": None if client_ranks is None else list(client_ranks),
                    "upload_params": up,
                    "upload_bytes": up * width + scales,
                    **({"upload_params_by_client_rank": by_rank} if by_rank else {}),
                    "download_params": res.download,
                    "download_bytes": res.download * width + scales,
                    "download_encoding": res.download_encoding,
                    "round_bytes": extras.round_bytes(clients, exact_up, res.download, width, scales),
                    "basis_params": res.basis,
                    "basis_bytes": res.basis * (4 if dtype == "int8" else width),
                    "federated_init": federated_init,
                    "init_params": init,
                    "init_bytes": extras.INIT_BYTES * init,
                    "init_bytes_total": extras.INIT_BYTES * init * clients,
                    **options,
                    "capped_modules": len(res.capped),
                    "capped_to": _capped_summary(res.capped),
                }
            )
    return rows


def _upload(res: MethodComm, client_ranks: Sequence[int] | None) -> tuple[Fraction, dict[int, int]]:
    """A client's upload (with mixed ranks: the mean over the clients) and r_i -> its upload ({} without)."""
    if client_ranks is None:
        return Fraction(res.upload), {}
    by_rank = extras.mixed_rank_uploads([r for r, _ in res.sent], client_ranks, res.head)
    return extras.mean_upload(by_rank, client_ranks), by_rank


def _init_params(
    res: MethodComm, shapes: Sequence[tuple[str, int, int]], federated_init: str | None, oversample: int
) -> int:
    """Numbers one init client exchanges in a federated init (0 without one)."""
    if federated_init is None:
        return 0
    dims = {name: (m, n) for name, m, n in shapes}
    basis_ranks = dict(zip(dims, res.basis_ranks, strict=True))
    return extras.federated_init_params(federated_init, dims, basis_ranks, oversample)


def _ranks_per_method(
    methods: Sequence[str], keys: Sequence[str], ranks: Sequence[int] | Mapping[str, Sequence[int]]
) -> dict[str, Sequence[int]]:
    per_method: dict[str, Sequence[int]] = {}
    for raw, key in zip(methods, keys, strict=True):
        if isinstance(ranks, Mapping):
            given = ranks.get(raw, ranks.get(key))
            if given is None:
                raise FedsbError(field="rank", value=dict(ranks), fix=f"give ranks for method {raw!r}")
        else:
            given = ranks
        if isinstance(given, int | str) or not given:
            raise FedsbError(
                field="rank", value=given, fix="give a non-empty list of positive integers, e.g. [32]"
            )
        per_method[key] = given
    return per_method


def _check_settings(
    keys: Sequence[str],
    per_method: Mapping[str, Sequence[int]],
    clients: int,
    dtype: str,
    client_ranks: Sequence[int] | None,
    wire_scale: str,
    federated_init: str | None,
    oversample: int,
) -> None:
    """The run settings `comm_table` counts, checked as `fedsb run` checks them (config.py)."""
    _check_wire(dtype, wire_scale)
    _check_init(keys, federated_init, oversample)
    if client_ranks is not None:
        _check_client_ranks(keys, per_method, clients, dtype, client_ranks)


def _check_wire(dtype: str, wire_scale: str) -> None:
    if wire_scale not in ("tensor", "row"):
        raise FedsbError(field="wire_scale", value=wire_scale, fix="use tensor or row")
    if wire_scale != "tensor" and dtype != "int8":
        raise FedsbError(
            field="wire_scale",
            value=wire_scale,
            what=f"has no effect with dtype {dtype}",
            fix="use dtype int8",
        )


def _check_init(keys: Sequence[str], federated_init: str | None, oversample: int) -> None:
    if federated_init not in (None, "sketch", "dense"):
        raise FedsbError(
            field="federated_init", value=federated_init, fix="use sketch or dense (init.exchange)"
        )
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise FedsbError(
            field="oversample", value=oversample, fix="use an integer >= 0 (init.oversample), e.g. 10"
        )
    for key in keys:
        if federated_init is not None and registry.card(key).basis_init is None:
            raise FedsbError(
                field="federated_init",
                value=federated_init,
                what=f"initializes a LoRA-SB basis, which {key} does not compute",
                fix=f"use it with {', '.join(registry.names_where(lambda c: c.basis_init is not None))}",
            )


def _check_client_ranks(
    keys: Sequence[str],
    per_method: Mapping[str, Sequence[int]],
    clients: int,
    dtype: str,
    client_ranks: Sequence[int],
) -> None:
    ok = (
        not isinstance(client_ranks, str | Mapping)
        and len(client_ranks) > 0
        and all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in client_ranks)
    )
    if not ok:
        raise FedsbError(
            field="client_ranks",
            value=client_ranks,
            fix="give one positive rank per client (partition.client_ranks), e.g. 8 16 32",
        )
    if len(client_ranks) < clients:
        raise FedsbError(
            field="client_ranks",
            value=list(client_ranks),
            what=f"names {len(client_ranks)} clients, fewer than the {clients} sampled per round",
            fix=f"give one rank per client of the federation (at least {clients}), or lower clients",
        )
    if dtype == "int8":
        raise FedsbError(
            field="client_ranks",
            value=list(client_ranks),
            what="does not work with int8 (its changes and scales are of the full R)",
            fix="use a float dtype, or no client ranks",
        )
    for key in keys:
        if not registry.card(key).mixed_ranks:
            mixed = ", ".join(registry.names_where(lambda c: c.mixed_ranks))
            raise FedsbError(
                field="client_ranks",
                value=list(client_ranks),
                what=f"needs an R ordered by singular directions, but {key} has none",
                fix=f"use them with {mixed}",
            )
        big = [r for r in client_ranks if r > min(per_method[key])]
        if big:
            raise FedsbError(
                field="client_ranks",
                value=list(client_ranks),
                what=f"holds {big[0]} > rank {min(per_method[key])} of {key}",
                fix=f"use client ranks <= {min(per_method[key])}, or a larger rank",
            )


def format_table(rows: Sequence[Mapping[str, Any]], header: str = "") -> str:
    """The aligned text table printed by `fedsb comm`."""
    if not rows:
        return header
    unit = rows[0]["paper_unit"]
    cols = [
        "method",
        "r",
        "c",
        f"# Comm. ({unit})",
        "upload params",
        "upload",
        "download params",
        "download",
        "per round",
        "once: basis params",
        "basis",
    ]
    init = any(row["federated_init"] for row in rows)
    if init:
        cols.append("once: init")
    table = [cols]
    notes: list[str] = []
    for row in rows:
        rank = str(row["rank"])
        if row["capped_modules"]:
            capped = ", ".join(f"{k} -> {v}" for k, v in row["capped_to"].items())
            rank += "*"
            notes.append(
                f"* {row['method_name']} r={row['rank']}: rank capped at min(m, n) on "
                f"{row['capped_modules']} of {row['modules']} modules ({capped})"
            )
        download = format_bytes(row["download_bytes"])
        if row["download_encoding"]:
            download += f" ({row['download_encoding']})"
        by_rank = row.get("upload_params_by_client_rank")
        if by_rank:
            upload = f"{row['upload_params']:,.2f}".rstrip("0").rstrip(".") + "~"
            notes.append(
                f"~ {row['method_name']} r={row['rank']}: upload = mean over client ranks "
                f"{row['client_ranks']} of " + ", ".join(f"r_i={k}: {v:,}" for k, v in by_rank.items())
            )
        else:
            upload = f"{row['upload_params']:,}"
        basis = row["basis_params"] > 0
        line = [
            row["method_name"],
            rank,
            str(row["clients"]),
            row["paper_comm_display"],
            upload,
            format_bytes(round(row["upload_bytes"])),
            f"{row['download_params']:,}",
            download,
            format_bytes(row["round_bytes"]),
            f"{row['basis_params']:,}" if basis else "-",
            format_bytes(row["basis_bytes"]) if basis else "-",
        ]
        if init:
            line.append(format_bytes(row["init_bytes"]) + f" ({row['federated_init']})")
        table.append(line)
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    left = {0, 1, 2}
    lines = [header] if header else []
    for line in table:
        cells = [
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.extend(notes)
    return "\n".join(lines)


def describe(model: str, targets: list[str] | None, rows: Sequence[Mapping[str, Any]]) -> str:
    """The header above the table: what was counted and how."""
    facts = resolve_model(model)
    shapes = select_modules(facts, targets)
    leaves = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _, _ in shapes))
    prefix = f"{facts.layer_prefix}."
    layers = len({name[len(prefix) :].split(".", 1)[0] for name, _, _ in shapes if name.startswith(prefix)})
    row = rows[0] if rows else {"head_params": facts.head_params, "dtype": "float32", "bytes_per_param": 4}
    unit = "10^6" if facts.unit == "M" else "10^3"
    head = row["head_params"]
    head_text = f"head {head:,} params, counted once per message" if head else "no trained head"
    lines = [
        f"{facts.name}: {len(shapes)} adapted modules ({layers} layers x {leaves}); {head_text}",
        f"per client per round; params exact; bytes as {row['dtype']} ({row['bytes_per_param']} B/param, "
        "1 MB = 10^6 B)" + (" = fed.wire_dtype's default" if row["dtype"] == "float32" else ""),
        f"# Comm. = the paper's one-way figure in {facts.unit} ({unit} params, rounded half-up); "
        "FedEx/FLoRA: the c x download; per round = both ways, all c clients",
    ]
    if row.get("wire_scale"):
        lines.append(
            f"int8: 1 B per entry + a 4 B fp32 scale per {row['wire_scale']} (fed.wire_scale), both ways; a "
            "download holds one entry per round its least recent sampled client missed (1 at full participation)"
        )
    if row.get("client_ranks"):
        lines.append(
            "mixed ranks (partition.client_ranks): a client of rank r_i uploads the leading r_i x r_i block "
            "of each R (+ the head) and downloads the full R"
        )
    if row.get("federated_init"):
        lines.append(
            f"once: init = init.source=federated, init.exchange={row['federated_init']}: fp32 per init client, "
            "both ways (dense m n; sketch 2 m k + k n per module, k = r + init.oversample)"
        )
    return "\n".join(lines)
