"""An in-process Flower Grid for fast tests: messages go straight to a ClientApp, one Context per node.

Nodes can be told to vanish (no reply: a dead SuperNode) or to have their replies rewritten (a malformed
client), and every message can meet a fresh ClientApp process (`fresh_processes`, as in a deployment:
only the node's Context survives); everything else is the real ClientApp handling real Flower Messages.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
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
        #: as in a deployment, every message meets a fresh ClientApp process: nothing cached between them
        self.fresh_processes = False
        #: node -> extra environment its ClientApp sees (as LocalDeployment's node_env: FEDSB_TEST_FAULTS)
        self.node_env: dict[int, dict[str, str]] = {}
        #: node -> round r: Flower 1.42's SuperNode after a ClientApp task of that node stopped responding:
        #: round r's train message is answered with CLIENT_APP_CRASHED, the ClientApp's own reply comes after
        #: it and from then on every reply of that node is forwarded only when the node pulls its next message
        self.crash_in_round: dict[int, int] = {}
        self.held: dict[int, list[tuple[str, Message]]] = {}  # node -> replies its SuperNode holds back

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
            if self.fresh_processes:
                from fedsb.flower import client_app as module

                module._CACHE.clear()
            for held_id, held in self.held.get(node, []):  # the SuperNode pulled a message: it forwards these
                self.replies[held_id] = held
            # a copy, as after transport: a client must not share objects with the server or other nodes
            reply = copy.deepcopy(self._serve(copy.deepcopy(msg), node))
            if node in self.tamper and msg.metadata.message_type == "train":
                reply = self.tamper[node](reply)
            if node in self.held:
                self.held[node] = [(mid, reply)]
            elif msg.metadata.group_id == str(self.crash_in_round.get(node)):
                crashed = Message(Error(code=8, reason="ClientApp stopped responding."), reply_to=msg)
                self.replies[mid] = crashed
                self.held[node] = [("late-" + mid, reply)]  # a second reply to the same message: unasked
            else:
                self.replies[mid] = reply
        return ids

    def _serve(self, msg: Message, node: int) -> Message:
        """The ClientApp's reply; as a SuperNode does, an exception becomes an error reply and leaves the
        node's Context as it was (Flower's run_clientapp: "Don't update/change NodeState")."""
        context = copy.deepcopy(self.contexts[node])
        saved = dict(os.environ)
        os.environ.update(self.node_env.get(node, {}))
        try:
            reply = self.client_app(msg, context)
        except Exception as exc:  # noqa: BLE001 - what the SuperNode does
            return Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.contexts[node] = context
        return reply

    def restart(self, node: int) -> None:
        """The SuperNode restarts: its Context (and everything in it) is gone, the node id stays."""
        old = self.contexts[node]
        self.contexts[node] = Context(
            run_id=old.run_id,
            node_id=node,
            node_config=dict(old.node_config),
            state=RecordDict(),
            run_config={},
        )

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(m) for m in list(message_ids) if m in self.replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
