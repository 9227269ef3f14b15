"""SIGINT and SIGTERM during a run: the first asks for a stop at the next consistent point, the second stops
at once.

`StopSignals` installs the handlers (main thread only; elsewhere, e.g. inside a Flower ServerApp, it does
nothing and the host's own handlers stay). The run checks `requested` after its setup, after the
untuned evaluation and after each round's checkpoint, and stops there with the resume command. A second
signal raises `KeyboardInterrupt` wherever the run is: the last checkpoint is still whole (checkpoints
are written to a temporary directory and renamed), so the run continues from it. `RunStopped` carries
the signal and the message; the CLI exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
A run a signal stopped leaves SIGINT/SIGTERM ignored (the process is stopping: the message is printed
and the exit status kept), and once the command is done, `exit_at_once_on_signals(code)` makes a signal
during the process's exit (the interpreter's teardown) end it at once with that code, instead of a
KeyboardInterrupt traceback or a death by SIGTERM (exit -15): everything is written by then.

Python cannot raise out of a weakref callback, a `__del__` or the garbage collector: an interrupt raised
there is printed as "Exception ignored" and lost. While the handlers are installed, such a lost
`StopNow` is re-delivered (the signal sent again from a thread, handled in ordinary code) and not
printed, so a second Ctrl-C always stops the run at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVERY_DELAY_S = 0.01  # a lost second signal is sent again after this (the hook has returned by then)


class RunStopped(Exception):
    """A run stopped by a signal before its last round; `message` says how to continue it."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        self.message = message
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopNow(KeyboardInterrupt):
    """The second signal: stop at once (a `KeyboardInterrupt`, so that everything treating one stays)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal_name(signum))


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager: SIGINT/SIGTERM set `requested` (the signal number); a second one interrupts. On
    exit the previous handlers come back, or, after a stop was requested, both signals stay ignored."""

    def __init__(self, *, enabled: bool = True, notify: Callable[[str], None] | None = None) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.notify = notify or (lambda text: print(text, file=sys.stderr, flush=True))
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}
        self._previous_hook: Callable[[Any], object] | None = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested is not None:
            raise StopNow(signum)  # the second signal: stop now (the last checkpoint stays valid)
        self.requested = signum
        self.notify(
            f"fedsb: {signal_name(signum)} received: stopping after the current round's checkpoint "
            "(send it again to stop at once)"
        )

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self._previous_hook, sys.unraisablehook = sys.unraisablehook, self._redeliver
        return self

    def _redeliver(self, unraisable: Any) -> None:
        """`sys.unraisablehook`: a `StopNow` raised where Python drops exceptions is raised again."""
        if isinstance(unraisable.exc_value, StopNow):  # sent later, from a thread: once this hook returned
            signum = unraisable.exc_value.signum
            resend = threading.Timer(REDELIVERY_DELAY_S, os.kill, args=(os.getpid(), signum))
            resend.daemon = True
            resend.start()
        elif self._previous_hook is not None:
            self._previous_hook(unraisable)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, previous in self._previous.items():  # after a stop: ignored while the process exits
            signal.signal(sig, previous if self.requested is None else signal.SIG_IGN)
        if self._previous_hook is not None:
            sys.unraisablehook, self._previous_hook = self._previous_hook, None
        self._previous = {}


def exit_at_once_on_signals(code: int) -> None:
    """From now on SIGINT/SIGTERM end the process at once with exit status `code` (the process is exiting
    with it: a second Ctrl-C while a stopped run shuts down changes nothing). Main thread only."""

    def _exit(_signum: int, _frame: FrameType | None) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, RuntimeError, ValueError):  # closed, or a write the signal interrupted
                pass
        os._exit(code)

    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _exit)
