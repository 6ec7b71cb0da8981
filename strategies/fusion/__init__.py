"""Fusion operators: how a round's contributions become the next base, chosen by ``fusion=<name>`` (``conf/fusion/``).

Each operator is a small typed dataclass (its parameters, checked when it is built, with messages that name
``fusion.<parameter>``) that starts an accumulator per round (``base``: fold contributions one at a time, finish
with the next base). Where everything is:

* ``base``: the operator and accumulator shapes, parameter checks, why folding order does not matter;
* ``means``: ``uniform_mean`` (the paper, the default), ``weighted_mean`` (Flower FedAvg's), ``task_arithmetic``;
* ``server_opt``: server optimizers with state kept in checkpoints: ``fedavgm``, ``nesterov``, ``fedadam``;
* ``merging``: model merging on the updates: ``ties``, ``dare``, ``dare_ties``;
* ``robust``: robust aggregation that needs all contributions of a round: ``median``, ``trimmed_mean``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from strategies.fusion.base import Accumulator, FusionError, FusionOperator, StateDict, check_compatible
from strategies.fusion.means import TaskArithmetic, UniformMean, WeightedMean
from strategies.fusion.merging import Dare, DareTies, Ties
from strategies.fusion.robust import Median, TrimmedMean
from strategies.fusion.server_opt import FedAdam, FedAvgM, Nesterov

OPERATORS: dict[str, type[FusionOperator]] = {op.name: op for op in (
    UniformMean, WeightedMean, TaskArithmetic, FedAvgM, Nesterov, FedAdam, Ties, Dare, DareTies, Median, TrimmedMean)}

__all__ = ["OPERATORS", "Accumulator", "FusionError", "FusionOperator", "StateDict", "build_operator",
           "check_compatible", "fuse"]


def build_operator(spec: Mapping[str, Any] | str) -> FusionOperator:
    """The operator a ``fusion`` config describes: ``{"operator": name, **parameters}`` (or just the name)."""
    settings = {"operator": spec} if isinstance(spec, str) else dict(spec)
    name = settings.pop("operator", None)
    if name not in OPERATORS:
        raise FusionError(f"config key 'fusion.operator' has invalid value {name!r}: must be one of {sorted(OPERATORS)}")
    operator = OPERATORS[name]
    known = {f.name for f in dataclasses.fields(operator)}
    if unknown := sorted(set(settings) - known):
        raise FusionError(f"config key 'fusion.{unknown[0]}' is not a parameter of fusion operator '{name}' "
                          f"(its parameters: {sorted(known) or 'none'})")
    return operator(**settings)


def fuse(operator: FusionOperator, bodies: Iterable[StateDict], base: StateDict, server_round: int = 1,
         labels: Iterable[str] | None = None, examples: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    """One round's fusion of ``bodies`` (folded in the order given), for scripts and tests."""
    bodies = list(bodies)
    labels = list(labels) if labels is not None else [str(i) for i in range(len(bodies))]
    examples = list(examples) if examples is not None else [1] * len(bodies)
    accumulator = operator.start(base, server_round)
    for body, label, count in zip(bodies, labels, examples):
        accumulator.fold(body, label=label, examples=count)
    return accumulator.finish()
