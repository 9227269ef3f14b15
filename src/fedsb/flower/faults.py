"""Test-only fault injection: a ClientApp that breaks its own train replies, to test the server inside a
real deployment (the in-process Grid of the tests rewrites replies with `corrupt` directly).

Off unless the SuperNode's environment sets `FEDSB_TEST_FAULTS` (its ClientApp processes inherit it), e.g.
`FEDSB_TEST_FAULTS="1:nan 2:shape 3:fingerprint 4:stale"`: round -> how that round's reply is broken after
honest training. No config file, override or run-config key can switch it on, and every broken reply is
logged as a warning on the node. The server must reject each with the simulator's reason
(`fedsb.fed.validate`) while the round goes on with the other clients.

Round 0 names the node's first `query.setup` (later setups, sent again by `FlowerExecutor.rejoin`, are
honest): `0:lose-setup` answers it but keeps nothing in the node's `context.state` (what a SuperNode's
failed context push does: the reply reached the server, the state did not), `0:fail-setup` answers it
with an error reply, `0:lose-push` (deployment only; elsewhere `lose-setup`) answers it and skips the
ClientApp process's final push of its task output, as when that HTTP push fails: the node keeps no setup and
its SuperNode holds the task as running until its heartbeat expires. Only the count of setups seen is
kept, under `COUNTER` (for `lose-push`, in a marker file in the node's working directory).
`<round>:slow` makes that round's train message wait `SLOW_SECONDS` before training; `<round>:gate` makes
it wait until the file named by `FEDSB_TEST_FAULTS_GATE` exists (at most `GATE_SECONDS`), so a test can hold
a round until something outside the run happened (a restarted SuperNode is back) without guessing a time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from fedsb.flower import protocol as P

ENV = "FEDSB_TEST_FAULTS"
#: if set, only the ClientApp of this partition id applies the plan (simulation: one environment, all nodes)
PARTITION_ENV = "FEDSB_TEST_FAULTS_PARTITION"
#: how a reply can be broken: a NaN entry, an extra row, the wrong wire dtype, the previous round's number,
#: no example count, a foreign basis fingerprint, a smuggled tensor, no update arrays at all
KINDS = ("nan", "shape", "dtype", "stale", "no-count", "fingerprint", "extra", "no-arrays", "slow", "gate")
SLOW_SECONDS = 75.0  # "slow": the ClientApp waits this long before training (past Flower's 60 s task expiry)
GATE_ENV = "FEDSB_TEST_FAULTS_GATE"  # "gate": the file whose existence lets that round's training start
GATE_SECONDS = 45.0  # "gate": the longest wait (below Flower's 60 s task expiry), then it trains anyway
#: how the node's first setup (round 0) can fail: answered but not kept in its state, or an error reply
SETUP_KINDS = ("lose-setup", "lose-push", "fail-setup")
COUNTER = "fedsb.test.faults"  # ConfigRecord in context.state: setups (query.setup messages seen)

log = logging.getLogger("fedsb.flower.client")


def fault_plan(text: str) -> dict[int, str]:
    """`"1:nan 2:shape"` -> {1: "nan", 2: "shape"}; ValueError naming the bad item otherwise."""
    plan: dict[int, str] = {}
    for item in text.replace(",", " ").split():
        rnd, sep, kind = item.partition(":")
        if not sep or not rnd.isdigit() or kind not in (SETUP_KINDS if rnd == "0" else KINDS):
            raise ValueError(
                f"{ENV}: {item!r} is not <round>:<kind> with kind one of {', '.join(KINDS)} "
                f"(round 0, the first setup: {', '.join(SETUP_KINDS)})"
            )
        plan[int(rnd)] = kind
    return plan


def corrupt(reply: Message, kind: str) -> Message:
    """`reply` (a train reply) broken as `kind` (see `KINDS`); the first update tensor is the one changed."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedsb.flower.records import from_record, to_record

    meta = dict(reply.content.config_records[P.UPDATE_META])
    tensors = from_record(reply.content.array_records[P.UPDATE])
    name = next(iter(tensors))
    if kind == "nan":
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    elif kind == "shape":
        tensors[name] = torch.cat([tensors[name], tensors[name][:1]])  # (m + 1, ...)
    elif kind == "dtype":
        tensors[name] = tensors[name].double()
    elif kind == "stale":
        meta["round"] = int(meta["round"]) - 1
    elif kind == "no-count":
        del meta["num-examples"]
    elif kind == "fingerprint":
        meta["fingerprint"] = "0" * 64
    elif kind == "extra":
        tensors["smuggled"] = torch.zeros(2)
    content = RecordDict({P.UPDATE: to_record(tensors), P.UPDATE_META: ConfigRecord(meta)})
    if kind == "no-arrays":
        content = RecordDict({P.UPDATE_META: ConfigRecord(meta), "x": ArrayRecord()})
    reply.content = content
    return reply


