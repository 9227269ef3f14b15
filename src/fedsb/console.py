"""What a run prints while it runs: progress bars only on a terminal, and one line per round.

`bars_enabled(progress)`: tqdm bars are drawn only when `progress` is on and stderr (where tqdm draws) is a
terminal, so a redirected log holds no carriage returns or escape codes. `RoundClock` times this session's
rounds for the ETA (mean round time of this session x rounds left); `round_line` is the per-round line:

    round 2/6 | clients 2 accepted, 0 rejected | loss 4.612 | accuracy 12.5% (2/16) | 3.58 KB this round, 7.17 KB total | elapsed 0:00:05, ETA 0:00:10
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from fedsb.results import human_bytes
from fedsb.round_metrics import RoundMetrics


def bars_enabled(progress: bool, stream: TextIO | None = None) -> bool:
    """Progress bars: asked for (`progress`) and drawn on a terminal (`stream`, default stderr)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(progress and isatty is not None and isatty())


class RoundClock:
    """Elapsed time since the session started and the ETA from this session's mean round time."""

    def __init__(self, first_round: int, rounds: int) -> None:
        self.t0 = time.perf_counter()
        self.first_round = first_round  # the first round this session trains
        self.rounds = rounds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self, round: int) -> float | None:
        """Seconds until the last round, from the mean of this session's rounds up to `round` (incl.)."""
        done = round - self.first_round + 1
        return self.elapsed() / done * (self.rounds - round) if done > 0 else None


def round_line(m: RoundMetrics, *, elapsed: float, eta: float | None) -> str:
    """The one-line summary of round `m.round` (released figures only; see `fedsb.round_metrics`)."""
    clients = f"clients {m.accepted} accepted, {m.rejected} rejected" + (
        f", {m.dropped} dropped" if m.dropped else ""
    )
    parts = [f"round {m.round}/{m.rounds}", clients]
    if m.loss_withheld:
        parts.append("loss withheld (DP)")
    elif m.loss is not None:
        parts.append(f"loss {m.loss:.4g}")
    if "accuracy" in m.eval:
        acc = f"accuracy {100 * m.eval['accuracy']:.1f}%"
        if "correct" in m.eval and "total" in m.eval:
            acc += f" ({m.eval['correct']:.0f}/{m.eval['total']:.0f})"
        parts.append(acc)
    parts.append(f"{human_bytes(m.bytes_round)} this round, {human_bytes(m.bytes_total)} total")
    if m.epsilon is not None:
        parts.append(f"epsilon {m.epsilon:.3g}")
    timing = f"elapsed {clock(elapsed)}"
    if eta is not None and m.round < m.rounds:
        timing += f", ETA {clock(eta)}"
    parts.append(timing)
    return " | ".join(parts)


def clock(seconds: float) -> str:
    """3725.4 -> '1:02:05'."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
