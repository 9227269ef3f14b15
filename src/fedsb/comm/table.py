"""`fedsb comm`'s rows and text: one row per (method, rank) with parameters and bytes both ways, the
paper's "# Comm." rounded half-up to two decimals in its unit, and the aligned table printed by the CLI.

The methods and their formulas, display names and int8 tensor counts come from the method registry's cards
(`fedsb.fed.registry`), so a registered method with a `comm` formula gets a row with no edit here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

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


def int8_scale_bytes(method: str, modules: int, head_params: int, heads: int = 4) -> int:
    """Bytes of the fp32 per-tensor scales in one int8 message (fed.wire_dtype=int8, fed.wire_scale=tensor):
    one per tensor of each adapted module (per head with a `heads` option), two for a trained head (weight,
    bias); refused for methods int8 cannot carry (`MethodCard.int8_tensors` = 0). The basis stays float32."""
    card = registry.card(method)
    if not card.int8_tensors:
        int8 = registry.names_where(lambda c: c.int8_tensors > 0)
        raise FedsbError(
            field="dtype",
            value="int8",
            what=f"does not apply to {method}: int8 sends changes of a global state that is the mean of the uploads",
            fix=f"use int8 with {', '.join(int8)}, or a float dtype",
        )
    per_module = card.int8_tensors * (heads if "heads" in card.comm_options else 1)
    return 4 * (modules * per_module + (2 if head_params else 0))


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
) -> list[dict[str, Any]]:
    """One row per (method, rank): paper "# Comm.", upload/download params and bytes, one-time basis.

    `ranks` applies to every method, or maps a method to its own ranks (e.g. {"fedit": [32], "fedsb": [120]}).
    `head_params` overrides the model's head size (None = the shape facts' value). `heads`: RAVAN's number
    of heads (its rank is per head).
    """
    if dtype not in DTYPE_BYTES:
        raise FedsbError(field="dtype", value=dtype, fix=f"use one of {', '.join(DTYPE_BYTES)}")
    if isinstance(methods, str) or not methods:
        raise FedsbError(
            field="method", value=methods, fix=f"give a list of methods from {', '.join(METHODS)}"
        )
    keys = [method_key(m) for m in methods]
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
    _positive_int("clients", clients, "use a positive integer (clients per round), e.g. 5")
    facts = resolve_model(model)
    shapes = select_modules(facts, targets)
    head = facts.head_params if head_params is None else head_params
    width = DTYPE_BYTES[dtype]
    rows = []
    for key in keys:
        for rank in per_method[key]:
            options = {k: {"heads": heads}[k] for k in registry.card(key).comm_options}
            res = METHODS[key](shapes, rank, clients, head, **options)
            scales = int8_scale_bytes(key, len(shapes), res.head, heads) if dtype == "int8" else 0
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
                    "upload_params": res.upload,
                    "upload_bytes": res.upload * width + scales,
                    "download_params": res.download,
                    "download_bytes": res.download * width + scales,
                    "download_encoding": res.download_encoding,
                    "basis_params": res.basis,
                    "basis_bytes": res.basis * (4 if dtype == "int8" else width),
                    **options,
                    "capped_modules": len(res.capped),
                    "capped_to": _capped_summary(res.capped),
                }
            )
    return rows


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
        "once: basis params",
        "basis",
    ]
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
        basis = row["basis_params"] > 0
        table.append(
            [
                row["method_name"],
                rank,
                str(row["clients"]),
                row["paper_comm_display"],
                f"{row['upload_params']:,}",
                format_bytes(row["upload_bytes"]),
                f"{row['download_params']:,}",
                download,
                f"{row['basis_params']:,}" if basis else "-",
                format_bytes(row["basis_bytes"]) if basis else "-",
            ]
        )
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
    return "\n".join(
        [
            f"{facts.name}: {len(shapes)} adapted modules ({layers} layers x {leaves}); {head_text}",
            f"per client per round; params exact; bytes as {row['dtype']} ({row['bytes_per_param']} B/param, "
            "1 MB = 10^6 B)" + (" = fed.wire_dtype's default" if row["dtype"] == "float32" else ""),
            f"# Comm. = the paper's one-way figure in {facts.unit} ({unit} params, rounded half-up); "
            "FedEx/FLoRA: the c x download",
        ]
    )
