"""Send a phase's messages and take the replies one by one as they arrive (Flower's Grid push/pull API), with
progress in the log.

Flower's ``grid.send_and_receive`` returns every reply at once, so a server would hold all K bodies before
looking at the first. Here each reply is pulled on its own and handed to ``on_reply`` straight away (training
folds it into the fusion and drops it: ``strategies.intake``), so at most one reply is in memory at a time.

For rounds that take minutes, a line every ``progress_s`` seconds says how far the phase is (the ServerApp's
output reaches the user as streamed log lines, so periodic lines rather than a live bar).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

from flwr.app import Message
from flwr.common import log
from flwr.serverapp import Grid


def exchange(grid: Grid, messages: Iterable[Message], timeout: float, on_reply: Callable[[Message], None],
             progress: Callable[[int, float], str], *, progress_s: float = 30.0, poll_s: float = 1.0) -> list[int]:
    """Push ``messages``; pull the replies as they arrive until every message is answered or ``timeout`` seconds
    have passed, calling ``on_reply`` on each. Every ``progress_s`` seconds, log ``progress(pending, elapsed)``.
    Returns the destination node ids that sent no reply (late ones, and messages Flower could not push)."""
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    pending = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid}
    unpushed = [m.metadata.dst_node_id for mid, m in zip(ids, messages) if not mid]
    if unpushed:
        log(WARNING, "Flower could not push the messages to node(s) %s", unpushed)
    del messages  # the phase's outgoing bodies are Flower's to send now
    start = time.monotonic()
    last_line = start
    while pending:
        for message_id in list(pending):
            for reply in grid.pull_messages([message_id]):  # one at a time: one reply in memory
                if pending.pop(reply.metadata.reply_to_message_id, None) is not None:
                    on_reply(reply)
                del reply
        now = time.monotonic()
        if not pending or now - start >= timeout:
            break
        if now - last_line >= progress_s:
            log(INFO, "%s", progress(len(pending), now - start))
            last_line = now
        time.sleep(min(poll_s, max(0.0, timeout - (now - start))))
    return unpushed + list(pending.values())
