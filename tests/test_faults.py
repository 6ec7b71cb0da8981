"""The attack faults of the testing aid (app/site/faults.py): updates crafted to pass the norm rule, and pinning an
attacker into every round's sample (strategies/coldfusion.py)."""

import numpy as np
import pytest
import torch

from app.site.faults import corrupt_body
from strategies.coldfusion import ColdFusion
from strategies.discovery import FederationError
from tests.test_strategy import _run


def _pair(seed: int):
    g = torch.Generator().manual_seed(seed)
    received = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g), "ids": torch.arange(3)}
    trained = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in received.items()}
    return received, trained


def _flat_update(body, received):
    return np.concatenate([(body[k].double() - received[k].double()).numpy().ravel() for k in ("b", "w")])


def test_sign_flip_sends_the_trained_update_negated():
    received, trained = _pair(0)
    sent = corrupt_body("sign_flip", dict(trained), received, {}, server_round=3)
    np.testing.assert_allclose(_flat_update(sent, received), -_flat_update(trained, received), atol=1e-6)
    assert torch.equal(sent["ids"], received["ids"]) and sent["w"].dtype == torch.float32


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
    pinned = sorted(e["name"] for e in small_pool if e["role"] == "contributing")[-1]
    _, _, records, _, _ = _run(tiny_cfg, small_pool, tiny_path, rounds=3, contributors_per_round=2, pinned=[pinned],
                               eval_schedule={"probe": None})
    assert all(pinned in r.contributors and len(r.contributors) == 2 for r in records[1:])
    assert len({c for r in records[1:] for c in r.contributors}) > 2  # the other slot is still sampled


def test_a_pinned_held_out_task_is_refused(tiny_cfg, small_pool, tiny_path):
    heldout = next(e["name"] for e in small_pool if e["role"] == "heldout")
    with pytest.raises(FederationError, match=rf"faults.pinned \['{heldout}'\] are not contributing tasks"):
        _run(tiny_cfg, small_pool, tiny_path, rounds=1, pinned=[heldout])
    assert ColdFusion(pool=small_pool).pinned == set()  # off unless asked for
