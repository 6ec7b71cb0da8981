"""Robust aggregation: the coordinate-wise median and trimmed mean (Yin et al. 2018,
https://arxiv.org/abs/1803.01498), as Flower's FedMedian and FedTrimmedAvg. Neither streams: an order statistic
needs every contribution of the round, which the accumulator keeps in the contributions' own dtype (no float64
copy) until ``finish``.

``finish`` works in coordinate chunks: for a few thousand coordinates at a time, the K values of each are copied
into one float64 buffer of ``CHUNK`` values (2 MB, whatever K and the tensor size), one row of K per coordinate,
and numpy *selects* the order statistics a row needs (``np.partition``, linear time) rather than sorting it; the
result is written straight into the fused tensor in the base's dtype. So beyond the kept bodies the peak is one
fused body and the buffer, where stacking and sorting a whole key costs three K-fold float64 copies of it
(values, int64 indices and the stack: ~32 GB for RoBERTa-base's word embeddings at K = 35).

Weights: these statistics count each contribution once, as Flower's do (they ignore example counts too). A fold
with a weight other than 1 is refused rather than silently ignored: a weighted median or trimmed mean is a
different estimator and would be another operator (``weighs = False``; ``mode=async`` refuses, at start, a fold
that would weigh by staleness).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from strategies.chunks import CHUNK
from strategies.fusion.base import Accumulator, FusionError, FusionOperator, StateDict, require


class Kept(Accumulator):
    """Keeps every contribution's floating tensors (cloned, so a caller reusing its buffers cannot change them);
    at finish, hands ``statistic`` the K values of each coordinate, chunk by chunk (module docstring)."""

    def __init__(self, operator, base, server_round) -> None:
        super().__init__(operator, base, server_round)
        self.kept: list[dict[str, torch.Tensor]] = []

    def _fold(self, body: StateDict, label: str, examples: int, weight: float) -> None:
        if weight != 1.0:
            raise FusionError(f"contribution {label}: weight {weight!r} given to fusion operator "
                              f"'{self.operator.name}', which counts every contribution once (weight 1)")
        self.kept.append({k: body[k].detach().clone().contiguous() for k in self.floating})

    def _finish(self) -> dict[str, torch.Tensor]:
        k = len(self.kept)
        rows = max(1, CHUNK // k)  # coordinates per chunk: a buffer of CHUNK float64 values whatever k
        buffer = np.empty((rows, k), dtype=np.float64)
        fill = torch.from_numpy(buffer)  # torch writes the rows (it reads bfloat16, numpy does not)
        fused = {}
        for key in self.floating:
            flats = [c[key].reshape(-1) for c in self.kept]
            out = fused[key] = torch.empty(self.base[key].shape, dtype=self.base[key].dtype)
            out_flat = out.reshape(-1)  # a view: writing a chunk of it writes the fused tensor
            for start in range(0, out_flat.numel(), rows):
                n = min(rows, out_flat.numel() - start)
                for i, flat in enumerate(flats):
                    fill[:n, i].copy_(flat[start:start + n])
                out_flat[start:start + n].copy_(torch.from_numpy(self.statistic(buffer[:n])))
        return fused

    @abstractmethod
    def statistic(self, values: np.ndarray) -> np.ndarray:
        """The fused values from ``values`` (n coordinates x K contributions, float64; it may be reordered in
        place), one per row."""


@dataclass
class Median(FusionOperator):
    """The coordinate-wise median of the bodies (Yin et al. 2018, https://arxiv.org/abs/1803.01498; Flower's
    FedMedian): for an even count, the mean of the two middle values, as ``numpy.median``."""

    name = "median"
    streams = False
    weighs = False

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _Median(self, base, server_round)


class _Median(Kept):
    def statistic(self, values: np.ndarray) -> np.ndarray:
        k = values.shape[1]
        middle = sorted({(k - 1) // 2, k // 2})  # the middle one (odd k) or two (even k)
        values.partition(middle, axis=1)  # each in its sorted place, in linear time
        if len(middle) == 1:
            return values[:, middle[0]].copy()
        return (values[:, middle[0]] + values[:, middle[1]]) / 2  # as numpy.median


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
    weighs = False
    beta: float = 0.2

    def __post_init__(self) -> None:
        require("beta", self.beta, lambda v: 0 <= v < 0.5, "a number in [0, 0.5)")

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _TrimmedMean(self, base, server_round)


class _TrimmedMean(Kept):
    def statistic(self, values: np.ndarray) -> np.ndarray:
        k = values.shape[1]
        cut = int(self.operator.beta * k)
        if cut:  # the cut smallest to the left of column cut, the cut largest to the right of k - cut - 1
            values.partition(sorted({cut, k - cut - 1}), axis=1)
        return values[:, cut:k - cut].mean(axis=1)
