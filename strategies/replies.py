"""Read the replies of nodes defensively: every field of every reply is checked before it is used.

A reply from a buggy or hostile site may lack a record, carry a record of the wrong kind, or hold values of
the wrong type or out of range. Each reader here returns the parsed content or raises ``MalformedReply``
with a reason that names the field; the strategy records it as a rejection (training), a failure
(evaluation) or a missing node (discovery). Nothing a node sends can raise anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from strategies.transport import to_state_dict


class MalformedReply(ValueError):
    """A reply whose content is missing or has the wrong type; the message names the field."""


@dataclass(frozen=True)
class TrainReply:
    body: dict[str, torch.Tensor]
    loss: float
    examples: int
    round: int
    head_kept: bool | None  # head_policy=keep: was an earlier head found? None: not said (reinit)


@dataclass(frozen=True)
class QueryAnswer:
    info_json: str
    entry: str
    role: str
    site: str
    signature: str | None


def array_bytes(content: RecordDict) -> int:
    """The bytes of every array record of a message's content, as Flower serialises them (data and keys)."""
    return sum(record.count_bytes() for record in content.array_records.values())


def first_line(text: str, limit: int = 200) -> str:
    """The first line of an error message, capped: what a record keeps of a node's traceback."""
    return (text.strip().splitlines() or [""])[0][:limit]


def _record(msg: Message, key: str, kind: type) -> Any:
    content = msg.content
    if key not in content:
        raise MalformedReply(f"reply has no '{key}' record")
    record = content[key]
    if not isinstance(record, kind):
        raise MalformedReply(f"reply's '{key}' is of type {type(record).__name__}, expected {kind.__name__}")
    return record


def _number(record: MetricRecord | ConfigRecord, key: str, where: str, *, integer: bool = False) -> float | int:
    if key not in record:
        raise MalformedReply(f"'{where}' has no '{key}'")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise MalformedReply(f"'{where}.{key}' must be {'an int' if integer else 'a number'}, got {value!r}")
    return value


def _text(record: ConfigRecord, key: str, where: str, *, required: bool = True) -> str:
    if key not in record:
        if required:
            raise MalformedReply(f"'{where}' has no '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise MalformedReply(f"'{where}.{key}' must be a string, got {type(value).__name__}")
    return value


def read_train_reply(msg: Message, *, consume: bool = False) -> TrainReply:
    """The body and statistics of a train reply. A non-finite loss is malformed too: it says training diverged.
    The body shares the reply's bytes (``strategies.transport.to_state_dict``): decoding copies nothing.
    ``consume``: the reply is the caller's own (just pulled) and is emptied, so the body holds the only reference."""
    arrays = _record(msg, "arrays", ArrayRecord)
    metrics = _record(msg, "metrics", MetricRecord)
    loss = float(_number(metrics, "train-loss", "metrics"))
    if not math.isfinite(loss):
        raise MalformedReply(f"'metrics.train-loss' is {loss}: training diverged")
    examples = int(_number(metrics, "num-examples", "metrics", integer=True))
    if examples < 0:
        raise MalformedReply(f"'metrics.num-examples' is negative ({examples})")
    server_round = int(_number(metrics, "server-round", "metrics", integer=True))
    head_kept = bool(_number(metrics, "head-kept", "metrics", integer=True)) if "head-kept" in metrics else None
    try:
        body = to_state_dict(arrays, consume=consume)
    except Exception as exc:  # noqa: BLE001 - whatever the arrays hold, the reason goes into the record
        raise MalformedReply(f"'arrays' cannot be decoded: {type(exc).__name__}: {exc}") from None
    return TrainReply(body, loss, examples, server_round, head_kept)


def read_evaluate_reply(msg: Message, views: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """view -> metric -> value of an evaluate reply; every asked view must be there, every value finite."""
    metrics = _record(msg, "metrics", MetricRecord)
    by_view: dict[str, dict[str, float]] = {}
    for key in metrics:
        view, _, metric = key.partition(".")
        if view not in views:
            continue
        value = _number(metrics, key, "metrics")
        if not math.isfinite(value):
            raise MalformedReply(f"'metrics.{key}' is {value}")
        by_view.setdefault(view, {})[metric] = float(value)
    missing = [v for v in views if v not in by_view]
    if missing:
        raise MalformedReply(f"reply has no scores for the view(s) {missing}")
    return by_view


def read_query_answer(msg: Message) -> QueryAnswer:
    """A node's answer to the task query: its task (as JSON), its pool entry, role, site and body signature."""
    task = _record(msg, "task", ConfigRecord)
    signature = _text(task, "body-signature", "task", required=False) or None
    return QueryAnswer(_text(task, "info", "task"), _text(task, "entry", "task"), _text(task, "role", "task"),
                       _text(task, "site", "task", required=False), signature)
