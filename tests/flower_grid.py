"""An in-process Flower Grid for fast tests: messages go straight to a ClientApp, one Context per node.

Nodes can be told to vanish (no reply: a dead SuperNode) or to have their replies rewritten (a malformed
client); everything else is the real ClientApp handling real Flower Messages.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """`num_nodes` nodes with partition ids 0..n-1, served synchronously by `client_app`."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        # what a ServerApp process gets from its SuperLink: Message() reads these
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
        self.silent: set[int] = set()  # nodes that never answer train messages
        self.tamper: dict[int, Callable[[Message], Message]] = {}  # node -> reply rewriter
        self.pushed: list[Message] = []

    def set_run(self, run) -> None:  # noqa: ANN001 - unused in tests
        pass

    @property
    def run(self):  # noqa: ANN201
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            self.pushed.append(msg)
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node in self.silent and msg.metadata.message_type == "train":
                continue
            # a copy, as after transport: a client must not share objects with the server or other nodes
            reply = copy.deepcopy(self.client_app(copy.deepcopy(msg), self.contexts[node]))
            if node in self.tamper and msg.metadata.message_type == "train":
                reply = self.tamper[node](reply)
            self.replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
