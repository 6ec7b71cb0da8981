"""Validate contributions before fusion: pure functions over state dicts.

The paper's limitations section asks for "a way to make sure no malicious or erroneous model was sent",
by the size of the update among other things. Flower checks only that reply keys match. Here every
contribution must carry exactly the base's keys, with the same shapes and dtypes, only finite values,
and a change from the base whose L2 norm is within an absolute bound (``max_update_norm``) and within a
multiple of its **reference norm** (``max_relative_norm``):

* the reference of a contribution is the median norm of its **peers**: the round's other well-formed
  contributions (leave-one-out, so one outlier among two still stands out) plus the updates fused in the
  last fused round (``reference_norms``), so that two colluding contributions in a round of two are judged
  against earlier honest updates, not only against each other. Zero norms (a node that sent the base back)
  carry no scale and are left out;
* the reference is never below ``min_reference_norm``, so peers that barely moved cannot make every real
  update an outlier;
* with fewer than ``min_peers`` peers (round 1 of a run with one or two contributors) the rule cannot
  judge: the contribution passes on the other checks and ``screen`` returns a note saying so.
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
    label: str  # the contributor: its task, or task#i when several nodes hold that task
    round: int  # the round the reply says it answers
    body: StateDict


@dataclass(frozen=True)
class Rejection:
    node_id: int
    label: str
    reason: str

    def __str__(self) -> str:
        return f"{self.label} (node {self.node_id}): {self.reason}"


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
           reference_norms: Sequence[float] = (), min_peers: int = 2, min_reference_norm: float = 1e-6,
           ) -> tuple[list[Contribution], list[Rejection], dict[str, float], list[str]]:
    """Split a round's contributions into valid ones and rejections (with reasons).

    Returns (valid, rejected, update norms by contributor label for the structurally valid ones, notes on
    contributions the relative rule could not judge). Contributions are named by ``label``.
    """
    valid, rejected, seen_nodes = [], [], set()
    for c in contributions:
        if c.round != server_round:
            rejected.append(Rejection(c.node_id, c.label, f"reply for round {c.round}, expected {server_round}"))
        elif c.node_id in seen_nodes:
            rejected.append(Rejection(c.node_id, c.label, "second reply from the same node in this round"))
        elif (problem := structural_problem(c.body, base)) is not None:
            rejected.append(Rejection(c.node_id, c.label, problem))
        else:
            valid.append(c)
        seen_nodes.add(c.node_id)
    norms = {c.label: update_norm(c.body, base) for c in valid}
    history = [n for n in reference_norms if n > 0]
    kept, notes = [], []
    for c in valid:
        norm = norms[c.label]
        if max_update_norm is not None and norm > max_update_norm:
            rejected.append(Rejection(c.node_id, c.label, f"update norm {norm:.3g} > max_update_norm {max_update_norm:.3g}"))
            continue
        if max_relative_norm is not None:
            peers = [norms[o.label] for o in valid if o is not c and norms[o.label] > 0] + history
            if len(peers) < min_peers:
                notes.append(f"{c.label}: relative norm rule not applied ({len(peers)} peer norm(s) < "
                             f"validation.min_peers={min_peers})")
            else:
                reference = max(statistics.median(peers), min_reference_norm)
                if norm > max_relative_norm * reference:
                    rejected.append(Rejection(c.node_id, c.label, f"update norm {norm:.3g} > {max_relative_norm:g} x "
                                                                 f"the reference norm ({reference:.3g}, median of "
                                                                 f"{len(peers)} peers)"))
                    continue
        kept.append(c)
    return kept, rejected, norms, notes


def assert_finite(state: StateDict, what: str) -> None:
    """Raise ValueError naming the first non-finite tensor: a base with NaN/inf must never exist."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what}: '{key}' contains non-finite values")