def setup_fault(msg: Message, context: Context, call_next: Any, text: str) -> Message:
    """The node's first setup broken as the plan's round 0 says (`SETUP_KINDS`); later ones honest."""
    from flwr.app import ConfigRecord, Error, RecordDict
    from flwr.common.constant import ErrorCode

    marker = Path.cwd() / f".fedsb-test-fault-{context.node_id}-{context.run_id}"  # lose-push: no state kept
    seen = int(context.state.config_records.get(COUNTER, ConfigRecord({"setups": 0}))["setups"])
    seen += int(marker.exists())
    kind = fault_plan(text).get(0) if seen == 0 else None
    if kind is None:
        reply = call_next(msg, context)
        context.state[COUNTER] = ConfigRecord({"setups": seen + 1})
        return reply
    log.warning("%s=%r: the first setup %s (test-only fault injection)", ENV, text, kind)
    if kind == "fail-setup":  # an error reply, as from a ClientApp that raised (the count is kept)
        context.state[COUNTER] = ConfigRecord({"setups": 1})
        reason = f"{ENV}: the first setup fails (test-only fault injection)"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    if kind == "lose-push":
        marker.touch()  # the count cannot live in the state this fault keeps from being saved
        skip_task_output_push()
    kept = RecordDict(dict(context.state.items()))  # the state as it was: the setup is not kept
    reply = call_next(msg, context)
    context.state = kept
    context.state[COUNTER] = ConfigRecord({"setups": 1})
    return reply


def skip_task_output_push() -> None:
    """In a deployed `flwr-clientapp` process: its exit handler's push of the context and status to the
    SuperNode (`run_clientapp.push_task_output`) does nothing, as if that HTTP request failed."""
    import sys

    module = sys.modules.get("flwr.supernode.runtime.run_clientapp")
    if module is not None:
        module.push_task_output = lambda **_: log.warning("%s: task output not pushed (test-only)", ENV)  # type: ignore[attr-defined]


def wait_before_training(kind: str | None, text: str) -> None:
    """`slow`: sleep `SLOW_SECONDS`; `gate`: poll for the `GATE_ENV` file, at most `GATE_SECONDS`."""
    import time

    if kind == "slow":
        log.warning("%s=%r: waiting %g s before training (test-only)", ENV, text, SLOW_SECONDS)
        time.sleep(SLOW_SECONDS)
    if kind != "gate":
        return
    gate = Path(os.environ.get(GATE_ENV, ""))
    log.warning("%s=%r: waiting for %s before training (test-only)", ENV, text, gate)
    deadline = time.monotonic() + GATE_SECONDS
    while not (gate.name and gate.exists()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not (gate.name and gate.exists()):
        log.warning("%s: %s did not appear within %g s: training anyway", ENV, gate, GATE_SECONDS)


def fault_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """A ClientApp mod: with `FEDSB_TEST_FAULTS` set, break the node's first setup (round 0) or the train
    replies of the rounds it names."""
    text = os.environ.get(ENV)
    only = os.environ.get(PARTITION_ENV)
    if only and str(context.node_config.get("partition-id")) != only:
        text = None
    if text and msg.metadata.message_type == P.SETUP_MESSAGE:
        return setup_fault(msg, context, call_next, text)
    if text and msg.metadata.message_type == P.TRAIN_MESSAGE:
        rnd = msg.content.config_records.get(P.ROUND_CONFIG)
        if rnd is not None:
            wait_before_training(fault_plan(text).get(int(rnd["round"])), text)
    reply = call_next(msg, context)
    if not text or msg.metadata.message_type != P.TRAIN_MESSAGE or reply.has_error():
        return reply
    if P.UPDATE_META not in reply.content.config_records:  # not a plain train reply (SecAgg+ stages)
        return reply
    kind = fault_plan(text).get(int(reply.content.config_records[P.UPDATE_META]["round"]))
    if kind is None or kind in ("slow", "gate"):
        return reply
    log.warning("%s=%r: sending a %s reply (test-only fault injection)", ENV, text, kind)
    return corrupt(reply, kind)
