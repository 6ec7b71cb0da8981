"""Transport precision (strategies/transport.py) against numpy oracles, and a strategy round at float16."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MessageType

from strategies.transport import TransportError, decode, encode, received_body, to_state_dict, wire_dtype


def _state():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 8, generator=g), "half": torch.randn(4, generator=g).half(),
            "ids": torch.arange(6), "b": torch.randn(8, generator=g, dtype=torch.float64)}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """Oracle: float32 -> bfloat16 bits, round to nearest even, from the float32 bit pattern (finite values)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_float16_and_bfloat16_encode_as_numpy_would_and_decode_back():
    state = _state()
    half = encode(state, "float16")
    np.testing.assert_array_equal(half["w"].numpy(), state["w"].numpy().astype(np.float16))
    assert half["half"] is state["half"] and half["ids"] is state["ids"]  # at or below the precision, or integer
    assert half["b"].dtype == torch.float16
    bf = encode(state, "bfloat16")
    assert bf["w"].dtype == torch.int16  # raw bits: numpy (and so a Flower ArrayRecord) has no bfloat16
    np.testing.assert_array_equal(bf["w"].numpy().view(np.uint16), _bf16_bits(state["w"].numpy()))
    assert bf["half"] is state["half"]  # already 16 bits: it travels as it is
    back = decode(bf, "bfloat16", {k: v.dtype for k, v in state.items()})
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in state.items()}
    assert torch.equal(back["w"], state["w"].to(torch.bfloat16).float()) and torch.equal(back["ids"], state["ids"])
    assert all(v is state[k] for k, v in encode(state, "float32").items())  # the default changes nothing


def test_a_tensor_not_in_the_transport_dtype_is_refused_with_its_key():
    state = _state()
    with pytest.raises(TransportError, match=r"'w' arrived as torch.float32, expected torch.float16"):
        decode(state, "float16", {k: v.dtype for k, v in state.items()})
    with pytest.raises(TransportError, match="unknown transport.dtype 'float8'"):
        wire_dtype(torch.float32, "float8")


def test_the_server_adds_a_half_precision_update_to_its_master_copy():
    base = _state()
    update = {k: (1e-3 * torch.ones_like(v)) if v.is_floating_point() else v for k, v in base.items()}
    body = received_body(encode(update, "float16"), base, "float16")
    oracle = base["w"].numpy() + np.float16(1e-3).astype(np.float32)
    np.testing.assert_array_equal(body["w"].numpy(), oracle)
    assert body["w"].dtype == torch.float32 and torch.equal(body["ids"], base["ids"])
    assert all(v is base[k] for k, v in received_body(base, base, "float32").items())


def test_a_round_at_float16_sends_half_the_bytes_and_fuses_base_plus_mean_update(tiny_cfg, small_pool, tiny_path):
    from tests.test_strategy import _run

    grid, strategy, records, start, result = _run(tiny_cfg, small_pool, tiny_path, rounds=1, transport="float16",
                                                  eval_schedule={"probe": None})
    _, _, full, _, _ = _run(tiny_cfg, small_pool, tiny_path, rounds=1, eval_schedule={"probe": None})
    assert records[1].fused and 0.45 < records[1].bytes_train_sent / full[1].bytes_train_sent < 0.55
    assert 0.45 < records[1].bytes_train_received / full[1].bytes_train_received < 0.55
    sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert {a.dtype for m in sent for a in m.content["arrays"].values()} <= {"float16", "int64"}
    updates = [r.content["arrays"].to_torch_state_dict() for r in grid.replies
               if r.metadata.message_type == MessageType.TRAIN]
    base, final = start.to_torch_state_dict(), result.arrays.to_torch_state_dict()
    for key, tensor in final.items():  # oracle: numpy mean of (master + float16 update) over the 4 contributors
        if tensor.is_floating_point():
            oracle = np.mean([base[key].numpy().astype(np.float64) + u[key].numpy().astype(np.float32)
                              for u in updates], axis=0)
            np.testing.assert_allclose(tensor.numpy(), oracle, rtol=1e-6, atol=1e-7, err_msg=key)


def test_arrived_arrays_decode_to_tensors_that_share_their_bytes():
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "h": np.array([1.5, -2.0], np.float16),
             "ids": np.arange(5), "flag": np.array([True, False]), "scalar": np.array(2.5), "empty": np.zeros((0, 3)),
             "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))}  # through Array.numpy
    record = ArrayRecord({k: Array(v) for k, v in state.items()})
    decoded = to_state_dict(record)
    for key, value in state.items():  # the oracle: the numpy arrays themselves
        assert decoded[key].dtype == torch.from_numpy(value).dtype, key
        np.testing.assert_array_equal(decoded[key].numpy(), value, err_msg=key)
    data = record["w"].data  # no copy: the tensor's values are the array's own bytes
    address = np.frombuffer(data, np.uint8).ctypes.data
    assert address <= decoded["w"].data_ptr() < address + len(data)
    consumed = ArrayRecord({"w": Array(state["w"])})
    assert list(to_state_dict(consumed, consume=True)) == ["w"] and len(consumed) == 0


def test_an_array_whose_bytes_disagree_with_its_header_is_refused():
    whole = Array(np.arange(8, dtype=np.float32))
    cut = Array(whole.dtype, tuple(whole.shape), whole.stype, whole.data[:-4])
    with pytest.raises(ValueError, match=r"28 bytes of data for shape \(8,\) of float32"):
        to_state_dict(ArrayRecord({"w": cut}))
    with pytest.raises(ValueError, match="byte order"):  # torch has no big-endian tensors (neither had Flower's path)
        to_state_dict(ArrayRecord({"w": Array(np.arange(4, dtype=">f4"))}))
    with pytest.raises(ValueError):  # not a .npy array at all
        to_state_dict(ArrayRecord({"w": Array(whole.dtype, tuple(whole.shape), whole.stype, b"not numpy" * 20)}))
