"""Building a model around a received body without initialising it twice, on any transformers version.

``build_classifier`` (``app.learning.model``) lays the parameters out on the meta device, allocates them empty,
draws the head and loads the body last. Nothing here relies on transformers' ``_is_hf_initialized`` flags: only
version 5's initialisation honours them; on 4.x ``initialize_weights`` re-randomises every module it is given,
and the buffers ``to_empty`` allocates are uninitialised memory (checked on 4.56.2 and 5.25, see the README).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode
from transformers import PreTrainedModel


class ParametersOnMeta(TorchFunctionMode):
    """``torch.empty`` goes to the meta device: nn.Linear, nn.Embedding and nn.LayerNorm allocate their parameters
    with it, so they cost nothing and no initialisation draws for them; buffers made by ``torch.arange`` or
    ``torch.zeros`` (BERT's ``position_ids``, ``token_type_ids``) are still computed, on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.empty:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def unsaved_buffers(model: PreTrainedModel, build_real: Callable[[], PreTrainedModel]) -> dict[str, torch.Tensor]:
    """Copies of the buffers of ``model`` (built under ``ParametersOnMeta``) that its state_dict lacks, so no
    received body carries them. An architecture that makes one with ``torch.empty`` gets them from ``build_real()``
    on the CPU instead: a random model, drawn in a forked RNG so the caller's random state is untouched."""
    saved = set(model.state_dict())
    buffers = {k: b.detach().clone() for k, b in model.named_buffers() if k not in saved}
    if any(b.is_meta for b in buffers.values()):
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            real = dict(build_real().named_buffers())
        buffers = {k: real[k].detach().clone() for k in buffers}
    return buffers


def initialise_head(model: PreTrainedModel, head_keys: Iterable[str], seed: int) -> None:
    """Draw the head from ``seed`` with the model's own ``_init_weights``, called on the head's modules only (those
    whose own tensors are all head keys), in module order: every transformers version leaves the rest alone. On
    transformers 5 this draws exactly what its ``initialize_weights`` drew with the body flagged as initialised."""
    head, modules = set(head_keys), []
    for name, module in model.named_modules():
        own = [f"{name}.{k}" if name else k for k, _ in [*module.named_parameters(recurse=False),
                                                          *module.named_buffers(recurse=False)]]
        if own and all(key in head for key in own):
            modules.append(module)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                tensor._is_hf_initialized = False  # transformers 5's init functions skip a tensor flagged True
            model._init_weights(module)
