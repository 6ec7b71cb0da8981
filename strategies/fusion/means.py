"""Means: the paper's uniform mean, Flower FedAvg's example-weighted mean, and task arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strategies.fusion.base import Accumulator, FusionOperator, StateDict, require


class WeightedSum(Accumulator):
    """Running ``sum(w * x)`` and ``sum(w)`` per floating key, where x is the body (``of_updates=False``) or the
    update ``body - base``; ``w`` is the fold's weight, times the example count when ``by_examples``."""

    def __init__(self, operator, base, server_round, *, of_updates: bool, by_examples: bool = False) -> None:
        super().__init__(operator, base, server_round)
        self.of_updates, self.by_examples = of_updates, by_examples
        self.sums = {k: torch.zeros(base[k].shape, dtype=torch.float64) for k in self.floating}
        self.total_weight = 0.0

    def _fold(self, body: StateDict, label: str, examples: int, weight: float) -> None:
        w = weight * examples if self.by_examples else weight
        for key in self.floating:
            # A float32 body adds into the float64 sum as is (torch computes in float64: the same bits as a float64
            # copy, without making one).
            value = self.update(body, key) if self.of_updates else body[key]
            self.sums[key].add_(value, alpha=w)
        self.total_weight += w

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
        return self.mean()


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
