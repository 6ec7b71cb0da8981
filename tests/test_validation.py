"""Contribution validation before fusion: each kind of bad contribution is rejected, good ones pass."""

import math

import numpy as np
import pytest
import torch

from strategies.chunks import CHUNK, squared_distance
from strategies.fusion import build_operator, fuse
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
    return [Contribution(node_id=i, label=f"t{i}", round=3, body=_honest(base, i)) for i in range(n)]


def test_good_contributions_pass_and_norms_are_reported():
    base = _base()
    valid, rejected, norms, _ = screen(_contributions(base), base, 3, max_update_norm=10, max_relative_norm=5)
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
    valid, rejected, _, _ = screen(contributions, base, 3)
    assert [r.label for r in rejected] == ["t2"] and reason in rejected[0].reason
    assert len(valid) == 4


def test_scaled_updates_are_rejected_by_absolute_and_relative_bounds():
    base = _base()
    contributions = _contributions(base)
    scaled = {k: base[k] + 100 * (v - base[k]) if v.is_floating_point() else v
              for k, v in contributions[1].body.items()}
    contributions[1] = Contribution(1, "t1", 3, scaled)
    _, rejected, _, _ = screen(contributions, base, 3, max_relative_norm=5)
    assert [r.label for r in rejected] == ["t1"] and "x the reference norm" in rejected[0].reason
    _, rejected, _, _ = screen(contributions, base, 3, max_update_norm=1.0)
    assert [r.label for r in rejected] == ["t1"] and "> max_update_norm" in rejected[0].reason
    # with two contributions the leave-one-out median still singles out the outlier (min_peers=1)
    _, rejected, _, _ = screen(contributions[:2], base, 3, max_relative_norm=5, min_peers=1)
    assert [r.label for r in rejected] == ["t1"]


def test_wrong_round_and_duplicate_replies_are_rejected():
    base = _base()
    contributions = _contributions(base, 3)
    contributions.append(Contribution(0, "t0", 3, _honest(base, 9)))  # node 0 answers twice
    contributions.append(Contribution(7, "t7", 2, _honest(base, 7)))  # an answer to round 2
    valid, rejected, _, _ = screen(contributions, base, 3)
    reasons = {r.label: r.reason for r in rejected}
    assert reasons == {"t0": "second reply from the same node in this round", "t7": "reply for round 2, expected 3"}
    assert [c.label for c in valid] == ["t0", "t1", "t2"]


def test_fusion_over_a_mix_equals_the_mean_of_the_good_ones():
    base = _base()
    contributions = _contributions(base)
    contributions[0].body["w"][0, 0] = float("nan")
    contributions[3] = Contribution(3, "t3", 3, {k: base[k] + 100 * (v - base[k]) if v.is_floating_point() else v
                                                 for k, v in contributions[3].body.items()})
    valid, rejected, _, _ = screen(contributions, base, 3, max_relative_norm=5)
    assert sorted(r.label for r in rejected) == ["t0", "t3"]
    fused = fuse(build_operator("uniform_mean"), [c.body for c in valid], base)
    good = [contributions[i].body for i in (1, 2, 4)]
    torch.testing.assert_close(fused["w"], sum(b["w"] for b in good) / 3)
    assert_finite(fused, "fused")


def test_structural_problem_and_assert_finite_name_the_key():
    base = _base()
    assert structural_problem(_honest(base, 0), base) is None
    bad = {**base, "w": torch.full((8, 4), math.inf)}
    with pytest.raises(ValueError, match="fused: 'w' contains non-finite values"):
        assert_finite(bad, "fused")


def _scaled(base, body, factor):
    return {k: base[k] + factor * (v - base[k]) if v.is_floating_point() else v for k, v in body.items()}


def _norm(base, body):  # independent oracle: numpy over the flattened float tensors
    import numpy as np

    return float(np.sqrt(sum(((body[k].double() - base[k].double()).numpy() ** 2).sum()
                             for k in base if base[k].is_floating_point())))


def test_relative_rule_with_one_contribution_uses_the_last_fused_round_or_says_it_cannot_judge():
    base = _base()
    (alone,) = _contributions(base, 1)
    honest = _norm(base, alone.body)
    # no reference yet: the rule cannot judge, the contribution passes and the note says why
    valid, rejected, _, notes = screen([alone], base, 3, max_relative_norm=5)
    assert [c.label for c in valid] == ["t0"] and not rejected
    assert notes == ["t0: relative norm rule not applied (0 peer norm(s) < validation.min_peers=2)"]
    # with the last fused round's norms as reference, a 10x update alone is caught, an honest one passes
    big = Contribution(0, "t0", 3, _scaled(base, alone.body, 10))
    _, rejected, norms, notes = screen([big], base, 3, max_relative_norm=5, reference_norms=[honest, honest * 1.1])
    assert [r.label for r in rejected] == ["t0"] and not notes
    assert "median of 2 peers" in rejected[0].reason and norms["t0"] == pytest.approx(10 * honest, rel=1e-6)
    valid, rejected, _, _ = screen([alone], base, 3, max_relative_norm=5, reference_norms=[honest, honest * 1.1])
    assert len(valid) == 1 and not rejected


