"""Errors that name the field, the offending value and the fix."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


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

    def renamed(self, names: Mapping[str, str]) -> FedsbError:
        """This error with `field` (and identifiers such as `min_size` in its text) renamed by `names`:
        a library argument name becomes the setting it came from (`min_size` -> `partition.min_size`)."""
        fix, what = self.fix, self.what
        for old, new in names.items():
            if "_" in old:  # plain words (size, split, column) stay words in the prose
                pattern = rf"(?<![\w.]){re.escape(old)}(?![\w])"
                fix, what = re.sub(pattern, new, fix), re.sub(pattern, new, what)
        return type(self)(field=names.get(self.field, self.field), value=self.value, fix=fix, what=what)


@contextmanager
def naming_settings(names: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a `FedsbError` whose field is a key of `names` under the dotted setting it maps to."""
    try:
        yield
    except FedsbError as exc:
        if exc.field not in names:
            raise
        raise exc.renamed(names) from exc.__cause__


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
