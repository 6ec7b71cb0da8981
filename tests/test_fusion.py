import numpy as np
import pytest
import torch

from strategies.fusion import FusionError, uniform_mean


def _bodies(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(4, 3, generator=g),
            "b": torch.randn(3, generator=g).half(),
            "position_ids": torch.arange(5) + i,  # integer buffer: must never be averaged
        }
        for i in range(n)
    ]


def test_uniform_mean_matches_numpy_oracle():
    bodies = _bodies(5)
    fused = uniform_mean(bodies)
    oracle = np.mean([b["w"].numpy() for b in bodies], axis=0)
    np.testing.assert_allclose(fused["w"].numpy(), oracle, rtol=1e-6, atol=1e-7)
    oracle_b = np.mean([b["b"].float().numpy() for b in bodies], axis=0)
    assert fused["b"].dtype == torch.float16
    np.testing.assert_allclose(fused["b"].float().numpy(), oracle_b, atol=1e-3)


def test_uniform_mean_counts_each_contribution_once_in_any_order():
    """Each contribution counts once (a duplicate twice), in any order: a float64 numpy oracle. That fusion ignores
    the contributors' example counts is checked where those exist, in the strategy
    (tests/test_strategy.py::test_fusion_is_uniform_whatever_the_example_counts)."""
    bodies = _bodies(3, seed=1)
    oracle = np.mean([b["w"].numpy().astype(np.float64) for b in bodies], axis=0)
    for order in (bodies, bodies[::-1], [bodies[1], bodies[2], bodies[0]]):
        np.testing.assert_allclose(uniform_mean(order)["w"].numpy(), oracle, rtol=1e-6, atol=1e-7)
    twice = uniform_mean([bodies[0], bodies[0], bodies[1]])["w"].numpy()
    w0, w1 = bodies[0]["w"].numpy().astype(np.float64), bodies[1]["w"].numpy().astype(np.float64)
    np.testing.assert_allclose(twice, (2 * w0 + w1) / 3, rtol=1e-6, atol=1e-7)
    assert np.abs(twice - (w0 + w1) / 2).max() > 1e-3  # not the mean of the distinct bodies


def test_integer_buffers_come_from_the_base_untouched():
    bodies = _bodies(3)
    base = {**bodies[0], "position_ids": torch.arange(5) * 10}
    fused = uniform_mean(bodies, base=base)
    assert torch.equal(fused["position_ids"], base["position_ids"])
    assert fused["position_ids"].dtype == torch.int64
    assert torch.equal(uniform_mean(bodies)["position_ids"], bodies[0]["position_ids"])


def test_mismatched_keys_raise_a_clear_error():
    bodies = _bodies(2)
    del bodies[1]["b"]
    with pytest.raises(FusionError, match=r"contribution 1 has mismatched keys: missing \['b'\]"):
        uniform_mean(bodies)


def test_mismatched_shapes_raise_a_clear_error():
    bodies = _bodies(2)
    bodies[1]["w"] = torch.zeros(3, 4)
    with pytest.raises(FusionError, match=r"contribution 1, key 'w': shape \(3, 4\) != expected \(4, 3\)"):
        uniform_mean(bodies)


def test_nothing_to_fuse():
    with pytest.raises(FusionError, match="no contributions"):
        uniform_mean([])
