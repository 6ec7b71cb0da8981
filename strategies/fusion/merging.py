"""Model merging on task vectors: TIES, DARE and DARE-TIES. Each works on the updates ``u_i = body_i - base``
and returns ``base + scale * merged``; all stream (bounded memory whatever the number of contributions).

TIES's sign election and disjoint mean need, per coordinate, only the (weighted) sums of the positive and of the
negative sparse values and the weights behind each, so a round keeps four float64 accumulators, never the stack
of K task vectors that reference implementations (peft's ``merge_utils``, mergekit) build.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch

from strategies.fusion.base import Accumulator, FusionOperator, StateDict, label_seed, require
from strategies.fusion.means import WeightedSum


def keep_masks(seed: int, server_round: int, label: str, shapes: Mapping[str, torch.Size],
               drop: float) -> dict[str, torch.Tensor]:
    """DARE's Bernoulli(1 - drop) keep masks for one contribution: drawn from a generator seeded by the seed, the
    round and the contributor's label, over the keys of ``shapes`` in sorted order, so they never depend on the fold order
    and a resumed run redraws the same ones. Uniforms in float64 so ``>= drop`` compares against drop itself,
    not its float32 rounding."""
    generator = torch.Generator().manual_seed(label_seed(seed, server_round, label))
    return {k: torch.rand(shapes[k], generator=generator, dtype=torch.float64) >= drop for k in sorted(shapes)}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``; the caller masks out the rest (num is 0 there)."""
    return num / torch.where(den > 0, den, 1.0)


class SignSplit(Accumulator):
    """TIES's election and disjoint mean, streamed. Per coordinate: ``pos``/``neg``, the weighted sums of the
    positive/negative sparse update values, and ``pos_w``/``neg_w``, the weights behind them (the weighted counts;
    float64 since fold weights need not be integers). A fold's weight multiplies its values in the sums and its
    count, so with weights the disjoint mean is a weighted mean over the agreeing contributions (and the sign is
    elected by the weighted sum); with weight 1 for all it is the paper's rule. Subclasses say how a
    contribution's update is sparsified."""

    def __init__(self, operator, base, server_round) -> None:
        super().__init__(operator, base, server_round)
        self.pos, self.neg, self.pos_w, self.neg_w = (
            {k: torch.zeros(base[k].shape, dtype=torch.float64) for k in self.floating} for _ in range(4))

    @abstractmethod
    def sparse(self, body: StateDict, label: str) -> dict[str, torch.Tensor]:
        """The contribution's update, float64, zero where sparsified away."""

    def _fold(self, body: StateDict, label: str, examples: int, weight: float) -> None:
        for key, value in self.sparse(body, label).items():
            up, down = value > 0, value < 0
            self.pos[key].add_(torch.where(up, value, 0.0), alpha=weight)
            self.neg[key].add_(torch.where(down, value, 0.0), alpha=weight)
            self.pos_w[key].add_(up.to(torch.float64), alpha=weight)
            self.neg_w[key].add_(down.to(torch.float64), alpha=weight)

    def _finish(self) -> dict[str, torch.Tensor]:
        fused = {}
        for key in self.floating:
            pos, neg = self.pos[key], self.neg[key]
            elected = pos + neg  # its sign is the elected sign; exactly 0 (no value, or a perfect tie) merges to 0
            merged = torch.where(elected > 0, _ratio(pos, self.pos_w[key]),
                                 torch.where(elected < 0, _ratio(neg, self.neg_w[key]), 0.0))
            fused[key] = self.base[key].to(torch.float64) + self.operator.scale * merged
        return fused


@dataclass
class Ties(FusionOperator):
    """TIES-Merging (Yadav et al. 2023, https://arxiv.org/abs/2306.01708): trim each task vector to its
    top-``density`` fraction of coordinates by magnitude, elect a sign per coordinate (the sign of the sum of the
    trimmed values), and average only the trimmed values that agree with it.

    The trim is over the whole task vector (every floating key of the contribution), as in the paper, not per
    tensor as in peft: k = ceil(density * n) of its n coordinates, threshold = the k-th largest magnitude, and
    every coordinate with ``|u| >= threshold`` is kept. Exact ties at the threshold are all kept (so a few more
    than k may survive), which is deterministic and independent of memory layout, unlike topk's tie order."""

    name = "ties"
    streams = True
    density: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        require("density", self.density, lambda v: 0 < v <= 1, "a number in (0, 1]")
        require("scale", self.scale, lambda v: v > 0, "a number > 0")

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _Trimmed(self, base, server_round)


class _Trimmed(SignSplit):
    def sparse(self, body: StateDict, label: str) -> dict[str, torch.Tensor]:
        updates = {k: self.update(body, k) for k in self.floating}
        magnitudes = torch.cat([u.abs().flatten() for u in updates.values()]) if updates else torch.zeros(0)
        n = magnitudes.numel()
        if n == 0:
            return updates
        # density read as the decimal it was written as: 0.7 of 10 keeps 7, where float 0.7 * 10 would ceil to 8.
        k = min(n, max(1, math.ceil(Fraction(self.operator.density).limit_denominator(10**6) * n)))
        threshold = magnitudes.kthvalue(n - k + 1).values
        return {key: torch.where(u.abs() >= threshold, u, 0.0) for key, u in updates.items()}


@dataclass
class Dare(FusionOperator):
    """DARE (Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099): drop each
    coordinate of each task vector with probability ``drop``, rescale the survivors by ``1 / (1 - drop)`` (so the
    update is unchanged in expectation), then ``base + scale * (weighted) mean``. The masks are seeded by
    ``seed``, the round and the contributor's label (see ``keep_masks``). ``drop`` 0 is task arithmetic."""

    name = "dare"
    streams = True
    drop: float = 0.9
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        require("drop", self.drop, lambda v: 0 <= v < 1, "a number in [0, 1)")
        require("scale", self.scale, lambda v: v > 0, "a number > 0")
        require("seed", self.seed, lambda v: True, "an integer", int)

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _DareMean(self, base, server_round, of_updates=True)


def _dropped(acc: Accumulator, body: StateDict, label: str) -> dict[str, torch.Tensor]:
    """One contribution's update, DARE-masked and rescaled."""
    drop = acc.operator.drop
    shapes = {k: acc.base[k].shape for k in acc.floating}
    masks = keep_masks(acc.operator.seed, acc.round, label, shapes, drop)
    return {k: torch.where(masks[k], acc.update(body, k) / (1 - drop), 0.0) for k in acc.floating}


class _DareMean(WeightedSum):
    def _fold(self, body: StateDict, label: str, examples: int, weight: float) -> None:
        for key, value in _dropped(self, body, label).items():
            self._add(key, value, weight)
        self.total_weight += weight

    def _finish(self) -> dict[str, torch.Tensor]:
        return {k: self.base[k].to(torch.float64) + self.operator.scale * u for k, u in self.mean().items()}


@dataclass
class DareTies(Dare):
    """DARE-TIES (mergekit's ``dare_ties``): DARE's drop-and-rescale as the sparsification step of TIES (Yu et al.
    2024, https://arxiv.org/abs/2311.03099; Yadav et al. 2023, https://arxiv.org/abs/2306.01708), then TIES's
    sign election and disjoint mean; no magnitude trim. Parameters and masks as in ``Dare``."""

    name = "dare_ties"

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _DroppedSigns(self, base, server_round)


class _DroppedSigns(SignSplit):
    def sparse(self, body: StateDict, label: str) -> dict[str, torch.Tensor]:
        return _dropped(self, body, label)
