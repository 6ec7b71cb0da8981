"""The streaming intake (strategies/intake.py): contributions taken one by one, in any arrival order, give the same
verdicts as the all-at-once rule (``screen``) and a fused base equal bit for bit to folding the sorted valid ones;
bodies that cannot be folded yet wait on disk, not in memory."""

import itertools
import random

import numpy as np
import pytest
import torch

from strategies.fusion import build_operator
from strategies.intake import RoundIntake
from strategies.validation import Contribution, NormRule, screen


def _base():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.zeros(8), "ids": torch.arange(6)}


def _body(base, seed, size):
    g = torch.Generator().manual_seed(seed)
    return {k: v + size * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in base.items()}


def _round(base, sizes, server_round=3):
    """Contributions of the given update sizes (None: a malformed one, NaN in it)."""
    out = []
    for i, size in enumerate(sizes):
        body = _body(base, 100 + i, size or 0.01)
        if size is None:
            body["w"][0, 0] = float("nan")
        out.append(Contribution(node_id=50 + i, label=f"t{i}", round=server_round, body=body, examples=10 + i))
    return out


def _intake(base, contributions, rule, operator="uniform_mean", server_round=3):
    expected = [(c.label, c.node_id) for c in contributions]
    return RoundIntake(build_operator(operator).start(base, server_round), base, server_round, expected, rule)


def _numpy_mean(bodies, key):  # independent oracle: float64 numpy mean, cast back to float32
    return torch.from_numpy(np.mean([b[key].double().numpy() for b in bodies], axis=0)).float()


@pytest.mark.parametrize("operator", ["uniform_mean", "weighted_mean", "ties", "median"])
def test_any_arrival_order_gives_the_same_base_bit_for_bit_and_the_same_verdicts(operator):
    base = _base()
    sizes = [0.01, 0.012, None, 0.3, 0.009, 0.011, 0.0105]  # a malformed one and an outlier (30x)
    contributions = _round(base, sizes)
    rule = NormRule(max_relative_norm=5.0)
    valid, rejected, norms, notes = screen(contributions, base, 3, max_relative_norm=5.0)
    reference = build_operator(operator).start(base, 3)
    for c in sorted(valid, key=lambda c: c.label):
        reference.fold(c.body, label=c.label, examples=c.examples)
    expected = reference.finish()
    orders = [list(contributions), contributions[::-1]] + [random.Random(s).sample(contributions, len(contributions))
                                                            for s in range(4)]
    for order in orders:
        intake = _intake(base, contributions, rule, operator)
        for c in order:
            intake.take(c)
        result = intake.close()
        fused = intake.accumulator.finish()
        assert all(torch.equal(fused[k], expected[k]) for k in base), [c.label for c in order]
        assert result.folded == sorted(c.label for c in valid)  # the canonical order
        assert sorted(map(str, result.rejections)) == sorted(map(str, rejected))
        assert result.norms == norms and result.notes == notes
    assert {r.label for r in rejected} == {"t2", "t3"}


def test_the_mean_matches_a_numpy_oracle_and_missing_contributors_do_not_block_the_fold():
    base = _base()
    contributions = _round(base, [0.01] * 5)
    intake = _intake(base, contributions, NormRule(max_update_norm=10.0))
    intake.missing("t0")  # the first in the canonical order sends an error: the others fold anyway
    for c in contributions[1:]:
        intake.take(c)
        assert intake.waiting() == 0  # each was folded as it came: nothing waits
    result = intake.close()
    assert result.folded == ["t1", "t2", "t3", "t4"] and result.spilled == 0
    fused = intake.accumulator.finish()
    torch.testing.assert_close(fused["w"], _numpy_mean([c.body for c in contributions[1:]], "w"), rtol=0, atol=1e-7)
    assert torch.equal(fused["ids"], base["ids"])


def test_bodies_that_arrive_early_wait_on_disk_and_the_peak_is_counted():
    base = _base()
    contributions = _round(base, [0.01] * 6)
    intake = _intake(base, contributions, NormRule())
    for c in contributions[::-1]:  # the last in canonical order first: all but one must wait
        intake.take(c)
    result = intake.close()
    assert result.spilled == 5 and result.peak_waiting == 5 and intake.waiting() == 0
    assert result.folded == [f"t{i}" for i in range(6)]


