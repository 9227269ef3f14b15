"""Wall time of named phases of this process's work (model build, data preparation, ...), summed by name.

`with phase("model build"): ...` adds the block's seconds to that name; `take()` returns the sums so far and
starts afresh. Costs two clock reads per block; nothing else reads or changes a result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

_SECONDS: dict[str, float] = {}


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Add the block's wall time (seconds) to `name`'s sum."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _SECONDS[name] = _SECONDS.get(name, 0.0) + time.perf_counter() - t0


def take() -> dict[str, float]:
    """name -> seconds summed since the last `take` (in the order first seen); the sums restart at zero."""
    out = dict(_SECONDS)
    _SECONDS.clear()
    return out