def test_relative_rule_catches_two_colluders_in_a_round_of_two_through_the_reference_norms():
    base = _base()
    honest = _contributions(base, 2)
    crafted = _scaled(base, honest[0].body, 8)
    colluders = [Contribution(0, "t0", 3, crafted), Contribution(1, "t1", 3, {k: v.clone() for k, v in crafted.items()})]
    # judged only against each other, they pass (the weakness of a leave-one-out median of two)...
    valid, rejected, _, _ = screen(colluders, base, 3, max_relative_norm=5, min_peers=1)
    assert len(valid) == 2 and not rejected
    # ...but with the last fused round's honest norms among the peers, both are rejected
    reference = [_norm(base, c.body) for c in _contributions(base, 5)]
    valid, rejected, _, _ = screen(colluders, base, 3, max_relative_norm=5, reference_norms=reference)
    assert not valid and sorted(r.label for r in rejected) == ["t0", "t1"]


def test_relative_rule_with_many_contributions_and_a_median_of_zero():
    base = _base()
    contributions = _contributions(base, 6)
    contributions[5] = Contribution(5, "t5", 3, _scaled(base, contributions[5].body, 6))
    _, rejected, norms, _ = screen(contributions, base, 3, max_relative_norm=5)
    assert [r.label for r in rejected] == ["t5"]
    import statistics

    others = [_norm(base, c.body) for c in contributions[:5]]
    assert norms["t5"] > 5 * statistics.median(others)
    # peers that sent the base back unchanged (norm 0) carry no scale: they are left out of the median, so a
    # real update is not rejected for being larger than nothing
    lazy = [Contribution(i, f"z{i}", 3, {k: v.clone() for k, v in base.items()}) for i in range(10, 14)]
    real = _contributions(base, 3)
    valid, rejected, norms, _ = screen([*lazy, *real], base, 3, max_relative_norm=5)
    assert not rejected and len(valid) == 7 and norms["z10"] == 0.0
    # all peers unchanged and no history: the floor (min_reference_norm) is the reference
    (one,) = _contributions(base, 1)
    _, rejected, _, notes = screen([*lazy, one], base, 3, max_relative_norm=5, reference_norms=[0.0])
    assert not rejected and notes  # zero norms are no peers: it cannot judge
    _, rejected, _, _ = screen([one], base, 3, max_relative_norm=5, reference_norms=[1e-9, 1e-9],
                               min_reference_norm=1e-3)
    assert [r.label for r in rejected] == ["t0"] and "(0.001, median of 2 peers)" in rejected[0].reason


def test_a_huge_finite_update_is_judged_by_its_norm_not_called_non_finite():
    base = _base()
    huge = {k: v + 1e25 if v.is_floating_point() else v for k, v in base.items()}  # its float32 squares overflow
    valid, rejected, norms, _ = screen([Contribution(0, "t0", 3, huge)], base, 3, max_update_norm=1e25)
    assert not valid and rejected[0].reason.startswith("update norm 6e+25 > max_update_norm")
    assert norms["t0"] == pytest.approx(_norm(base, huge), rel=1e-9)


def test_the_squared_distance_covers_every_chunk_and_widens_half_precision():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3 * CHUNK + 11, generator=g), torch.randn(3 * CHUNK + 11, generator=g)
    oracle = float(((a.numpy().astype(np.float64) - b.numpy().astype(np.float64)) ** 2).sum())
    assert squared_distance(a, b) == pytest.approx(oracle, rel=1e-7)
    assert squared_distance(a[:5], b[:5]) == pytest.approx(float(((a[:5].double() - b[:5].double()) ** 2).sum()))
    x, y = torch.full((4,), 300.0).half(), torch.zeros(4).half()  # 300^2 overflows float16, not float32
    assert squared_distance(x, y) == 4 * 300.0 ** 2
    a[2 * CHUNK + 3] = math.nan  # in the third chunk
    assert math.isnan(squared_distance(a, b))


# ------------------------------------------------------------------- through the strategy: only rounds that stood

