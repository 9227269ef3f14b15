"""Shared argparse pieces of the `fedsb` subcommands: renamed flags and the options every subcommand takes.

One name per idea across subcommands: `--output` for every output location (a directory or a file),
`--methods` for lists of METHOD[:R,...]. The old spellings (`--out`, `--method`) still work for one release
and print a deprecation warning.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["Renamed", "common_options"]


class Renamed(argparse.Action):
    """`store`, plus a warning on stderr when the option is spelled with one of its `deprecated` aliases."""

    def __init__(self, option_strings: Sequence[str], dest: str, deprecated: Sequence[str] = (), **kw: Any):
        self.deprecated = tuple(deprecated)
        super().__init__(option_strings, dest, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string in self.deprecated:
            print(
                f"fedsb: warning: {option_string} is deprecated and will be removed in the next release; "
                f"use {self.option_strings[0]}",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def common_options() -> argparse.ArgumentParser:
    """A parent parser with the options accepted before and after the subcommand (`-v/--verbose`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(  # SUPPRESS: absent after the subcommand, the top-level value stays
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    return common
