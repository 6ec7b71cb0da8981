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
        data = json.loads(text)
        data["label_names"] = tuple(data.get("label_names", ()))
        return cls(**data)