def _scripted(norms: dict[int, float], dev: dict[int, float], test: dict[int, float]):
    """A node that trains nothing: its round-r update has L2 norm ``norms[r]`` (a direction seeded by its node id),
    and every evaluation reports ``test[r]`` on test rows and ``dev[r]`` on dev rows; the task query is real."""
    from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from app.client_app import app as client_app

    def client(message, context):
        kind, config = message.metadata.message_type, message.content["config"]
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE):
            return client_app(message, context)
        server_round = int(config["server-round"])
        if kind == MessageType.EVALUATE:
            metrics = {"probe.accuracy": test[server_round], "probe.dev_accuracy": dev[server_round], "num-examples": 1}
            return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
        base = message.content["arrays"].to_torch_state_dict()
        g = torch.Generator().manual_seed(context.node_id * 100 + server_round)
        step = {k: torch.randn(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
        scale = norms[server_round] / math.sqrt(sum(float((s.double() ** 2).sum()) for s in step.values()))
        body = {k: v + scale * step[k] if k in step else v for k, v in base.items()}
        metrics = MetricRecord({"train-loss": 0.5, "num-examples": 10, "server-round": server_round})
        return Message(content=RecordDict({"arrays": ArrayRecord(body), "metrics": metrics}), reply_to=message)

    return client


def _run_scripted(tiny_cfg, small_pool, body, client, rounds, first_round=0, history=(), **settings):
    from flwr.app import ArrayRecord

    from app.run.server import round_configs
    from strategies.coldfusion import ColdFusion
    from tests.conftest import model_json
    from tests.inprocess import InProcessGrid

    records = []
    strategy = ColdFusion(pool=small_pool, contributors_per_round=None, seed=0, node_wait_timeout=5,
                          on_round=lambda record, arrays: records.append((record, arrays, list(strategy.reference_norms))),
                          **settings)
    grid = InProcessGrid(client, [{"partition-id": i, "num-partitions": len(small_pool)} for i in range(len(small_pool))])
    train, evaluate = round_configs(tiny_cfg, model_json(tiny_cfg))
    strategy.start(grid, ArrayRecord(body), num_rounds=rounds, timeout=60, train_config=train, evaluate_config=evaluate,
                   first_round=first_round, history=history)
    return records


def test_a_rolled_back_round_gives_no_reference_norms_live_or_on_resume(tiny_cfg, small_pool, tiny_path):
    """Round 1's updates (norm 1) stand; round 2's (norm 2, within 3x of them) are fused, then rolled back (its dev
    score falls); round 3's (norm 4) are 4x round 1's but only 2x the undone round 2's: judged against the rounds
    that stood, every one is rejected, in the live run and in a run resumed after round 2 alike."""
    from dataclasses import asdict
    import json

    from app.learning.model import initial_body
    from strategies.records import fused_norms, read_records

    client = _scripted(norms={1: 1.0, 2: 2.0, 3: 4.0}, dev={0: 0.5, 1: 0.6, 2: 0.2, 3: 0.6},
                       test={0: 0.5, 1: 0.6, 2: 0.6, 3: 0.6})
    settings = {"max_relative_norm": 3.0, "backtrack_threshold": 0.05}
    live = _run_scripted(tiny_cfg, small_pool, initial_body(tiny_path), client, rounds=3, **settings)
    (r1, _, norms1), (r2, base2, norms2), (r3, _, _) = live[1:]
    assert r1.fused and not r1.rolled_back and sorted(r1.update_norms.values()) == pytest.approx([1.0] * 6)
    assert r2.fused and r2.rolled_back and sorted(r2.update_norms.values()) == pytest.approx([2.0] * 6)
    assert norms2 == norms1 == pytest.approx([r1.update_norms[c] for c in r1.fused_contributors])  # not round 2's
    assert not r3.fused and len(r3.rejections) == 6, r3.rejections
    assert all("x the reference norm (1" in reason for reason in r3.rejections), r3.rejections

    history = read_records(json.loads(json.dumps(asdict(r))) for r, _, _ in live[:3])  # as metrics.jsonl holds it
    assert fused_norms(history) == [r1.update_norms[c] for c in r1.fused_contributors]
    resumed = _run_scripted(tiny_cfg, small_pool, base2.to_torch_state_dict(), client, rounds=3, first_round=3,
                            history=history, **settings)
    assert [(r.fused, sorted(r.rejections)) for r, _, _ in resumed] == [(r3.fused, sorted(r3.rejections))]


def test_back_tracking_in_the_strategy_reads_dev_scores_never_test_scores(tiny_cfg, small_pool, tiny_path):
    """Adversarial test scores: round 2's collapse on test while its dev score holds (it must stand), round 3's
    soar on test while its dev score falls (it must be undone)."""
    from app.learning.model import initial_body

    client = _scripted(norms={1: 1.0, 2: 1.0, 3: 1.0}, dev={0: 0.5, 1: 0.6, 2: 0.6, 3: 0.3},
                       test={0: 0.5, 1: 0.6, 2: 0.0, 3: 1.0})
    records = _run_scripted(tiny_cfg, small_pool, initial_body(tiny_path), client, rounds=3, backtrack_threshold=0.05)
    assert [r.rolled_back for r, _, _ in records] == [False, False, False, True]
    assert [r.base_round for r, _, _ in records] == [0, 1, 2, 2]
    assert records[3][0].dev == {"probe": {"contributing": 0.3, "heldout": 0.3}}
