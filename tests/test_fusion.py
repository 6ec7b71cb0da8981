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


def test_uniform_mean_is_not_weighted_and_ignores_order():
    bodies = _bodies(3, seed=1)
    a = uniform_mean(bodies)
    b = uniform_mean(bodies[::-1])
    torch.testing.assert_close(a["w"], b["w"])
    # each contributor counts once: the mean of two identical bodies and a third is not the plain pair mean
    twice = uniform_mean([bodies[0], bodies[0], bodies[1]])
    torch.testing.assert_close(twice["w"], (2 * bodies[0]["w"] + bodies[1]["w"]) / 3)


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
