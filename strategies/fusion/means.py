"""Means: the paper's uniform mean, Flower FedAvg's example-weighted mean, and task arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strategies.chunks import chunks
from strategies.fusion.base import Accumulator, FusionOperator, StateDict, require


class WeightedSum(Accumulator):
    """Running ``sum(w * x)`` and ``sum(w)`` per floating key, where x is the body (``of_updates=False``) or the
    update ``body - base``; ``w`` is the fold's weight, times the example count when ``by_examples``."""

    def __init__(self, operator, base, server_round, *, of_updates: bool, by_examples: bool = False) -> None:
        super().__init__(operator, base, server_round)
        self.of_updates, self.by_examples = of_updates, by_examples
        self.sums: dict[str, torch.Tensor] = {}  # made by the first fold
        self.total_weight = 0.0

    def _fold(self, body: StateDict, label: str, examples: int, weight: float) -> None:
        w = weight * examples if self.by_examples else weight
        for key in self.floating:
            self._add(key, body[key], w, minus=self.base[key] if self.of_updates else None)
        self.total_weight += w

    def _add(self, key: str, value: torch.Tensor, weight: float, minus: torch.Tensor | None = None) -> None:
        """``sums[key] += weight * (value - minus)``, the difference and the product in float64, as a whole-tensor
        ``add_`` would compute them, but chunk by chunk (``strategies.chunks``: the float64 copy torch makes of a
        float32 value stays in the cache). The first fold writes ``weight * value`` into fresh memory rather than
        adding it to zeros: the same values, one pass over the sum instead of two."""
        total = self.sums.get(key)
        first = total is None
        if first:
            total = self.sums[key] = torch.empty(value.shape, dtype=torch.float64)
        for out, part, ref in chunks(total, value, value if minus is None else minus):
            if minus is not None:
                part = part.to(torch.float64) - ref.to(torch.float64)  # as ``Accumulator.update``
            if not first:
                out.add_(part, alpha=weight)
            elif weight == 1.0:
                out.copy_(part)
            else:
                out.copy_(part).mul_(weight)

    def mean(self) -> dict[str, torch.Tensor]:
        return {k: s / self.total_weight for k, s in self.sums.items()}


@dataclass
class UniformMean(FusionOperator):
    """The paper's fusion (Don-Yehiya et al. 2023, https://arxiv.org/abs/2212.01378): the mean of the bodies, each
    contributor counting the same whatever its dataset size."""

    name = "uniform_mean"
    streams = True

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _Mean(self, base, server_round, of_updates=False)


@dataclass
class WeightedMean(FusionOperator):
    """The mean of the bodies weighted by each contributor's example count: Flower FedAvg's rule (McMahan et al.
    2017, https://arxiv.org/abs/1602.05629), as a comparison."""

    name = "weighted_mean"
    streams = True

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _Mean(self, base, server_round, of_updates=False, by_examples=True)


class _Mean(WeightedSum):
    def _finish(self) -> dict[str, torch.Tensor]:
        # Straight into the base's dtype, chunk by chunk: the same bits as ``self.mean()`` cast, without a float64
        # copy of the sums (two bodies of memory).
        fused = {}
        for key, total in self.sums.items():
            fused[key] = torch.empty(total.shape, dtype=self.base[key].dtype)
            for out, part in chunks(fused[key], total):
                out.copy_(part / self.total_weight)
        return fused


@dataclass
class TaskArithmetic(FusionOperator):
    """Task arithmetic (Ilharco et al. 2023, https://arxiv.org/abs/2212.04089): ``base + scale * mean update``.
    ``scale`` 1 is the uniform mean of the updates; above 1 it extrapolates (a server learning rate)."""

    name = "task_arithmetic"
    streams = True
    scale: float = 1.0

    def __post_init__(self) -> None:
        require("scale", self.scale, lambda v: v > 0, "a number > 0")

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _ScaledMeanUpdate(self, base, server_round, of_updates=True)


class _ScaledMeanUpdate(WeightedSum):
    def _finish(self) -> dict[str, torch.Tensor]:
        return {k: self.base[k].to(torch.float64) + self.operator.scale * u for k, u in self.mean().items()}
