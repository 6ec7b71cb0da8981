"""TIES, DARE, DARE-TIES, median and trimmed mean against independent numpy oracles (float64, stacked over all
contributions, where the operators stream or sort), plus Flower's and scipy's own median / trimmed mean."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
from scipy.stats import trim_mean

from strategies.fusion.base import FusionError, label_seed
from strategies.fusion.merging import Dare, DareTies, Ties
from strategies.fusion.robust import Median, TrimmedMean

LABELS = [f"c{i}" for i in range(10)]
FLOATING = ["v", "w"]  # sorted: the order DARE draws its masks in


def make(k: int = 5, seed: int = 0):
    """A base (float32 matrix, float16 vector, int64 buffer) and k bodies around it; the bodies' int buffers
    differ from the base's, so a test sees whether the base's is the one kept."""
    rng = np.random.default_rng(seed)
    base = {"w": torch.tensor(rng.normal(size=(6, 7)), dtype=torch.float32),
            "v": torch.tensor(rng.normal(size=5), dtype=torch.float16),
            "ids": torch.arange(4, dtype=torch.int64)}
    bodies = [{"w": (base["w"] + torch.tensor(rng.normal(size=(6, 7)), dtype=torch.float32)),
               "v": (base["v"] + torch.tensor(rng.normal(size=5), dtype=torch.float16)),
               "ids": base["ids"] + i + 1} for i in range(k)]
    return base, bodies


def np64(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64)


def run(op, base, bodies, labels=LABELS, weights=None, server_round=3):
    acc = op.start(base, server_round)
    for i, body in enumerate(bodies):
        acc.fold(body, label=labels[i], weight=1.0 if weights is None else weights[i])
    return acc


def check(acc, oracle: dict[str, np.ndarray]) -> None:
    """The float64 fusion equals the oracle; finish() casts it to each base dtype and keeps integer buffers."""
    fused = acc._finish()
    for k in FLOATING:
        np.testing.assert_allclose(fused[k].numpy(), oracle[k], rtol=1e-12, atol=1e-12)
    out = acc.finish()
    for k, v in acc.base.items():
        assert out[k].dtype == v.dtype
        assert torch.equal(out[k], fused[k].to(v.dtype) if k in FLOATING else v)


# ---- numpy oracles -------------------------------------------------------------------------------------------

def np_trim(update: dict[str, np.ndarray], density: float) -> dict[str, np.ndarray]:
    flat = np.concatenate([np.abs(update[k]).ravel() for k in FLOATING])
    n = flat.size
    k = math.ceil(density * n)  # the tests' densities make density * n exact or clearly fractional
    threshold = np.sort(flat)[n - k]
    return {key: np.where(np.abs(u) >= threshold, u, 0.0) for key, u in update.items()}


def np_masks(seed, server_round, label, base, drop):
    g = torch.Generator().manual_seed(label_seed(seed, server_round, label))
    return {k: torch.rand(base[k].shape, generator=g, dtype=torch.float64).numpy() >= drop for k in FLOATING}


def np_dare(update, mask, drop):
    return {k: np.where(mask[k], update[k] / (1 - drop), 0.0) for k in FLOATING}


def np_disjoint(base, sparse, weights, scale):
    out = {}
    for k in FLOATING:
        t = np.stack([s[k] for s in sparse])
        w = np.asarray(weights, dtype=np.float64).reshape(-1, *([1] * (t.ndim - 1)))
        elected = np.sign((w * t).sum(axis=0))
        agree = (np.sign(t) == elected) & (t != 0)
        num, den = (w * t * agree).sum(axis=0), (w * agree).sum(axis=0)
        out[k] = np64(base[k]) + scale * np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
    return out


def updates(base, bodies):
    return [{k: np64(b[k]) - np64(base[k]) for k in FLOATING} for b in bodies]


# ---- TIES ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density,scale,weights", [(0.2, 1.0, None), (0.5, 0.7, None), (1.0, 1.0, None),
                                                   (0.3, 1.5, [1.0, 2.0, 0.5, 3.0, 1.0])])
def test_ties_matches_oracle(density, scale, weights):
    base, bodies = make()
    w = weights or [1.0] * 5
    oracle = np_disjoint(base, [np_trim(u, density) for u in updates(base, bodies)], w, scale)
    check(run(Ties(density=density, scale=scale), base, bodies, weights=weights), oracle)


def test_ties_elects_sign_and_averages_the_agreeing_only():
    base = {"v": torch.zeros(1, dtype=torch.float64)}
    bodies = [{"v": torch.tensor([x], dtype=torch.float64)} for x in (2.0, 3.0, -4.0)]
    assert run(Ties(density=1.0), base, bodies).finish()["v"].item() == 2.5  # + elected; mean of 2 and 3
    heavy = run(Ties(density=1.0), base, bodies, weights=[1.0, 1.0, 3.0]).finish()["v"].item()
    assert heavy == -4.0  # -12 outweighs +5; the one agreeing value
    even = [{"v": torch.tensor([x], dtype=torch.float64)} for x in (2.0, -2.0)]
    assert run(Ties(density=1.0), base, even).finish()["v"].item() == 0.0  # no elected sign: nothing moves


def test_ties_of_one_is_its_trimmed_update_over_the_whole_task_vector():
    base = {"big": torch.zeros(4), "small": torch.zeros(6)}
    body = {"big": torch.tensor([10.0, -9.0, 8.0, 7.0]), "small": torch.tensor([1.0, -2.0, 3.0, 0.5, 0.1, 0.2])}
    out = run(Ties(density=0.3, scale=2.0), base, [body]).finish()  # k = 3 of 10: all three in "big"
    assert torch.equal(out["big"], torch.tensor([20.0, -18.0, 16.0, 0.0]))
    assert torch.equal(out["small"], torch.zeros(6))  # a per-tensor trim would keep 3.0 here


def test_ties_keeps_every_tie_at_the_threshold():
    base = {"v": torch.zeros(8, dtype=torch.float64)}
    body = {"v": torch.tensor([5.0, -4.0, 3.0, -3.0, 3.0, 1.0, 0.5, -0.1], dtype=torch.float64)}
    out = run(Ties(density=0.3), base, [body]).finish()["v"]  # k = 3, threshold 3: five kept
    assert torch.equal(out, torch.tensor([5.0, -4.0, 3.0, -3.0, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_ties_reads_density_as_written():
    base = {"v": torch.zeros(100, dtype=torch.float64)}
    body = {"v": torch.arange(1, 101, dtype=torch.float64)}
    assert 0.07 * 100 > 7  # float rounding: a naive ceil keeps 8
    out = run(Ties(density=0.07), base, [body]).finish()["v"]
    assert torch.equal(torch.nonzero(out).flatten(), torch.arange(93, 100))


# ---- DARE and DARE-TIES --------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop,scale,weights", [(0.9, 1.0, None), (0.5, 2.0, [1.0, 2.0, 0.5, 3.0, 1.0]),
                                                (0.0, 1.0, None)])
def test_dare_matches_oracle(drop, scale, weights):
    base, bodies = make()
    w = np.asarray(weights or [1.0] * 5)
    dropped = [np_dare(u, np_masks(7, 3, lab, base, drop), drop) for u, lab in zip(updates(base, bodies), LABELS)]
    oracle = {k: np64(base[k]) + scale * sum(wi * d[k] for wi, d in zip(w, dropped)) / w.sum() for k in FLOATING}
    check(run(Dare(drop=drop, scale=scale, seed=7), base, bodies, weights=weights), oracle)


@pytest.mark.parametrize("drop,weights", [(0.9, None), (0.5, [1.0, 2.0, 0.5, 3.0, 1.0])])
def test_dare_ties_matches_oracle(drop, weights):
    base, bodies = make()
    dropped = [np_dare(u, np_masks(7, 3, lab, base, drop), drop) for u, lab in zip(updates(base, bodies), LABELS)]
    oracle = np_disjoint(base, dropped, weights or [1.0] * 5, 1.3)
    check(run(DareTies(drop=drop, scale=1.3, seed=7), base, bodies, weights=weights), oracle)


@pytest.mark.parametrize("op", [Dare(drop=0.9), DareTies(drop=0.9)])
def test_dare_drops_a_bernoulli_fraction_and_rescales_the_survivors(op):
    base = {"v": torch.zeros(20000, dtype=torch.float64)}
    body = {"v": torch.linspace(0.5, 1.5, 20000, dtype=torch.float64)}
    out = run(op, base, [body], labels=["solo"]).finish()["v"]
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.1) < 0.01  # 5 standard deviations
    assert torch.allclose(out[kept], body["v"][kept] / 0.1, rtol=1e-15, atol=0)


def kept_pattern(op, base, body, label, server_round):
    return run(op, base, [body], labels=[label], server_round=server_round).finish()["w"] != base["w"]


def test_dare_masks_follow_label_and_round_not_fold_order():
    base, bodies = make()
    order = [4, 1, 3, 0, 2]
    a = run(Dare(seed=1), base, bodies).finish()
    b = run(Dare(seed=1), base, [bodies[i] for i in order], labels=[LABELS[i] for i in order]).finish()
    for k in FLOATING:  # the float64 sums may differ in the last bit; the masks (where anything moved) may not
        torch.testing.assert_close(a[k].double(), b[k].double(), rtol=1e-12, atol=1e-12)
        assert torch.equal(a[k] != base[k], b[k] != base[k])
    same = kept_pattern(Dare(seed=1), base, bodies[0], "x", 3)
    assert torch.equal(same, kept_pattern(Dare(seed=1), base, bodies[0], "x", 3))  # a resumed run redraws them
    assert not torch.equal(same, kept_pattern(Dare(seed=1), base, bodies[0], "y", 3))
    assert not torch.equal(same, kept_pattern(Dare(seed=1), base, bodies[0], "x", 4))
    assert not torch.equal(same, kept_pattern(Dare(seed=2), base, bodies[0], "x", 3))


# ---- median and trimmed mean ---------------------------------------------------------------------------------

def check_in_dtype(acc, oracle: dict[str, np.ndarray], exact: bool = True) -> None:
    """The fused tensors, written straight in each base dtype, equal the float64 oracle cast to it (bit for bit, or
    within one unit in the last place where the oracle sums in another order); integer buffers from the base."""
    out = acc.finish()
    for k, v in acc.base.items():
        assert out[k].dtype == v.dtype, k
        if k not in oracle:
            assert torch.equal(out[k], v)
            continue
        expected = torch.from_numpy(oracle[k]).to(v.dtype)
        if exact:
            assert torch.equal(out[k], expected), k
        else:
            np.testing.assert_allclose(out[k].double().numpy(), expected.double().numpy(),
                                       rtol=torch.finfo(v.dtype).eps, atol=0, err_msg=k)


def np_trimmed(stack: np.ndarray, beta: float) -> np.ndarray:
    k = stack.shape[0]
    cut = int(beta * k)
    return np.sort(stack, axis=0)[cut:k - cut].mean(axis=0)


@pytest.mark.parametrize("k", [5, 4, 1])
def test_median_matches_numpy_and_flower(k):
    base, bodies = make(k)
    oracle = {key: np.median(np.stack([np64(b[key]) for b in bodies]), axis=0) for key in FLOATING}
    flower = aggregate_median([([np64(b[key]) for key in FLOATING], 1) for b in bodies])
    for key, f in zip(FLOATING, flower):
        np.testing.assert_allclose(f, oracle[key], rtol=1e-12, atol=1e-12)
    acc = run(Median(), base, bodies)
    assert [c["v"].dtype for c in acc.kept] == [torch.float16] * k  # kept compactly, in their own dtype
    first = bodies[0]["w"].clone()
    for body in bodies:
        body["w"].add_(100.0)  # a caller reusing its buffers after the fold changes nothing
    check_in_dtype(acc, oracle)
    if k == 1:
        assert torch.equal(acc.finish()["w"], first)  # the median of one is that body


@pytest.mark.parametrize("k,beta", [(5, 0.2), (5, 0.0), (4, 0.45), (10, 0.3), (3, 0.2)])
def test_trimmed_mean_matches_numpy_scipy_and_flower(k, beta):
    base, bodies = make(k)
    cut = int(beta * k)
    oracle = {key: np.sort(np.stack([np64(b[key]) for b in bodies]), axis=0)[cut:k - cut].mean(axis=0)
              for key in FLOATING}
    flower = aggregate_trimmed_avg([([np64(b[key]) for key in FLOATING], 1) for b in bodies], beta)
    for key, f in zip(FLOATING, flower):
        np.testing.assert_allclose(f, oracle[key], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(trim_mean(np.stack([np64(b[key]) for b in bodies]), beta, axis=0), oracle[key],
                                   rtol=1e-12, atol=1e-12)
    check_in_dtype(run(TrimmedMean(beta=beta), base, bodies), oracle, exact=False)


@pytest.mark.parametrize("chunk", [64, None])  # 64: a dozen coordinates per chunk; None: the real size
@pytest.mark.parametrize("k", [7, 6])
def test_median_and_trimmed_mean_over_many_chunks_with_ties_match_numpy(monkeypatch, chunk, k):
    # finish works in coordinate chunks (robust.CHUNK values at a time): every coordinate exactly once, a last
    # partial chunk included, whatever k; values on a coarse grid, so most coordinates have ties (and ties at
    # the cut of the trimmed mean), and a bfloat16 key numpy cannot read.
    import strategies.fusion.robust as robust

    if chunk is not None:
        monkeypatch.setattr(robust, "CHUNK", chunk)
    rows = robust.CHUNK // k
    n = 2 * rows + 5  # two full chunks and a partial one
    rng = np.random.default_rng(k)
    base = {"w": torch.zeros(n), "h": torch.zeros(7, dtype=torch.bfloat16), "ids": torch.arange(3)}
    bodies = [{"w": torch.tensor(rng.integers(-3, 4, size=n) / 4, dtype=torch.float32),
               "h": torch.tensor(rng.normal(size=7), dtype=torch.bfloat16), "ids": torch.arange(3) + i}
              for i in range(k)]
    stacks = {key: np.stack([b[key].double().numpy() for b in bodies]) for key in ("w", "h")}
    assert (np.diff(np.sort(stacks["w"], axis=0), axis=0) == 0).any(axis=0).mean() > 0.9  # ties everywhere
    check_in_dtype(run(Median(), base, bodies), {key: np.median(v, axis=0) for key, v in stacks.items()})
    for beta in (0.2, 0.3):
        check_in_dtype(run(TrimmedMean(beta=beta), base, bodies), {key: np_trimmed(v, beta)
                                                                   for key, v in stacks.items()}, exact=False)


@pytest.mark.parametrize("operator", ["median", "trimmed_mean"])
def test_robust_finish_needs_no_float64_copies_of_the_contributions(operator):
    # The memory bound, measured: a fresh process keeps k = 20 contributions of a 2M-value tensor (160 MB), then
    # finishes. Its peak resident set may grow by the fused tensor (8 MB) and a chunk buffer, not by the k-fold
    # float64 stack and sort of the whole tensor (3 x 320 MB), which it did before.
    code = f"""
