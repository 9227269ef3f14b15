"""Per-message timing of the ClientApp (benchmarks/bench_flower.py): where each message's seconds go.

Off unless the SuperNode's (or simulation's) environment sets `FEDSB_FLOWER_TIMING` to a file: then every
message handled appends one JSON line there, with the process's age when the handler was entered
(`process_start_s`, 0 for a process that already served a message: Python and Flower start-up, the gRPC
fetch of the message, loading the ClientApp), the import of our client stack (`imports`: torch,
transformers, the job recipe; 0 once imported) and the phases the job recipe and the ClientApp time with
`fedsb.phases` (model build, data preparation, basis verification, node state, local training,
serialization). In a ClientApp forked by the warm SuperExec (`fedsb.flower.warm`) `forked_from` is the
launcher's PID (else null), `process_start_s` runs from the fork and `preloaded` says torch was already
imported when the handler was entered. Nothing here reads or changes what a message computes.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

ENV = "FEDSB_FLOWER_TIMING"
_LOADED = time.time()  # epoch seconds when the ClientApp module (which imports this one) was loaded
_SERVED = [0]  # messages this process handled so far


def process_started() -> float:
    """Epoch seconds at which this process started (Linux /proc; `_LOADED` elsewhere)."""
    try:
        stat = open("/proc/self/stat").read()  # noqa: SIM115 - one short read
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, clock ticks after boot
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _LOADED


def timed(handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Wrap a ClientApp handler `(msg, context) -> reply`: with `FEDSB_FLOWER_TIMING` set, append its
    message's timing line (see the module docstring) to that file."""

    @functools.wraps(handler)
    def wrapper(msg: Any, context: Any) -> Any:
        path = os.environ.get(ENV)
        if not path:
            return handler(msg, context)
        from fedsb import phases

        entered, t0 = time.time(), time.perf_counter()
        first = _SERVED[0] == 0
        preloaded = "torch" in sys.modules
        _SERVED[0] += 1
        phases.take()
        if msg.metadata.message_type == "train":
            with phases.phase("imports"):
                import fedsb.flower.client  # noqa: F401 - torch, transformers and the job recipe
        try:
            return handler(msg, context)
        finally:
            started = process_started()
            rnd = msg.content.config_records.get("fedsb.round")
            line = {
                "type": msg.metadata.message_type,
                "round": int(rnd["round"]) if rnd is not None else 0,
                "partition": context.node_config.get("partition-id"),
                "pid": os.getpid(),
                "fresh_process": first,
                "forked_from": _forked_from(),
                "preloaded": preloaded,
                "process_start_s": max(0.0, entered - started) if first else 0.0,
                "app_loaded_s": max(0.0, _LOADED - started) if first else 0.0,
                "handler_s": time.perf_counter() - t0,
                "phases": phases.take(),
            }
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")

    return wrapper


def _forked_from() -> int | None:
    warm = sys.modules.get("fedsb.flower.warm")
    return warm.FORKED_FROM[0] if warm is not None and warm.FORKED_FROM else None
