"""Test-only fault injection: a ClientApp that breaks its own train replies, to test the server inside a
real deployment (the in-process Grid of the tests rewrites replies with `corrupt` directly).

Off unless the SuperNode's environment sets `FEDSB_TEST_FAULTS` (its ClientApp processes inherit it), e.g.
`FEDSB_TEST_FAULTS="1:nan 2:shape 3:fingerprint 4:stale"`: round -> how that round's reply is broken after
honest training. No config file, override or run-config key can switch it on, and every broken reply is
logged as a warning on the node. The server must reject each with the simulator's reason
(`fedsb.fed.validate`) while the round goes on with the other clients.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.app import Context, Message

from fedsb.flower import protocol as P

ENV = "FEDSB_TEST_FAULTS"
#: how a reply can be broken: a NaN entry, an extra row, the wrong wire dtype, the previous round's number,
#: no example count, a foreign basis fingerprint, a smuggled tensor, no update arrays at all
KINDS = ("nan", "shape", "dtype", "stale", "no-count", "fingerprint", "extra", "no-arrays")

log = logging.getLogger("fedsb.flower.client")


def fault_plan(text: str) -> dict[int, str]:
    """`"1:nan 2:shape"` -> {1: "nan", 2: "shape"}; ValueError naming the bad item otherwise."""
    plan: dict[int, str] = {}
    for item in text.replace(",", " ").split():
        rnd, sep, kind = item.partition(":")
        if not sep or not rnd.isdigit() or kind not in KINDS:
            raise ValueError(f"{ENV}: {item!r} is not <round>:<kind> with kind one of {', '.join(KINDS)}")
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


def fault_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """A ClientApp mod: with `FEDSB_TEST_FAULTS` set, break the train replies of the rounds it names."""
    reply = call_next(msg, context)
    text = os.environ.get(ENV)
    if not text or msg.metadata.message_type != P.TRAIN_MESSAGE or reply.has_error():
        return reply
    if P.UPDATE_META not in reply.content.config_records:  # not a plain train reply (SecAgg+ stages)
        return reply
    kind = fault_plan(text).get(int(reply.content.config_records[P.UPDATE_META]["round"]))
    if kind is None:
        return reply
    log.warning("%s=%r: sending a %s reply (test-only fault injection)", ENV, text, kind)
    return corrupt(reply, kind)
