"""Validate contributions before fusion: pure functions over state dicts.

The paper's limitations section asks for "a way to make sure no malicious or erroneous model was sent",
by the size of the update among other things. Flower checks only that reply keys match. Here every
contribution must carry exactly the base's keys, with the same shapes and dtypes, only finite values,
and a change from the base whose L2 norm is within an absolute bound (``max_update_norm``) and within a
multiple of its **reference norm** (``max_relative_norm``):

* the reference of a contribution is the median norm of its **peers**: the round's other well-formed
  contributions (leave-one-out, so one outlier among two still stands out) plus the updates fused in the
  last fused round that stood (``reference_norms``; a round that back-tracking undid gives none), so that two
  colluding contributions in a round of two are judged against earlier honest updates, not only against each
  other. Zero norms (a node that sent the base back)
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

from strategies.chunks import squared_distance

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Contribution:
    node_id: int
    label: str  # the contributor: its task, or task#i when several nodes hold that task
    round: int  # the round the reply says it answers
    body: StateDict
    examples: int = 1  # the training examples behind it (example-weighted operators use it)


@dataclass(frozen=True)
class Rejection:
    node_id: int
    label: str
    reason: str

    def __str__(self) -> str:
        return f"{self.label} (node {self.node_id}): {self.reason}"


def inspect(body: StateDict, base: StateDict) -> tuple[str | None, float | None]:
    """(why ``body`` cannot be fused with ``base``, or None; the L2 norm of ``body - base``) in **one pass** over the
    tensors: keys, shapes and dtypes are metadata, and finiteness falls out of the norm (a NaN or an inf anywhere
    makes the sum of squares non-finite). Only a non-finite sum pays a second look: to name the first bad key, or,
    when every value is finite and only a square overflowed, to compute the norm in float64."""
    missing, extra = sorted(set(base) - set(body)), sorted(set(body) - set(base))
    if missing or extra:
        return f"keys differ from the body sent: missing {missing[:3]}, unexpected {extra[:3]}", None
    for key, ref in base.items():
        tensor = body[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            return f"'{key}' has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}", None
        if tensor.dtype != ref.dtype:
            return f"'{key}' has dtype {tensor.dtype}, expected {ref.dtype}", None
    total = sum(squared_distance(body[key], ref) for key, ref in base.items() if ref.is_floating_point())
    if not math.isfinite(total):
        bad = next((k for k, v in body.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            return f"'{bad}' contains non-finite values", None
        return None, update_norm(body, base)
    return None, math.sqrt(total)


def structural_problem(body: StateDict, base: StateDict) -> str | None:
    """Why ``body`` cannot be fused with ``base`` (keys, shapes, dtypes, finiteness), or None."""
    return inspect(body, base)[0]


def update_norm(body: StateDict, base: StateDict) -> float:
    """L2 norm of ``body - base`` over the floating-point tensors."""
    total = 0.0
    for key, ref in base.items():
        if ref.is_floating_point():
            total += float(((body[key].double() - ref.double()) ** 2).sum())
    return math.sqrt(total)


@dataclass(frozen=True)
class NormRule:
    """The update-norm rules (module docstring), judged from norms alone.

    ``judge`` is the rule itself, with every norm of the round known. ``early`` serves the streaming path, where
    contributions arrive one by one: it answers only when the answer cannot change whatever the ``unknown``
    contributions still outstanding turn out to be (arrive with any norm, or never), so a contribution accepted
    early is accepted by ``judge`` at the end, and one rejected early is rejected by it:

    * the reference is a median of peers, and adding peers with tiny norms can only lower it; the lowest it can
      get is the median with every outstanding one arrived with a norm near 0. At or under ``max_relative_norm``
      times that (or with too few peers for the rule even then), the contribution passes whatever comes;
    * adding peers with huge norms can only raise it; above ``max_relative_norm`` times the median with every
      outstanding one arrived with a huge norm, with enough peers already known, it fails whatever comes.
    Anything in between waits for more replies.
    """

    max_update_norm: float | None = None
    max_relative_norm: float | None = None
    reference_norms: tuple[float, ...] = ()  # norms fused in the last fused round that stood; zeros carry no scale
    min_peers: int = 2
    min_reference_norm: float = 1e-6

    def judge(self, norm: float, others: Sequence[float]) -> tuple[str | None, str | None]:
        """(rejection reason or None, note or None) for an update of ``norm`` among the round's ``others``."""
        if self.max_update_norm is not None and norm > self.max_update_norm:
            return f"update norm {norm:.3g} > max_update_norm {self.max_update_norm:.3g}", None
        if self.max_relative_norm is None:
            return None, None
        peers = self._peers(others)
        if len(peers) < self.min_peers:
            return None, (f"relative norm rule not applied ({len(peers)} peer norm(s) < "
                          f"validation.min_peers={self.min_peers})")
        reference = max(statistics.median(peers), self.min_reference_norm)
        if norm > self.max_relative_norm * reference:
            return (f"update norm {norm:.3g} > {self.max_relative_norm:g} x the reference norm ({reference:.3g}, "
                    f"median of {len(peers)} peers)"), None
        return None, None

    def early(self, norm: float, others: Sequence[float], unknown: int) -> bool | None:
        """True: ``judge`` will accept it; False: it will reject it; None: it depends on the ``unknown``
        contributions still outstanding (the class docstring says why this is exact)."""
        if self.max_update_norm is not None and norm > self.max_update_norm:
            return False
        if self.max_relative_norm is None:
            return True
        known = self._peers(others)
        lowest = known + [0.0] * unknown  # every outstanding one arrives with a norm near 0
        if len(lowest) < self.min_peers or norm <= self.max_relative_norm * max(
                statistics.median(lowest), self.min_reference_norm):
            return True
        highest = known + [math.inf] * unknown
        if len(known) >= self.min_peers and norm > self.max_relative_norm * max(
                statistics.median(highest), self.min_reference_norm):
            return False
        return None

    def _peers(self, others: Sequence[float]) -> list[float]:
        return [n for n in others if n > 0] + [n for n in self.reference_norms if n > 0]


