"""Nodes whose SuperNode holds back one reply, and the `query.flush` messages that release it.

Flower 1.42's SuperNode forwards replies only right after it pulled a message, and then only those ready
at that moment. Once it answered a message itself for a ClientApp task whose heartbeat stopped
(`CLIENT_APP_CRASHED`, "ClientApp stopped responding.": a `flwr-clientapp` process whose final push of
the node's context failed, as after the SmolLM2 benchmark's setup), the reply of the ClientApp that was
then running arrives after it and is held until the next pull; from then on every reply is forwarded one
message late, and a server that waits for it waits its full round timeout. The server cannot clear that
lag (only a restart of the SuperNode does), but it can release each held reply: while a lagging node's
train reply is pending, it keeps one tiny `query.flush` message (no arrays, answered at once by the
ClientApp) outstanding to it, at most one every `FLUSH_SECONDS`; the pull of each flush makes the SuperNode
forward what is ready, the train reply included once it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedsb.flower import protocol as P

log = logging.getLogger("fedsb.flower.server")

FLUSH_SECONDS = 2.0


class HeldReplies:
    """The lagging nodes (believed to hold back one reply) and the flush messages outstanding to them."""

    def __init__(self, grid: Grid, interval: float = FLUSH_SECONDS) -> None:
        self.grid = grid
        self.interval = interval
        self.lagging: set[int] = set()
        self.outstanding: dict[str, int] = {}  # flush message id -> node id
        self.next_at: dict[int, float] = {}  # node id -> earliest time of its next flush
        self.sent = 0  # flush messages sent so far

    def suspect(self, node: int, round: int, why: str) -> None:
        """Count `node` as lagging from now on (its replies are flushed while a train reply is pending)."""
        if node not in self.lagging:
            log.warning(
                "round %d: SuperNode %s may hold back its replies (%s): its pending replies are released "
                "with query.flush messages from now on (a restart of that SuperNode clears this)",
                round,
                node,
                why,
            )
            self.lagging.add(node)

    def ids(self) -> list[str]:
        """The flush messages whose replies have not come yet (pull them with the train replies)."""
        return list(self.outstanding)

    def take(self, reply: Message) -> bool:
        """True if `reply` answers a flush (consumed here, whatever it carries)."""
        return self.outstanding.pop(reply.metadata.reply_to_message_id, None) is not None

    def flush(self, waiting: Iterable[int], round: int) -> None:
        """Send a flush to each lagging node of `waiting` (nodes with a train reply pending) that has none
        outstanding and whose interval has passed."""
        now, busy = time.monotonic(), set(self.outstanding.values())
        due = [n for n in waiting if n in self.lagging and n not in busy and self.next_at.get(n, 0.0) <= now]
        if not due:
            return
        messages = [
            Message(RecordDict(), dst_node_id=n, message_type=P.FLUSH_MESSAGE, group_id=str(round))
            for n in due
        ]
        for mid, node in zip(self.grid.push_messages(messages), due, strict=True):
            self.outstanding[mid] = node
            self.next_at[node] = now + self.interval
        self.sent += len(due)
