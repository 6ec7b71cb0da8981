"""What travels between the server and the nodes, at the precision ``transport.dtype`` says: pure functions over
state dicts, used by both sides.

* ``float32`` (the default): nothing changes, whatever the model's dtype. The base goes out as it is and a
  contributor sends its body back.
* ``float16`` / ``bfloat16``: the base goes out cast to that precision, and a contributor sends back its
  **update against the base exactly as it received it** (``trained - received``, cast to the transport precision),
  not its body: updates are small numbers, so a half-precision update loses far less than a half-precision body
  would. The server adds each update to its own master copy of the base, which stays in the model's dtype, so
  rounding never accumulates across rounds. bfloat16 travels as its raw 16 bits (an int16 view), because a Flower
  ArrayRecord goes through numpy, which has no bfloat16.

Only floating tensors are cast; a tensor already at or below the transport precision (a float16 model's body)
travels as it is, and integer buffers (position ids) are never touched. The receiver knows each key's dtype from
its own copy (the server's base, the node's model), so nothing but the transport name needs to travel with them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

TRANSPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
StateDict = Mapping[str, torch.Tensor]


class TransportError(ValueError):
    """A tensor that did not arrive as the transport says it must; the message names the key."""


def sends_updates(transport: str) -> bool:
    """Do contributors send updates (half-precision transport) rather than bodies?"""
    return _dtype(transport) != torch.float32


def wire_dtype(tensor_dtype: torch.dtype, transport: str) -> torch.dtype:
    """The dtype a tensor of ``tensor_dtype`` travels in: the transport's when that is narrower, int16 for bfloat16
    (its raw bits), else its own."""
    target = _dtype(transport)
    if target == torch.float32 or not tensor_dtype.is_floating_point \
            or torch.finfo(tensor_dtype).bits <= torch.finfo(target).bits:
        return tensor_dtype
    return torch.int16 if target == torch.bfloat16 else target


def encode(state: StateDict, transport: str) -> dict[str, torch.Tensor]:
    """``state`` as it travels: each floating tensor at the transport precision (``wire_dtype``)."""
    out = {}
    for key, tensor in state.items():
        wire = wire_dtype(tensor.dtype, transport)
        if wire == tensor.dtype:
            out[key] = tensor
        elif wire == torch.int16:  # bfloat16's raw bits
            out[key] = tensor.to(torch.bfloat16).view(torch.int16)
        else:
            out[key] = tensor.to(wire)
    return out


def decode(arrived: StateDict, transport: str, dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """What ``encode`` sent, back in the receiver's ``dtypes`` (key -> dtype of its own copy). A key whose tensor
    did not arrive in the dtype the transport implies is refused (``TransportError``); missing or extra keys are
    left for the receiver's own checks to name."""
    out = {}
    for key, tensor in arrived.items():
        if key not in dtypes:
            out[key] = tensor
            continue
        wire = wire_dtype(dtypes[key], transport)
        if tensor.dtype != wire:
            raise TransportError(f"'{key}' arrived as {tensor.dtype}, expected {wire} "
                                 f"({dtypes[key]} sent at transport.dtype={transport})")
        if wire == torch.int16 and dtypes[key] != torch.int16:
            tensor = tensor.view(torch.bfloat16)
        out[key] = tensor.to(dtypes[key])
    return out


def received_body(arrived: StateDict, base: StateDict, transport: str) -> dict[str, torch.Tensor]:
    """The body a contribution stands for, in the base's dtypes: what arrived (float32 transport), or the base plus
    the update that arrived (half-precision transport), added in the base's own dtype."""
    decoded = decode(arrived, transport, {k: v.dtype for k, v in base.items()})
    if not sends_updates(transport):
        return decoded
    return {k: base[k] + v if k in base and base[k].is_floating_point() else v for k, v in decoded.items()}


def _dtype(transport: str) -> torch.dtype:
    if transport not in TRANSPORT_DTYPES:
        raise TransportError(f"unknown transport.dtype {transport!r}: one of {', '.join(TRANSPORT_DTYPES)}")
    return TRANSPORT_DTYPES[transport]
