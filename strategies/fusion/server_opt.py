"""Server optimizers with state: FedAvgM, Nesterov (DiLoCo's outer step) and FedAdam.

Each treats the round's weighted mean update ``delta = sum(w * (body - base)) / sum(w)`` as a negative
pseudo-gradient and takes one optimizer step from the base (Reddi et al. 2021, "Adaptive Federated Optimization",
https://arxiv.org/abs/2003.00295; Flower's FedAvgM and FedAdam strategies). ``w`` is the fold's weight, not the
example count, as in task arithmetic: each contributor has the same say in a synchronous round.

Their state (momentum, or Adam's moments) is float64, one tensor per floating key of the base, zeros before the
first fused round. It lives in the operator, is saved with each checkpoint through ``state_dict()`` as a flat dict
(``"<slot>/<param key>"``) and restored by ``load_state_dict()``, so a resumed run repeats an uninterrupted one bit
for bit. Only ``finish`` moves it: a round that does not fuse (too few valid contributions) never finishes, and
leaves it as it was.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from strategies.fusion.base import Accumulator, FusionError, FusionOperator, StateDict, require
from strategies.fusion.means import WeightedSum

# slot -> param key -> float64 tensor; empty: no state yet (zeros in the next round)
State = dict[str, dict[str, torch.Tensor]]


@dataclass
class _ServerOptimizer(FusionOperator):
    """What the three share: the state, its checkpoint form, and the accumulator that applies ``_step``."""

    streams = True
    slots: ClassVar[tuple[str, ...]]  # the state's parts, the prefixes of its ``state_dict`` keys

    def __post_init__(self) -> None:
        # A plain attribute, not a dataclass field: params() and describe() list the parameters, never the state.
        self._state: State = {}

    def start(self, base: StateDict, server_round: int) -> Accumulator:
        return _ServerStep(self, base, server_round)

    @abstractmethod
    def _step(self, delta: dict[str, torch.Tensor], state: State) -> tuple[dict[str, torch.Tensor], State]:
        """The update to add to the base, and the new state, from the mean update and the old state (pure: new
        tensors, never written into the old ones)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        # _step builds new tensors and never writes into old ones, so what this returns stays a snapshot.
        return {f"{slot}/{key}": t for slot, tensors in self._state.items() for key, t in tensors.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` saved; ``{}`` means no state yet. Checked here against itself, and against the
        base when the next round starts (the keys and shapes only the base knows)."""
        parsed: State = {slot: {} for slot in self.slots}
        for name, tensor in state.items():
            slot, _, key = name.partition("/")
            if slot not in parsed or not key:
                raise FusionError(f"fusion operator '{self.name}': state key '{name}' is not "
                                  f"'<slot>/<param key>' with slot in {list(self.slots)}")
            # float64 only: a state saved at lower precision could not resume the run bit for bit.
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float64:
                raise FusionError(f"fusion operator '{self.name}': state key '{name}' must be a float64 tensor, "
                                  f"got {getattr(tensor, 'dtype', type(tensor).__name__)}")
            parsed[slot][key] = tensor.detach().to("cpu", copy=True)
        if state:
            keys = set().union(*(set(tensors) for tensors in parsed.values()))
            for slot, tensors in parsed.items():
                for key in sorted(keys):
                    if key not in tensors:
                        raise FusionError(f"fusion operator '{self.name}': state key '{slot}/{key}' is missing")
                    first = parsed[self.slots[0]][key]
                    if tensors[key].shape != first.shape:
                        raise FusionError(f"fusion operator '{self.name}': state key '{slot}/{key}' has shape "
                                          f"{tuple(tensors[key].shape)} != {tuple(first.shape)} of "
                                          f"'{self.slots[0]}/{key}'")
        self._state = parsed if state else {}

    def _checked_state(self, base: StateDict) -> State:
        """The state, checked against this round's base. Its keys and shapes come from the model and cannot change
        between rounds in this project, so a mismatch means the wrong checkpoint or a changed model: refused,
        rather than guessing which momentum to keep, reset or reshape."""
        if not self._state:
            return {}
        floating = {k: v for k, v in base.items() if v.is_floating_point()}
        for slot, tensors in self._state.items():
            for key in sorted(set(tensors) | set(floating)):
                if key not in floating:
                    raise FusionError(f"fusion operator '{self.name}': state key '{slot}/{key}' has no floating "
                                      "tensor in the base")
                if key not in tensors:
                    raise FusionError(f"fusion operator '{self.name}': state key '{slot}/{key}' is missing for the "
                                      "base's floating tensor")
                if tuple(tensors[key].shape) != tuple(floating[key].shape):
                    raise FusionError(f"fusion operator '{self.name}': state key '{slot}/{key}' has shape "
                                      f"{tuple(tensors[key].shape)} != {tuple(floating[key].shape)} in the base")
        return self._state


class _ServerStep(WeightedSum):
    """The weighted mean update, then one optimizer step from the state as it was when the round started."""

    def __init__(self, operator: _ServerOptimizer, base: StateDict, server_round: int) -> None:
        super().__init__(operator, base, server_round, of_updates=True)
        self.optimizer = operator
        # Checked now, before any fold: a wrong state is refused before the round's work is done. Kept as a
        # snapshot, so finishing twice gives the same base and the same state, not two steps.
        self.state = operator._checked_state(base)

    def _finish(self) -> dict[str, torch.Tensor]:
        delta = self.mean()
        zeros = {slot: {k: torch.zeros_like(d) for k, d in delta.items()} for slot in self.optimizer.slots}
        step, new_state = self.optimizer._step(delta, self.state or zeros)
        self.optimizer._state = new_state  # last: a failure above leaves the old state
        return {k: self.base[k].to(torch.float64) + s for k, s in step.items()}


@dataclass
class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019, https://arxiv.org/abs/1909.06335; Flower's FedAvgM):
    ``v = momentum * v + delta``, then ``base + server_lr * v``. With momentum 0 and server_lr 1 it is the mean update
    applied to the base (task arithmetic with scale 1)."""

    name = "fedavgm"
    slots = ("momentum",)
    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        require("server_lr", self.server_lr, lambda v: 0 < v < math.inf, "a finite number > 0")
        require("momentum", self.momentum, lambda v: 0 <= v < 1, "a number in [0, 1)")
        super().__post_init__()

    def _step(self, delta: dict[str, torch.Tensor], state: State) -> tuple[dict[str, torch.Tensor], State]:
        v = {k: self.momentum * state["momentum"][k] + d for k, d in delta.items()}
        return {k: self.server_lr * t for k, t in v.items()}, {"momentum": v}


@dataclass
class Nesterov(FedAvgM):
    """Nesterov momentum, the outer optimizer of DiLoCo (Douillard et al. 2023, https://arxiv.org/abs/2311.08105;
    its defaults, lr 0.7 and momentum 0.9): ``v = momentum * v + delta``, then
    ``base + server_lr * (delta + momentum * v)``, which is PyTorch's SGD with ``nesterov=True`` on the gradient
    ``-delta``: the step looks ahead along the momentum it is about to take. Parameters and checks as FedAvgM's."""

    name = "nesterov"
    server_lr: float = 0.7

    def _step(self, delta: dict[str, torch.Tensor], state: State) -> tuple[dict[str, torch.Tensor], State]:
        v = {k: self.momentum * state["momentum"][k] + d for k, d in delta.items()}
        return {k: self.server_lr * (d + self.momentum * v[k]) for k, d in delta.items()}, {"momentum": v}


@dataclass
class FedAdam(_ServerOptimizer):
    """FedAdam (Reddi et al. 2021, https://arxiv.org/abs/2003.00295, Algorithm 2):
    ``m = beta1 * m + (1 - beta1) * delta``, ``v = beta2 * v + (1 - beta2) * delta**2``, then
    ``base + server_lr * m / (sqrt(v) + tau)``. No bias correction, as in the paper: ``tau`` (the degree of
    adaptivity) keeps the first steps bounded instead. Flower's FedAdam (1.42) differs there: in round t it scales
    its lr by ``sqrt(1 - beta2**(t+1)) / (1 - beta1**(t+1))``, so the two agree only once that factor nears 1.
    Mind the scale: where ``|delta|`` is well above ``tau``, ``m / sqrt(v)`` is about 1, so each coordinate moves
    about ``server_lr`` per round whatever the size of the clients' updates."""

    name = "fedadam"
    slots = ("m", "v")
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        require("server_lr", self.server_lr, lambda v: 0 < v < math.inf, "a finite number > 0")
        require("beta1", self.beta1, lambda v: 0 <= v < 1, "a number in [0, 1)")
        require("beta2", self.beta2, lambda v: 0 <= v < 1, "a number in [0, 1)")
        require("tau", self.tau, lambda v: 0 < v < math.inf, "a finite number > 0")
        super().__post_init__()

    def _step(self, delta: dict[str, torch.Tensor], state: State) -> tuple[dict[str, torch.Tensor], State]:
        m = {k: self.beta1 * state["m"][k] + (1 - self.beta1) * d for k, d in delta.items()}
        v = {k: self.beta2 * state["v"][k] + (1 - self.beta2) * d * d for k, d in delta.items()}
        return {k: self.server_lr * m[k] / (v[k].sqrt() + self.tau) for k in delta}, {"m": m, "v": v}
