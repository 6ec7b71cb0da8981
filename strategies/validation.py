"""Validate contributions before fusion: pure functions over state dicts.

The paper's limitations section asks for "a way to make sure no malicious or erroneous model was sent",
by the size of the update among other things. Flower checks only that reply keys match. Here every
contribution must carry exactly the base's keys, with the same shapes and dtypes, only finite values,
and a change from the base whose L2 norm is within an absolute bound and within a multiple of the
median norm of the *other* contributions of the round (leave-one-out, so one outlier among two still
stands out).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Contribution:
    node_id: int
    task: str
    round: int  # the round the reply says it answers
    body: StateDict


@dataclass(frozen=True)
class Rejection:
    node_id: int
    task: str
    reason: str

    def __str__(self) -> str:
        return f"{self.task} (node {self.node_id}): {self.reason}"


def structural_problem(body: StateDict, base: StateDict) -> str | None:
    """Why ``body`` cannot be fused with ``base`` (keys, shapes, dtypes, finiteness), or None."""
    missing, extra = sorted(set(base) - set(body)), sorted(set(body) - set(base))
    if missing or extra:
        return f"keys differ from the body sent: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, ref in base.items():
        tensor = body[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            return f"'{key}' has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
        if tensor.dtype != ref.dtype:
            return f"'{key}' has dtype {tensor.dtype}, expected {ref.dtype}"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"'{key}' contains non-finite values"
    return None


def update_norm(body: StateDict, base: StateDict) -> float:
    """L2 norm of ``body - base`` over the floating-point tensors."""
    total = 0.0
    for key, ref in base.items():
        if ref.is_floating_point():
            total += float(((body[key].double() - ref.double()) ** 2).sum())
    return math.sqrt(total)


def screen(contributions: Sequence[Contribution], base: StateDict, server_round: int,
           max_update_norm: float | None = None, max_relative_norm: float | None = None,
           ) -> tuple[list[Contribution], list[Rejection], dict[str, float]]:
    """Split a round's contributions into valid ones and rejections (with reasons).

    Returns (valid, rejected, update norms by task for the structurally valid ones).
    """
    valid, rejected, seen_nodes = [], [], set()
    for c in contributions:
        if c.round != server_round:
            rejected.append(Rejection(c.node_id, c.task, f"reply for round {c.round}, expected {server_round}"))
        elif c.node_id in seen_nodes:
            rejected.append(Rejection(c.node_id, c.task, "second reply from the same node in this round"))
        elif (problem := structural_problem(c.body, base)) is not None:
            rejected.append(Rejection(c.node_id, c.task, problem))
        else:
            valid.append(c)
        seen_nodes.add(c.node_id)
    norms = {c.task: update_norm(c.body, base) for c in valid}
    kept = []
    for c in valid:
        norm = norms[c.task]
        others = [norms[o.task] for o in valid if o is not c]
        if max_update_norm is not None and norm > max_update_norm:
            rejected.append(Rejection(c.node_id, c.task, f"update norm {norm:.3g} > max_update_norm {max_update_norm:.3g}"))
        elif max_relative_norm is not None and others and norm > max_relative_norm * statistics.median(others):
            median = statistics.median(others)
            rejected.append(Rejection(c.node_id, c.task, f"update norm {norm:.3g} > {max_relative_norm:g} x the "
                                                         f"median of the others ({median:.3g})"))
        else:
            kept.append(c)
    return kept, rejected, norms


def assert_finite(state: StateDict, what: str) -> None:
    """Raise ValueError naming the first non-finite tensor: a base with NaN/inf must never exist."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what}: '{key}' contains non-finite values")
