"""An in-process Flower Grid: the real ClientApp handlers, called directly, one Context per node.

Fast strategy tests (35 nodes in seconds) without a SuperLink; the real `flwr run` path is covered by
tests/test_simulation.py.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(self, client_app, node_configs: list[dict], run_id: int = 1, node_id_step: int = 1) -> None:
        # node_id_step=-1 numbers the nodes the other way round, like a new run's random ids would
        self.client_app = client_app
        self.contexts = {
            5000 + node_id_step * i: Context(run_id=run_id, node_id=5000 + node_id_step * i, node_config=dict(cfg),
                                             state=RecordDict(), run_config={})
            for i, cfg in enumerate(node_configs)
        }
        self.sent: list[Message] = []
        self.replies: list[Message] = []
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

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Every message's reply, computed here and now. ``timeout`` is ignored on purpose: a reply is never late,
        so a test over this grid holds however busy the machine is (late replies are tested with real Flower)."""
        replies = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self._run_id, node_id, len(self.sent)
            self.sent.append(message)
            reply = self.client_app(message, self.contexts[node_id])
            replies.append(reply)
        self.replies.extend(replies)
        return replies
