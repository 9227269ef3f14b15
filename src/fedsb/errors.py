"""Errors that name the field, the offending value and the fix."""

from __future__ import annotations


class FedsbError(ValueError):
    """A user-facing error: `<field>=<value> <what>; fix: <fix>`.

    Attributes `field`, `value` and `fix` are kept so callers (the CLI, validators) can collect several
    problems and report them together.
    """

    def __init__(self, *, field: str, value: object, fix: str, what: str = "is not valid") -> None:
        self.field = field
        self.value = value
        self.fix = fix
        self.what = what
        super().__init__(f"{field}={value!r} {what}; fix: {fix}")


class ConfigError(FedsbError):
    """An invalid configuration value (raised by the config dataclasses and the CLI)."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupted or belongs to another run."""


class UpdateRejected(ValueError):
    """A client update that failed validation; `reason` is logged and the round goes on without it."""

    def __init__(self, client_id: str, reason: str) -> None:
        self.client_id = client_id
        self.reason = reason
        super().__init__(f"update from client {client_id!r} rejected: {reason}")
