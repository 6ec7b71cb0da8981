"""An in-process Flower Grid: the real ClientApp handlers, called directly, one Context per node.

Fast strategy tests (35 nodes in seconds) without a SuperLink; the real `flwr run` path is covered by
tests/test_simulation.py.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(self, client_app, node_configs: list[dict], run_id: int = 1, node_id_step: int = 1,
                 arrival: str = "sent") -> None:
        # node_id_step=-1 numbers the nodes the other way round, like a new run's random ids would.
        # arrival: the order pushed messages' replies arrive in: "sent", or "reversed" (the last sent first).
        self.client_app = client_app
        self.arrival = arrival
        self._arrived: list[Message] = []  # replies that have arrived and not been pulled, in arrival order
        self.contexts = {
            5000 + node_id_step * i: Context(run_id=run_id, node_id=5000 + node_id_step * i, node_config=dict(cfg),
                                             state=RecordDict(), run_config={})
            for i, cfg in enumerate(node_configs)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.pulled: list[Message] = []  # replies pulled, in the order they were pulled
        self._run_id = run_id
        # Messages built outside a Flower runtime need a task identity (the strategy builds them too).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 1, 0

    def set_run(self, run) -> None:  # pragma: no cover - not used by the strategy
        raise NotImplementedError

    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Every message's reply is computed here and now; they arrive in the grid's ``arrival`` order. A reply is
        never late, so a test over this grid holds however busy the machine is (late replies are tested with real
        Flower)."""
        ids, replies = [], []
        for message in messages:
            node_id = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = f"m{len(self.sent)}"  # as Flower's push sets it
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self._run_id, node_id, len(self.sent)
            self.sent.append(message)
            replies.append(self.client_app(message, self.contexts[node_id]))
            ids.append(message.metadata.message_id)
        self.replies.extend(replies)
        self._arrived += replies[::-1] if self.arrival == "reversed" else replies
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The next reply to arrive, if it is one of those asked for: a strategy pulling one id at a time sees the
        replies in arrival order. The strategy gets a copy, as from a real Grid (a message deserialised for it), so
        the one kept in ``replies`` for the test stays whole when the strategy consumes what it pulled."""
        if self._arrived and self._arrived[0].metadata.reply_to_message_id in set(message_ids):
            self.pulled.append(self._arrived.pop(0))
            return [copy.deepcopy(self.pulled[-1])]
        return []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        ids = set(self.push_messages(messages))
        replies = [r for r in self._arrived if r.metadata.reply_to_message_id in ids]
        self._arrived = [r for r in self._arrived if r.metadata.reply_to_message_id not in ids]
        return replies
