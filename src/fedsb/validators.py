"""Argument checks shared by the library's constructors and loaders: each returns the checked value or raises
a `FedsbError` naming the field, the value and the fix (the config's own checks are `fedsb.config`'s)."""

from __future__ import annotations

from fedsb.errors import FedsbError

__all__ = ["check_bool", "fraction", "non_negative_int", "positive_int"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(field: str, value: object, fix: str) -> int:
    """``value`` if it is an int >= 1 (bools are not ints here), else FedsbError(field, value, fix)."""
    if not _is_int(value) or value < 1:  # type: ignore[operator]
        raise FedsbError(field=field, value=value, fix=fix)
    return value  # type: ignore[return-value]


def non_negative_int(field: str, value: object, fix: str = "use a non-negative integer") -> int:
    """``value`` if it is an int >= 0, else FedsbError(field, value, fix)."""
    if not _is_int(value) or value < 0:  # type: ignore[operator]
        raise FedsbError(field=field, value=value, fix=fix)
    return value  # type: ignore[return-value]


def fraction(field: str, value: object, fix: str = "use a fraction in [0, 1), e.g. 0.05") -> float:
    """``value`` as a float if it is a number in [0, 1), else FedsbError(field, value, fix)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise FedsbError(field=field, value=value, fix=fix)
    return float(value)


def check_bool(field: str, value: object, fix: str = "use true or false") -> bool:
    """``value`` if it is a bool, else FedsbError(field, value, fix)."""
    if not isinstance(value, bool):
        raise FedsbError(field=field, value=value, fix=fix)
    return value
