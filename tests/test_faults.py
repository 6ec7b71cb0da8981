"""The faults of the testing aid (app/site/faults.py), each against its documented effect with a numpy oracle on the
update (the sent body minus the body received), and pinning an attacker into every round's sample
(strategies/coldfusion.py)."""

import random

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from app.site import faults as faults_module
from app.site.faults import InjectedFault, before_training, corrupt_body, malformed_content, straggle
from strategies.coldfusion import ColdFusion
from strategies.discovery import FederationError
from tests.test_strategy import _run

FLOATING = ("w", "b")  # _pair's floating tensors, in the body's order ("w" first); "ids" is an integer buffer


def _pair(seed: int):
    g = torch.Generator().manual_seed(seed)
    received = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g), "ids": torch.arange(3)}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in received.items()}
    return received, trained


def _numpy(body):
    return {k: v.numpy().astype(np.float64) for k, v in body.items()}


def _flat_update(body, received):
    return np.concatenate([(body[k].double() - received[k].double()).numpy().ravel() for k in ("b", "w")])


def test_no_fault_sends_the_trained_body_untouched():
    received, trained = _pair(0)
    sent = corrupt_body(None, dict(trained), received, {}, server_round=1)
    assert set(sent) == set(trained) and all(torch.equal(sent[k], trained[k]) for k in trained)


