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

import functools
import io
import math
import warnings
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

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


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_SHARED_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                                         "bool")}


def to_tensor(array: Array) -> torch.Tensor:
    """One arrived array as a tensor that **shares the array's bytes**: no copy. Decoding a MiniLM body this way takes
    ~2 ms, against ~86 ms through Flower's ``Array.numpy`` (``np.load`` from a stream copies every chunk twice), paid
    for every reply and every round (``benchmarks/aggregation.py --passes minilm``). The tensor is read-only by
    contract: the server never writes into a contribution or a base it decoded (an operator that keeps contributions
    clones them; a node copies the body into its model). Anything but a C-ordered, native-endian numeric .npy array
    (what Flower makes of such a tensor) goes through ``Array.numpy`` as before.
    Raises ValueError when the array's header and its byte count disagree."""
    data = array.data
    header = _npy_header(data) if array.stype == SType.NUMPY else None
    if header is not None:
        shape, fortran_order, dtype, offset = header
        if not fortran_order and dtype.isnative and dtype in _SHARED_DTYPES:
            count = math.prod(shape)
            if offset + count * dtype.itemsize != len(data):
                raise ValueError(f"{len(data) - offset} bytes of data for shape {shape} of {dtype}")
            values = np.frombuffer(data, dtype, count, offset).reshape(shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "not writable": read-only by contract (above)
                return torch.from_numpy(values)
    return torch.from_numpy(array.numpy())


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, Fortran order, dtype, where the data starts) of a .npy array, or None for a format version this does
    not read. The header's length is in its first bytes (the .npy format: magic, version, then a 2-byte length in
    version 1, 4-byte in version 2); the parse itself is numpy's, cached, since the replies of one model repeat the
    same few hundred headers (parsing each anew costs ~10 ms a MiniLM body)."""
    size = 4 if data[6:8] == bytes((2, 0)) else 2
    return _parse_npy_header(bytes(data[:8 + size + int.from_bytes(data[8:8 + size], "little")]))


@functools.lru_cache(maxsize=4096)
def _parse_npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    stream = io.BytesIO(header)
    reader = _NPY_HEADERS.get(np.lib.format.read_magic(stream))  # ValueError unless it starts as a .npy file does
    if reader is None:
        return None
    shape, fortran_order, dtype = reader(stream)
    return shape, fortran_order, dtype, len(header)


def to_state_dict(record: ArrayRecord, *, consume: bool = False) -> OrderedDict[str, torch.Tensor]:
    """``record`` as a state dict of tensors sharing its bytes (``to_tensor``). ``consume``: the record is the
    caller's own, and is emptied, so the tensors hold the only reference to the bytes."""
    return OrderedDict((key, to_tensor(record.pop(key) if consume else record[key])) for key in list(record.keys()))


def _dtype(transport: str) -> torch.dtype:
    if transport not in TRANSPORT_DTYPES:
        raise TransportError(f"unknown transport.dtype {transport!r}: one of {', '.join(TRANSPORT_DTYPES)}")
    return TRANSPORT_DTYPES[transport]
