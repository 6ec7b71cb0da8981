"""Robust aggregation: the coordinate-wise median and trimmed mean (Yin et al. 2018,
https://arxiv.org/abs/1803.01498), as Flower's FedMedian and FedTrimmedAvg. Neither streams: an order statistic
needs every contribution of the round, which the accumulator keeps in the contributions' own dtype (no float64
copy) and stacks one key at a time at ``finish``, so the float64 peak is K copies of the largest tensor only.

Weights: these statistics count each contribution once, as Flower's do (they ignore example counts too). A fold
with a weight other than 1 is refused rather than silently ignored: a weighted median or trimmed mean is a
different estimator and would be another operator.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import torch

from strategies.fusion.base import Accumulator, FusionError, FusionOperator, StateDict, require


class Kept(Accumulator):
    """Keeps every contribution's floating tensors (cloned, so a caller reusing its buffers cannot change them);
    at finish, sorts each key's K values per coordinate in float64 and hands them to ``statistic``."""

    def __init__(self, operator, base, server_round) -> None:
        super().__init__(operator, base, server_round)
        self.kept: list[dict[str, torch.Tensor]] = []

    def _fold(self, body: StateDict, label: str, examples: int, weight: float) -> None:
        if weight != 1.0:
            raise FusionError(f"contribution {label}: weight {weight!r} given to fusion operator "
                              f"'{self.operator.name}', which counts every contribution once (weight 1)")
        self.kept.append({k: body[k].detach().clone() for k in self.floating})

    def _finish(self) -> dict[str, torch.Tensor]:
        fused = {}
        for key in self.floating:
            stacked = torch.stack([c[key].to(torch.float64) for c in self.kept])
            fused[key] = self.statistic(stacked.sort(dim=0).values)
        return fused

    @abstractmethod
    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        """The fused tensor from the K values per coordinate, sorted along dim 0."""


@dataclass
class Median(FusionOperator):
    """The coordinate-wise median of the bodies (Yin et al. 2018, https://arxiv.org/abs/1803.01498; Flower's
    FedMedian): for an even count, the mean of the two middle values, as ``numpy.median``."""

    name = "median"
    streams = False

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _Median(self, base, server_round)


class _Median(Kept):
    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        k = ordered.shape[0]
        return ordered[(k - 1) // 2: k // 2 + 1].mean(dim=0)  # the middle one (odd k) or two (even k)


@dataclass
class TrimmedMean(FusionOperator):
    """The coordinate-wise trimmed mean of the bodies (Yin et al. 2018, https://arxiv.org/abs/1803.01498;
    Flower's FedTrimmedAvg, same default): per coordinate, drop the ``floor(beta * K)`` smallest and largest of
    the K values and average the rest.

    Since ``beta < 0.5``, ``2 * floor(beta * K) < K`` for every K, so at least one value always remains and no
    fallback is needed; with few contributions the cut can be 0 (beta 0.2 cuts nothing below K = 5), and the
    result is then the plain mean, as in Flower. The cut is ``int(beta * K)`` computed as Flower (and scipy's
    ``trim_mean``) do, float rounding included, so results match theirs."""

    name = "trimmed_mean"
    streams = False
    beta: float = 0.2

    def __post_init__(self) -> None:
        require("beta", self.beta, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _TrimmedMean(self, base, server_round)


class _TrimmedMean(Kept):
    def statistic(self, ordered: torch.Tensor) -> torch.Tensor:
        k = ordered.shape[0]
        cut = int(self.operator.beta * k)
        return ordered[cut: k - cut].mean(dim=0)
