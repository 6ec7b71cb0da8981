"""Fusion operators: pure functions over state dicts (name -> tensor).

ColD Fusion fuses with a **uniform** mean of the contributed bodies: every contributor counts the
same, whatever its dataset size (the paper; Flower's FedAvg would weight by example count).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


class FusionError(ValueError):
    """Contributions cannot be fused; the message names the contribution and the key."""


def uniform_mean(contributions: Sequence[StateDict], base: StateDict | None = None) -> dict[str, torch.Tensor]:
    """Uniform mean of the floating-point tensors of ``contributions``.

    Non-floating tensors (integer buffers such as position ids or step counters) are never averaged:
    they are taken from ``base`` when given, else from the first contribution. Every contribution must
    carry exactly the reference keys (``base``'s, else the first contribution's) with the same shapes.
    The mean is accumulated in float64 and cast back to each tensor's dtype.
    """
    if not contributions:
        raise FusionError("nothing to fuse: no contributions")
    reference = base if base is not None else contributions[0]
    check_compatible(contributions, reference)
    fused: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        if not ref.is_floating_point():
            fused[key] = ref.clone()
            continue
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for contribution in contributions:
            total += contribution[key].to(torch.float64)
        fused[key] = (total / len(contributions)).to(ref.dtype)
    return fused


def check_compatible(contributions: Sequence[StateDict], reference: StateDict) -> None:
    """Raise FusionError unless every contribution has the reference's keys and shapes."""
    expected = set(reference)
    for index, contribution in enumerate(contributions):
        keys = set(contribution)
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(keys - expected)
            raise FusionError(
                f"contribution {index} has mismatched keys: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        for key, ref in reference.items():
            if tuple(contribution[key].shape) != tuple(ref.shape):
                raise FusionError(
                    f"contribution {index}, key '{key}': shape {tuple(contribution[key].shape)} "
                    f"!= expected {tuple(ref.shape)}"
                )


# Fusion operators by the name used in conf/fusion/*.yaml.
FUSION_OPERATORS = {"uniform_mean": uniform_mean}


def get_operator(name: str):
    try:
        return FUSION_OPERATORS[name]
    except KeyError:
        raise FusionError(f"fusion.operator '{name}' is unknown; available: {sorted(FUSION_OPERATORS)}") from None
