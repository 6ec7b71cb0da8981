"""The shape every fusion operator has: a small, typed operator (its parameters, validated) that starts an
accumulator for each round; the accumulator folds contributions in one at a time and finishes with the next base.

Why accumulators: a round's contributions can then be folded as they arrive and dropped at once (the streaming
data path), whatever the operator. An operator says whether it can do that in bounded memory (``streams``): a
mean, task arithmetic, the server optimizers and TIES keep running sums; the median and the trimmed mean need
every contribution of the round, which their accumulator keeps (in the contributions' own dtype) until
``finish``.

Folding order: the float64 sums are not associative, so the order of the folds could change the last bit of the
result. The strategy folds in a canonical order, sorted by contributor label (and node id), so a round's result
is the same bit for bit whatever order the replies arrived in, and a resumed run repeats an uninterrupted one
exactly. Operators whose result depends on the label itself (DARE's drop mask) seed from it, not from the order.

Architecture knowledge stays data: every operator fuses the floating-point tensors of the body it is given and
takes every other tensor (integer buffers such as position ids) from the base, untouched; each fused tensor is
cast back to the base's dtype.
"""

from __future__ import annotations

import dataclasses
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

StateDict = Mapping[str, torch.Tensor]


class FusionError(ValueError):
    """Bad operator parameters or contributions that cannot be fused; the message names the key."""


def check_compatible(body: StateDict, reference: StateDict, label: str) -> None:
    """FusionError unless ``body`` has exactly the reference's keys, with the same shapes."""
    if set(body) != set(reference):
        missing, extra = sorted(set(reference) - set(body)), sorted(set(body) - set(reference))
        raise FusionError(f"contribution {label} has mismatched keys: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, ref in reference.items():
        if tuple(body[key].shape) != tuple(ref.shape):
            raise FusionError(f"contribution {label}, key '{key}': shape {tuple(body[key].shape)} "
                              f"!= expected {tuple(ref.shape)}")


def require(key: str, value: Any, check: Callable[[Any], bool], rule: str, kind: type | tuple = (int, float)) -> None:
    """A parameter check whose message names the config key (``fusion.<key>``): ``value`` must be of ``kind``
    (never a bool where a number belongs) and pass ``check``."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds) or not check(value):
        raise FusionError(f"config key 'fusion.{key}' has invalid value {value!r}: must be {rule}")


def label_seed(*parts: Any) -> int:
    """A stable 63-bit seed from printable parts (Python's hash() is salted per process)."""
    text = "/".join(map(str, parts)).encode()
    return (zlib.crc32(text) << 31) ^ zlib.crc32(text[::-1])


class Accumulator(ABC):
    """One round's fusion in progress: ``fold`` each contribution, then ``finish`` once."""

    def __init__(self, operator: "FusionOperator", base: StateDict, server_round: int) -> None:
        self.operator, self.base, self.round = operator, base, server_round
        self.floating = [k for k, v in base.items() if v.is_floating_point()]
        self.count = 0
        self.labels: list[str] = []

    def fold(self, body: StateDict, *, label: str, examples: int = 1, weight: float = 1.0) -> None:
        """Add one contribution (a body, i.e. the base plus its update); ``weight`` scales its say in operators
        that weigh contributions (1 for all in a synchronous round)."""
        check_compatible(body, self.base, label)
        if not weight > 0:
            raise FusionError(f"contribution {label}: weight {weight!r} must be > 0")
        self._fold(body, label, examples, float(weight))
        self.count += 1
        self.labels.append(label)

    def finish(self) -> dict[str, torch.Tensor]:
        """The next base: every floating tensor fused (cast to the base's dtype), every other taken from the base."""
        if self.count == 0:
            raise FusionError("nothing to fuse: no contributions")
        fused = self._finish()
        return {k: fused[k].to(v.dtype) if k in fused else v.clone() for k, v in self.base.items()}

    def update(self, body: StateDict, key: str) -> torch.Tensor:
        """One tensor of a contribution's update, ``body - base``, in float64."""
        return body[key].to(torch.float64) - self.base[key].to(torch.float64)

    @abstractmethod
    def _fold(self, body: StateDict, label: str, examples: int, weight: float) -> None: ...

    @abstractmethod
    def _finish(self) -> dict[str, torch.Tensor]:
        """The fused floating tensors: in float64 (``finish`` casts them) or already in the base's dtype."""


@dataclasses.dataclass
class FusionOperator(ABC):
    """A fusion operator: its parameters are the dataclass fields (``conf/fusion/<name>.yaml``)."""

    name: ClassVar[str]
    streams: ClassVar[bool]  # True: bounded memory whatever the number of contributions
    weighs: ClassVar[bool] = True  # False: every contribution counts once, a fold weight other than 1 is refused

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> dict[str, Any]:
        """What a round record says fused it: the operator and its parameters."""
        return {"operator": self.name, **self.params()}

    @abstractmethod
    def start(self, base: StateDict, server_round: int) -> Accumulator: ...

    # Server optimizers keep state across rounds; it is saved with each checkpoint and restored on resume.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise FusionError(f"fusion operator '{self.name}' keeps no state, got {sorted(state)[:3]}")
