"""SIGINT and SIGTERM during a run: the first asks for a stop at the next consistent point, the second stops
at once.

`StopSignals` installs the handlers (main thread only; elsewhere, e.g. inside a Flower ServerApp, it does
nothing and the host's own handlers stay). The run checks `requested` after its setup, after the
untuned evaluation and after each round's checkpoint, and stops there with the resume command. A second
signal raises `KeyboardInterrupt` wherever the run is: the last checkpoint is still whole (checkpoints
are written to a temporary directory and renamed), so the run continues from it. `RunStopped` carries
the signal and the message; the CLI exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(Exception):
    """A run stopped by a signal before its last round; `message` says how to continue it."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        self.message = message
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager: SIGINT/SIGTERM set `requested` (the signal number); a second one interrupts."""

    def __init__(self, *, enabled: bool = True, notify: Callable[[str], None] | None = None) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.notify = notify or (lambda text: print(text, file=sys.stderr, flush=True))
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt  # the second signal: stop now (the last checkpoint stays valid)
        self.requested = signum
        self.notify(
            f"fedsb: {signal_name(signum)} received: stopping after the current round's checkpoint "
            "(send it again to stop at once)"
        )

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