@pytest.mark.parametrize("factor", [None, 4.0, -0.5])  # None: the documented default, faults.scale=100
def test_scale_multiplies_the_update_by_the_factor(factor):
    received, trained = _pair(3)
    settings = {} if factor is None else {"scale": factor}
    sent = corrupt_body("scale", dict(trained), received, settings, server_round=2)
    expected = 100.0 if factor is None else factor
    r, t, s = _numpy(received), _numpy(trained), _numpy(sent)
    for key in FLOATING:  # oracle: received + factor * (trained - received), per tensor, in float64
        np.testing.assert_allclose(s[key] - r[key], expected * (t[key] - r[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    assert torch.equal(sent["ids"], received["ids"]) and sent["w"].dtype == torch.float32


def test_sign_flip_sends_the_trained_update_negated():
    received, trained = _pair(0)
    sent = corrupt_body("sign_flip", dict(trained), received, {}, server_round=3)
    np.testing.assert_allclose(_flat_update(sent, received), -_flat_update(trained, received), atol=1e-6)
    assert torch.equal(sent["ids"], received["ids"]) and sent["w"].dtype == torch.float32


def test_non_finite_puts_nan_in_exactly_one_tensor_and_leaves_the_rest_as_trained():
    received, trained = _pair(4)
    sent = corrupt_body("non_finite", dict(trained), received, {}, server_round=1)
    assert set(sent) == set(trained)
    assert torch.isnan(sent["w"]).all() and sent["w"].shape == trained["w"].shape  # the first floating tensor
    assert not torch.isnan(trained["w"]).any()  # the trained tensor itself was not overwritten in place
    assert all(torch.equal(sent[k], trained[k]) for k in ("b", "ids"))


def test_wrong_shape_changes_the_shape_of_exactly_one_tensor():
    received, trained = _pair(5)
    sent = corrupt_body("wrong_shape", dict(trained), received, {}, server_round=1)
    assert set(sent) == set(trained)
    assert tuple(sent["w"].shape) == (6 * 4 + 1,)  # the first floating tensor, one element more, flattened
    assert all(torch.equal(sent[k], trained[k]) for k in ("b", "ids"))


def test_drop_key_leaves_out_exactly_one_tensor():
    received, trained = _pair(6)
    sent = corrupt_body("drop_key", dict(trained), received, {}, server_round=1)
    assert set(sent) == {"b", "ids"} and all(torch.equal(sent[k], trained[k]) for k in sent)


def test_raise_fails_the_message_and_hang_sleeps_the_configured_seconds(monkeypatch):
    with pytest.raises(InjectedFault, match="injected fault: raise"):
        before_training("raise", {})
    slept = []
    monkeypatch.setattr(faults_module.time, "sleep", slept.append)
    before_training("hang", {"hang_s": 7.5})
    before_training("hang", {})  # the documented default: 60 s
    before_training(None, {"hang_s": 7.5})  # no fault: no wait
    assert slept == [7.5, 60.0]


def test_a_straggler_waits_factor_minus_one_times_its_work(monkeypatch):
    slept = []
    monkeypatch.setattr(faults_module.time, "sleep", slept.append)
    settings = {"enabled": True, "slow": {"slow_task": 5}}
    allowed = {"allow-faults": True}
    assert straggle(settings, "slow_task", allowed, elapsed=2.0) == 8.0  # answers 5x later: 2 s of work + 8 s
    assert straggle(settings, "other_task", allowed, elapsed=2.0) == 0.0
    assert straggle({**settings, "enabled": False}, "slow_task", allowed, elapsed=2.0) == 0.0
    assert slept == [8.0]


def test_malformed_breaks_the_reply_a_different_way_each_round():
    body = {"w": torch.ones(2)}
    metrics = MetricRecord({"train-loss": 0.5, "num-examples": 10})
    missing = malformed_content(1, body, metrics)  # round 1 (mod 3): no metrics record
    assert set(missing) == {"arrays"} and isinstance(missing["arrays"], ArrayRecord)
    wrong_kind = malformed_content(2, body, metrics)  # round 2: arrays is a ConfigRecord
    assert isinstance(wrong_kind["arrays"], ConfigRecord) and dict(wrong_kind["metrics"]) == dict(metrics)
    wrong_types = malformed_content(3, body, metrics)  # round 3: train-loss gone, num-examples a list of floats
    assert dict(wrong_types["metrics"]) == {"num-examples": [1.5, 2.5]}
    assert torch.equal(wrong_types["arrays"].to_torch_state_dict()["w"], body["w"])
    assert dict(metrics) == {"train-loss": 0.5, "num-examples": 10}  # the honest metrics were not altered


def test_noise_has_the_honest_norm_and_one_direction_per_round_shared_by_colluders():
    received, first = _pair(1)
    _, second = _pair(2)  # another colluder: another trained update, same round
    settings = {"seed": 5}
    a = _flat_update(corrupt_body("noise", dict(first), received, settings, server_round=4), received)
    b = _flat_update(corrupt_body("noise", dict(second), received, settings, server_round=4), received)
    honest_a, honest_b = _flat_update(first, received), _flat_update(second, received)
    assert np.linalg.norm(a) == pytest.approx(np.linalg.norm(honest_a), rel=1e-5)
    assert np.linalg.norm(b) == pytest.approx(np.linalg.norm(honest_b), rel=1e-5)
    cosine = lambda x, y: x @ y / (np.linalg.norm(x) * np.linalg.norm(y))  # noqa: E731
    assert cosine(a, b) == pytest.approx(1.0, abs=1e-6)  # the same crafted direction
    assert abs(cosine(a, honest_a)) < 0.5  # not the trained update
    later = _flat_update(corrupt_body("noise", dict(first), received, settings, server_round=5), received)
    assert abs(cosine(a, later)) < 0.5  # a new direction every round


def test_a_pinned_task_is_in_every_rounds_sample(tiny_cfg, small_pool, tiny_path):
    contributing = sorted(e["name"] for e in small_pool if e["role"] == "contributing")
    pinned = contributing[-1]
    _, _, records, _, _ = _run(tiny_cfg, small_pool, tiny_path, rounds=3, contributors_per_round=2, pinned=[pinned],
                               eval_schedule={"probe": None})
    # oracle: the pinned task, then one seeded draw (Python's random, seed 0) from the others in name order per round
    rng, others = random.Random(0), [t for t in contributing if t != pinned]
    assert [r.contributors for r in records[1:]] == [[pinned, *rng.sample(others, 1)] for _ in range(3)]


def test_a_pinned_held_out_task_is_refused(tiny_cfg, small_pool, tiny_path):
    heldout = next(e["name"] for e in small_pool if e["role"] == "heldout")
    with pytest.raises(FederationError, match=rf"faults.pinned \['{heldout}'\] are not contributing tasks"):
        _run(tiny_cfg, small_pool, tiny_path, rounds=1, pinned=[heldout])
    assert ColdFusion(pool=small_pool).pinned == set()  # off unless asked for