def screen(contributions: Sequence[Contribution], base: StateDict, server_round: int,
           max_update_norm: float | None = None, max_relative_norm: float | None = None,
           reference_norms: Sequence[float] = (), min_peers: int = 2, min_reference_norm: float = 1e-6,
           ) -> tuple[list[Contribution], list[Rejection], dict[str, float], list[str]]:
    """Split a round's contributions into valid ones and rejections (with reasons), all at once.

    Returns (valid, rejected, update norms by contributor label for the structurally valid ones, notes on
    contributions the relative rule could not judge). Contributions are named by ``label``. The streaming path
    (``strategies.intake``) reaches the same verdicts one reply at a time.
    """
    rule = NormRule(max_update_norm, max_relative_norm, tuple(reference_norms), min_peers, min_reference_norm)
    valid, rejected, seen_nodes, norms = [], [], set(), {}
    for c in contributions:
        if (problem := admission_problem(c, server_round, seen_nodes)) is None:
            problem, norm = inspect(c.body, base)
        if problem is not None:
            rejected.append(Rejection(c.node_id, c.label, problem))
        else:
            valid.append(c)
            norms[c.label] = norm
        seen_nodes.add(c.node_id)
    kept, notes = [], []
    for c in valid:
        reason, note = rule.judge(norms[c.label], [norms[o.label] for o in valid if o is not c])
        if reason is not None:
            rejected.append(Rejection(c.node_id, c.label, reason))
            continue
        notes += [f"{c.label}: {note}"] if note else []
        kept.append(c)
    return kept, rejected, norms, notes


def admission_problem(c: Contribution, server_round: int, seen_nodes: set[int]) -> str | None:
    """Why a reply is not this round's contribution of its node (wrong round, a second reply), or None."""
    if c.round != server_round:
        return f"reply for round {c.round}, expected {server_round}"
    if c.node_id in seen_nodes:
        return "second reply from the same node in this round"
    return None


def assert_finite(state: StateDict, what: str) -> None:
    """Raise ValueError naming the first non-finite tensor: a base with NaN/inf must never exist. A tensor whose sum
    is finite holds only finite values (a NaN or an inf would make it non-finite), so only a tensor whose sum is not
    (a bad value, or finite values whose sum overflowed) pays the elementwise check."""
    for key, tensor in state.items():
        if tensor.is_floating_point() and not math.isfinite(float(tensor.sum())) \
                and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what}: '{key}' contains non-finite values")
