"""The fusion operator registry (strategies/fusion/) and the means, against numpy oracles; each operator's own
oracle tests are in test_fusion_server_opt.py and test_fusion_merging.py."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from app.run.config import ConfigError, compose_config, to_container
from strategies.chunks import CHUNK
from strategies.fusion import OPERATORS, FusionError, build_operator, fuse
from strategies.fusion.means import TaskArithmetic, UniformMean, WeightedMean

CONF_FUSION = Path(__file__).resolve().parents[1] / "conf" / "fusion"


def _bodies(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).half(),
             "position_ids": torch.arange(5) + i}  # integer buffer: must never be averaged
            for i in range(n)]


def _base():
    return {"w": torch.zeros(4, 3), "b": torch.zeros(3).half(), "position_ids": torch.arange(5) * 10}


def _np(body, key):
    return body[key].numpy().astype(np.float64)


def test_uniform_mean_matches_numpy_oracle_and_keeps_dtypes_and_integer_buffers():
    bodies, base = _bodies(5), _base()
    fused = fuse(UniformMean(), bodies, base)
    np.testing.assert_allclose(fused["w"].numpy(), np.mean([_np(b, "w") for b in bodies], axis=0), rtol=1e-6, atol=1e-7)
    assert fused["b"].dtype == torch.float16
    np.testing.assert_allclose(fused["b"].float().numpy(), np.mean([_np(b, "b") for b in bodies], axis=0), atol=1e-3)
    assert torch.equal(fused["position_ids"], base["position_ids"]) and fused["position_ids"].dtype == torch.int64


def test_uniform_mean_counts_each_contribution_once_whatever_its_examples():
    bodies, base = _bodies(3, seed=1), _base()
    twice = fuse(UniformMean(), [bodies[0], bodies[0], bodies[1]], base, examples=[10, 10, 1000])["w"].numpy()
    w0, w1 = _np(bodies[0], "w"), _np(bodies[1], "w")
    np.testing.assert_allclose(twice, (2 * w0 + w1) / 3, rtol=1e-6, atol=1e-7)
    assert np.abs(twice - (w0 + w1) / 2).max() > 1e-3  # not the mean of the distinct bodies


def test_weighted_mean_weighs_by_examples_and_equals_the_uniform_mean_when_they_are_equal():
    bodies, base, examples = _bodies(3, seed=2), _base(), [100, 300, 600]
    fused = fuse(WeightedMean(), bodies, base, examples=examples)
    oracle = np.average([_np(b, "w") for b in bodies], axis=0, weights=examples)
    np.testing.assert_allclose(fused["w"].numpy(), oracle, rtol=1e-6, atol=1e-7)
    same = fuse(WeightedMean(), bodies, base, examples=[7, 7, 7])
    assert torch.equal(same["w"], fuse(UniformMean(), bodies, base)["w"])


def test_task_arithmetic_scales_the_mean_update():
    bodies, base = _bodies(4, seed=3), {**_base(), "w": torch.full((4, 3), 0.5)}
    fused = fuse(TaskArithmetic(scale=2.5), bodies, base)
    updates = [_np(b, "w") - 0.5 for b in bodies]
    np.testing.assert_allclose(fused["w"].numpy(), 0.5 + 2.5 * np.mean(updates, axis=0), rtol=1e-6, atol=1e-6)


def test_means_over_tensors_of_several_chunks_equal_a_float64_numpy_fold_bit_for_bit():
    # The sums are folded in cache-sized chunks (strategies/chunks.py): every element must be folded exactly once,
    # with the same arithmetic as a whole-tensor float64 fold (the oracle: numpy, contribution by contribution).
    n = 2 * CHUNK + 5
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(n, generator=g), "ids": torch.arange(3)}
    bodies = [{"w": base["w"] + 0.01 * torch.randn(n, generator=g), "ids": torch.arange(3)} for _ in range(3)]
    total, updates, weighted = np.zeros(n), np.zeros(n), np.zeros(n)
    for body, examples in zip(bodies, (3, 5, 2)):
        total += _np(body, "w")
        updates += _np(body, "w") - _np(base, "w")
        weighted += examples * _np(body, "w")
    np.testing.assert_array_equal(fuse(UniformMean(), bodies, base)["w"].numpy(), (total / 3).astype(np.float32))
    np.testing.assert_array_equal(fuse(WeightedMean(), bodies, base, examples=[3, 5, 2])["w"].numpy(),
                                  (weighted / 10).astype(np.float32))
    np.testing.assert_array_equal(fuse(TaskArithmetic(scale=2.0), bodies, base)["w"].numpy(),
                                  (_np(base, "w") + 2.0 * (updates / 3)).astype(np.float32))


def test_mismatched_keys_or_shapes_and_nothing_to_fuse_raise_clear_errors():
    bodies, base = _bodies(2), _base()
    del bodies[1]["b"]
    with pytest.raises(FusionError, match=r"contribution 1 has mismatched keys: missing \['b'\]"):
        fuse(UniformMean(), bodies, base)
    bodies = _bodies(2)
    bodies[1]["w"] = torch.zeros(3, 4)
    with pytest.raises(FusionError, match=r"contribution 1, key 'w': shape \(3, 4\) != expected \(4, 3\)"):
        fuse(UniformMean(), bodies, base)
    with pytest.raises(FusionError, match="no contributions"):
        fuse(UniformMean(), [], base)


def test_every_operator_has_a_config_file_that_builds_it_and_says_what_it_is():
    files = {p.stem: yaml.safe_load(p.read_text()) for p in CONF_FUSION.glob("*.yaml")}
    assert set(files) == set(OPERATORS)
    for name, spec in files.items():
        operator = build_operator(spec)
        assert operator.name == name and operator.describe() == spec  # every parameter is in the file
        assert (CONF_FUSION / f"{name}.yaml").read_text().startswith("# ")  # and explained there
        assert OPERATORS[name].__doc__ and "http" in OPERATORS[name].__doc__  # its paper, linked


def test_the_operator_is_chosen_and_tuned_from_the_command_line():
    cfg = compose_config("", ["fusion=ties", "fusion.density=0.3"])
    assert build_operator(to_container(cfg, "fusion")).describe() == {"operator": "ties", "density": 0.3, "scale": 1.0}
    with pytest.raises(ConfigError, match=r"config key 'fusion.density' has invalid value 2: must be a number in"):
        compose_config("", ["fusion=ties", "fusion.density=2"])
    with pytest.raises(ConfigError, match=r"config key 'fusion.momentum' is not a parameter of fusion operator 'ties'"):
        compose_config("", ["fusion=ties", "+fusion.momentum=0.5"])
    with pytest.raises(ConfigError, match=r"config key 'fusion.operator' has invalid value 'avg': must be one of"):
        compose_config("", ["fusion.operator=avg"])