def test_a_contribution_within_bounds_is_folded_before_the_round_ends_and_an_outlier_dropped_early():
    base = _base()
    contributions = _round(base, [0.01, 0.011, 0.0095, 0.0105, 0.5])
    honest = [float(torch.linalg.vector_norm(torch.cat([(c.body[k] - base[k]).flatten() for k in ("w", "b")])))
              for c in contributions[:4]]
    # with the last round's norms as reference, 4 honest updates are safe whatever the others send
    intake = _intake(base, contributions, NormRule(max_relative_norm=3.0, reference_norms=tuple(honest * 2)))
    intake.take(contributions[0])
    assert intake.waiting() == 0 and intake.outstanding() == 4  # judged and folded at once
    intake.take(contributions[4])
    assert intake.rejected() == 1 and intake.waiting() == 0  # 50x: rejected whatever comes, dropped at once
    for c in contributions[1:4]:
        intake.take(c)
    result = intake.close()
    assert result.folded == ["t0", "t1", "t2", "t3"]
    assert [r.label for r in result.rejections] == ["t4"] and "x the reference norm" in result.rejections[0].reason


def test_not_asked_duplicate_and_wrong_round_replies_are_rejected_with_their_reason():
    base = _base()
    contributions = _round(base, [0.01] * 3)
    intake = _intake(base, contributions[:2], NormRule())
    intake.take(contributions[0])
    assert "second reply" in intake.take(contributions[0]).reason
    assert "not asked" in intake.take(contributions[2]).reason
    late = Contribution(51, "t1", 2, contributions[1].body)
    assert intake.take(late).reason == "reply for round 2, expected 3"
    result = intake.close()
    assert result.folded == ["t0"]  # t1's one reply was for another round: it is missing, not waited for


@pytest.mark.parametrize("seed", range(200))
def test_early_verdicts_never_contradict_the_final_rule(seed):
    rng = random.Random(seed)
    k = rng.randint(1, 9)
    norms = [rng.choice([0.0, rng.uniform(0.5, 2), rng.uniform(5, 30)]) for _ in range(k)]
    arrives = [rng.random() < 0.8 for _ in range(k)]
    rule = NormRule(max_update_norm=rng.choice([None, 20.0]), max_relative_norm=rng.choice([None, 2.0, 5.0]),
                    reference_norms=tuple(rng.uniform(0.5, 2) for _ in range(rng.randint(0, 4))),
                    min_peers=rng.randint(1, 3))
    final = [n for n, a in zip(norms, arrives) if a]
    order = [i for i in rng.sample(range(k), k)]
    seen: list[int] = []
    for step, i in enumerate(order):
        if arrives[i]:
            seen.append(i)
        unknown = k - step - 1
        for j in seen:
            verdict = rule.early(norms[j], [norms[o] for o in seen if o != j], unknown)
            if verdict is not None:
                others = [n for n, a, idx in zip(norms, arrives, itertools.count()) if a and idx != j]
                reason, _ = rule.judge(norms[j], others)
                assert verdict == (reason is None), (norms, arrives, j, rule)
    assert len(final) == len(seen)


def test_folding_follows_the_canonical_order_where_float64_sums_are_not_associative():
    base = {"w": torch.zeros(1)}
    values = {"t0": 1e20, "t1": 1.0, "t2": -1e20}  # (1e20 + 1) - 1e20 == 0, but (1e20 - 1e20) + 1 == 1
    contributions = [Contribution(i, label, 3, {"w": torch.tensor([v])}) for i, (label, v) in enumerate(values.items())]
    results = set()
    for order in itertools.permutations(contributions):
        intake = _intake(base, contributions, NormRule())
        naive = build_operator("uniform_mean").start(base, 3)
        for c in order:
            intake.take(c)
            naive.fold(c.body, label=c.label)
        intake.close()
        results.add(float(intake.accumulator.finish()["w"]))
        if order[0].label != "t1" and order[2].label == "t1":  # the naive fold in arrival order differs here
            assert float(naive.finish()["w"]) != float(intake.accumulator.finish()["w"])
    assert results == {0.0}  # always ((1e20 + 1) - 1e20) / 3: the canonical order t0, t1, t2
