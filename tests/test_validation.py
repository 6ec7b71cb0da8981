"""Contribution validation before fusion: each kind of bad contribution is rejected, good ones pass."""

import math

import pytest
import torch

from strategies.fusion import uniform_mean
from strategies.validation import (
    Contribution,
    assert_finite,
    screen,
    structural_problem,
    update_norm,
)


def _base():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.zeros(4), "ids": torch.arange(6)}


def _honest(base, i, size=0.01):
    g = torch.Generator().manual_seed(100 + i)
    return {k: v + size * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


def _contributions(base, n=5):
    return [Contribution(node_id=i, task=f"t{i}", round=3, body=_honest(base, i)) for i in range(n)]


def test_good_contributions_pass_and_norms_are_reported():
    base = _base()
    valid, rejected, norms = screen(_contributions(base), base, 3, max_update_norm=10, max_relative_norm=5)
    assert len(valid) == 5 and not rejected
    assert norms["t0"] == pytest.approx(update_norm(valid[0].body, base))
    assert 0 < norms["t0"] < 1


@pytest.mark.parametrize("corrupt, reason", [
    (lambda b: b.pop("b"), "keys differ from the body sent: missing ['b']"),
    (lambda b: b.update(extra=torch.zeros(1)), "unexpected ['extra']"),
    (lambda b: b.update(w=torch.zeros(4, 8)), "'w' has shape (4, 8), expected (8, 4)"),
    (lambda b: b.update(w=b["w"].double()), "'w' has dtype torch.float64, expected torch.float32"),
    (lambda b: b["w"].__setitem__((0, 0), float("nan")), "'w' contains non-finite values"),
    (lambda b: b["b"].__setitem__(1, float("inf")), "'b' contains non-finite values"),
])
def test_each_structural_fault_is_rejected_with_its_reason(corrupt, reason):
    base = _base()
    contributions = _contributions(base)
    corrupt(contributions[2].body)
    valid, rejected, _ = screen(contributions, base, 3)
    assert [r.task for r in rejected] == ["t2"] and reason in rejected[0].reason
    assert len(valid) == 4


def test_scaled_updates_are_rejected_by_absolute_and_relative_bounds():
    base = _base()
    contributions = _contributions(base)
    scaled = {k: base[k] + 100 * (v - base[k]) if v.is_floating_point() else v
              for k, v in contributions[1].body.items()}
    contributions[1] = Contribution(1, "t1", 3, scaled)
    _, rejected, _ = screen(contributions, base, 3, max_relative_norm=5)
    assert [r.task for r in rejected] == ["t1"] and "x the median of the others" in rejected[0].reason
    _, rejected, _ = screen(contributions, base, 3, max_update_norm=1.0)
    assert [r.task for r in rejected] == ["t1"] and "> max_update_norm" in rejected[0].reason
    # with two contributions the leave-one-out median still singles out the outlier
    _, rejected, _ = screen(contributions[:2], base, 3, max_relative_norm=5)
    assert [r.task for r in rejected] == ["t1"]


def test_wrong_round_and_duplicate_replies_are_rejected():
    base = _base()
    contributions = _contributions(base, 3)
    contributions.append(Contribution(0, "t0", 3, _honest(base, 9)))  # node 0 answers twice
    contributions.append(Contribution(7, "t7", 2, _honest(base, 7)))  # an answer to round 2
    valid, rejected, _ = screen(contributions, base, 3)
    reasons = {r.task: r.reason for r in rejected}
    assert reasons == {"t0": "second reply from the same node in this round", "t7": "reply for round 2, expected 3"}
    assert [c.task for c in valid] == ["t0", "t1", "t2"]


def test_fusion_over_a_mix_equals_the_mean_of_the_good_ones():
    base = _base()
    contributions = _contributions(base)
    contributions[0].body["w"][0, 0] = float("nan")
    contributions[3] = Contribution(3, "t3", 3, {k: base[k] + 100 * (v - base[k]) if v.is_floating_point() else v
                                                 for k, v in contributions[3].body.items()})
    valid, rejected, _ = screen(contributions, base, 3, max_relative_norm=5)
    assert sorted(r.task for r in rejected) == ["t0", "t3"]
    fused = uniform_mean([c.body for c in valid], base=base)
    good = [contributions[i].body for i in (1, 2, 4)]
    torch.testing.assert_close(fused["w"], sum(b["w"] for b in good) / 3)
    assert_finite(fused, "fused")


def test_structural_problem_and_assert_finite_name_the_key():
    base = _base()
    assert structural_problem(_honest(base, 0), base) is None
    bad = {**base, "w": torch.full((8, 4), math.inf)}
    with pytest.raises(ValueError, match="fused: 'w' contains non-finite values"):
        assert_finite(bad, "fused")