import resource, torch
from strategies.fusion import build_operator
base = {{"w": torch.zeros(2_000_000)}}
acc = build_operator("{operator}").start(base, 1)
for i in range(20):
    acc.fold({{"w": torch.full((2_000_000,), float(i))}}, label=str(i))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fused = acc.finish()
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grew, float(fused["w"][0]), float(fused["w"][-1]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    grew_mb, first, last = int(out[0]) / 1024, float(out[1]), float(out[2])
    assert first == last == 9.5  # the median, and the trimmed mean (cut 4 of 20 at each end), of 0..19
    assert grew_mb < 64, f"finish grew the peak resident set by {grew_mb:.0f} MB"


@pytest.mark.parametrize("op", [Median(), TrimmedMean()])
def test_robust_refuses_weights(op):
    base, bodies = make(2)
    acc = op.start(base, 1)
    acc.fold(bodies[0], label="a", weight=1.0)
    with pytest.raises(FusionError, match=rf"contribution b: weight 2.0 .*'{op.name}'.*once"):
        acc.fold(bodies[1], label="b", weight=2.0)
    assert acc.count == 1 and len(acc.kept) == 1


# ---- all operators -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", [Ties(), Dare(), DareTies(), Median(), TrimmedMean()])
def test_integer_buffers_untouched_dtypes_kept(op):
    base, bodies = make()
    out = run(op, base, bodies).finish()
    assert torch.equal(out["ids"], base["ids"]) and out["ids"].dtype == torch.int64
    assert out["w"].dtype == torch.float32 and out["v"].dtype == torch.float16
    assert not torch.equal(out["w"], base["w"])  # something was fused


def test_names_streams_and_describe():
    assert [(o.name, o.streams) for o in (Ties(), Dare(), DareTies(), Median(), TrimmedMean())] == [
        ("ties", True), ("dare", True), ("dare_ties", True), ("median", False), ("trimmed_mean", False)]
    assert Ties().describe() == {"operator": "ties", "density": 0.2, "scale": 1.0}
    assert Dare().describe() == {"operator": "dare", "drop": 0.9, "scale": 1.0, "seed": 0}
    assert TrimmedMean().describe() == {"operator": "trimmed_mean", "beta": 0.2}


@pytest.mark.parametrize("cls,kwargs,key", [
    (Ties, {"density": 0.0}, "density"), (Ties, {"density": 1.5}, "density"), (Ties, {"density": True}, "density"),
    (Ties, {"scale": 0}, "scale"), (Dare, {"drop": 1.0}, "drop"), (Dare, {"drop": -0.1}, "drop"),
    (Dare, {"seed": 1.5}, "seed"), (Dare, {"scale": -1.0}, "scale"), (DareTies, {"drop": 1.0}, "drop"),
    (DareTies, {"seed": "0"}, "seed"), (TrimmedMean, {"beta": 0.5}, "beta"), (TrimmedMean, {"beta": -0.1}, "beta"),
])
def test_bad_parameters_refused_naming_the_key(cls, kwargs, key):
    with pytest.raises(FusionError, match=rf"config key 'fusion\.{key}' has invalid value"):
        cls(**kwargs)
