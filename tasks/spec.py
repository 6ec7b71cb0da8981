"""What a task is: the facts every part of the system agrees on.

A task's data is a ``datasets.DatasetDict`` with a ``train`` and a ``test`` split (``validation``
optional) and the columns ``text``, ``label`` and, for sentence-pair tasks, ``text_pair``.
``label`` is an int in ``[0, num_labels)`` for classification, a float for regression
(``num_labels == 1``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


class TaskDataError(ValueError):
    """A task's data or definition is unusable; the message names the file or key at fault."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    num_labels: int  # 1 means regression
    sentence_pair: bool
    label_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TaskInfo":
        """Parse a node's task definition; TaskDataError naming the field if any is missing or of the wrong type."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TaskDataError(f"task definition must be a JSON object, got {type(data).__name__}")
        checks = {"name": lambda v: isinstance(v, str) and v != "",
                  "num_labels": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                  "sentence_pair": lambda v: isinstance(v, bool),
                  "label_names": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)}
        unknown = sorted(set(data) - set(checks))
        if unknown:
            raise TaskDataError(f"task definition has unknown field(s) {unknown}")
        data.setdefault("label_names", [])
        for key, valid in checks.items():
            if key not in data or not valid(data[key]):
                raise TaskDataError(f"task definition field '{key}' is missing or invalid: {data.get(key)!r}")
        return cls(data["name"], data["num_labels"], data["sentence_pair"], tuple(data["label_names"]))
