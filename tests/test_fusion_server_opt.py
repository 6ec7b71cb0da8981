"""Server optimizers (FedAvgM, Nesterov, FedAdam) against an independent numpy oracle, and their state."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from strategies.fusion.base import FusionError
from strategies.fusion.means import TaskArithmetic
from strategies.fusion.server_opt import FedAdam, FedAvgM, Nesterov

WEIGHTS = [1.0, 2.5, 0.5, 3.0]  # not all equal
EXAMPLES = [10, 1, 7, 3]  # ignored: the mean update weighs by the fold's weight only

CASES = [
    (FedAvgM, {}),
    (FedAvgM, {"server_lr": 1.3, "momentum": 0.7}),
    (Nesterov, {}),
    (Nesterov, {"server_lr": 0.5, "momentum": 0.6}),
    (FedAdam, {}),
    (FedAdam, {"server_lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-2}),
]
CASE_IDS = [f"{cls.name}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'defaults'}" for cls, p in CASES]


def make_base() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    return {
        "w": torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)),
        "b": torch.from_numpy(rng.normal(size=(5,)).astype(np.float16)),
        "pos": torch.arange(6, dtype=torch.int64),
    }


def make_rounds(base, n_rounds: int = 3, n_bodies: int = 4, seed: int = 1) -> list[list[dict[str, torch.Tensor]]]:
    """Bodies around the first base (absolute values, so the operator and the oracle each follow their own chain of
    bases from the same inputs); their integer buffers differ from the base's."""
    rng = np.random.default_rng(seed)
    rounds = []
    for _ in range(n_rounds):
        bodies = []
        for _ in range(n_bodies):
            scale = rng.uniform(0.05, 0.3)
            bodies.append({
                "w": torch.from_numpy((base["w"].numpy() + scale * rng.normal(size=(3, 4))).astype(np.float32)),
                "b": torch.from_numpy((base["b"].numpy() + scale * rng.normal(size=(5,))).astype(np.float16)),
                "pos": torch.from_numpy(rng.integers(100, 200, size=6)),
            })
        rounds.append(bodies)
    return rounds


def oracle(name: str, params: dict, base, rounds, weights) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """The update rules re-implemented in numpy float64: per round, the next base (in the base's dtypes) and the
    state (flat, ``"<slot>/<key>"``)."""
    p = {"fedavgm": {"server_lr": 1.0, "momentum": 0.9}, "nesterov": {"server_lr": 0.7, "momentum": 0.9},
         "fedadam": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}}[name] | params
    current = {k: v.numpy().copy() for k, v in base.items()}
    state: dict[str, np.ndarray] = {}
    history = []
    for bodies in rounds:
        ws = weights[:len(bodies)]
        nxt = {}
        for key, b in current.items():
            if not np.issubdtype(b.dtype, np.floating):
                nxt[key] = b.copy()
                continue
            b64 = b.astype(np.float64)
            delta = sum(w * (body[key].numpy().astype(np.float64) - b64) for body, w in zip(bodies, ws)) / sum(ws)
            zero = np.zeros_like(b64)
            if name == "fedavgm":
                v = p["momentum"] * state.get(f"momentum/{key}", zero) + delta
                state[f"momentum/{key}"] = v
                new = b64 + p["server_lr"] * v
            elif name == "nesterov":
                v = p["momentum"] * state.get(f"momentum/{key}", zero) + delta
                state[f"momentum/{key}"] = v
                new = b64 + p["server_lr"] * (delta + p["momentum"] * v)
            else:
                m = p["beta1"] * state.get(f"m/{key}", zero) + (1 - p["beta1"]) * delta
                v = p["beta2"] * state.get(f"v/{key}", zero) + (1 - p["beta2"]) * delta ** 2
                state[f"m/{key}"], state[f"v/{key}"] = m, v
                new = b64 + p["server_lr"] * m / (np.sqrt(v) + p["tau"])
            nxt[key] = new.astype(b.dtype)
        current = nxt
        history.append((nxt, dict(state)))
    return history


def run_round(op, base, bodies, weights=WEIGHTS, examples=EXAMPLES, server_round: int = 1):
    acc = op.start(base, server_round)
    for i, body in enumerate(bodies):
        acc.fold(body, label=f"c{i}", examples=examples[i], weight=weights[i])
    return acc.finish()


def assert_base_matches(actual: dict[str, torch.Tensor], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for key, e in expected.items():
        a = actual[key].numpy()
        assert a.dtype == e.dtype, key
        if np.issubdtype(e.dtype, np.floating):
            # the same float64 value up to summation order, then one rounding to the base's dtype
            np.testing.assert_array_max_ulp(a, e, maxulp=1)
        else:
            np.testing.assert_array_equal(a, e)


def assert_state_matches(actual: dict[str, torch.Tensor], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for key, e in expected.items():
        assert actual[key].dtype == torch.float64, key
        np.testing.assert_allclose(actual[key].numpy(), e, rtol=1e-10, atol=1e-15, err_msg=key)


@pytest.mark.parametrize(("cls", "params"), CASES, ids=CASE_IDS)
def test_matches_numpy_oracle_over_rounds(cls, params):
    base = make_base()
    rounds = make_rounds(base)
    expected = oracle(cls.name, params, base, rounds, WEIGHTS)
    op = cls(**params)
    current = base
    for r, (bodies, (exp_base, exp_state)) in enumerate(zip(rounds, expected), start=1):
        current = run_round(op, current, bodies, server_round=r)
        assert_base_matches(current, exp_base)
        assert_state_matches(op.state_dict(), exp_state)


@pytest.mark.parametrize(("cls", "params"), CASES, ids=CASE_IDS)
def test_one_contribution(cls, params):
    base = make_base()
    rounds = make_rounds(base, n_rounds=2, n_bodies=1, seed=2)
    expected = oracle(cls.name, params, base, rounds, [2.0])
    op = cls(**params)
    current = base
    for r, (bodies, (exp_base, exp_state)) in enumerate(zip(rounds, expected), start=1):
        current = run_round(op, current, bodies, weights=[2.0], examples=[5], server_round=r)
        assert_base_matches(current, exp_base)
        assert_state_matches(op.state_dict(), exp_state)


@pytest.mark.parametrize("cls", [FedAvgM, Nesterov, FedAdam])
def test_integer_buffers_untouched_and_dtypes_kept(cls):
    base = make_base()
    out = run_round(cls(), base, make_rounds(base)[0])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in base.items()}
    assert torch.equal(out["pos"], base["pos"])
    assert out["pos"] is not base["pos"]
    assert not torch.equal(out["w"], base["w"]) and not torch.equal(out["b"], base["b"])
    assert set(cls().state_dict()) == set()
    op = cls()
    run_round(op, base, make_rounds(base)[0])
    assert {k.partition("/")[2] for k in op.state_dict()} == {"w", "b"}  # floating keys only


@pytest.mark.parametrize(("cls", "key", "value"), [
    (FedAvgM, "server_lr", 0.0), (FedAvgM, "server_lr", -1.0), (FedAvgM, "server_lr", float("inf")),
    (FedAvgM, "server_lr", True), (FedAvgM, "server_lr", "1"),
    (FedAvgM, "momentum", 1.0), (FedAvgM, "momentum", -0.1), (FedAvgM, "momentum", float("nan")),
    (Nesterov, "server_lr", 0), (Nesterov, "momentum", 1.5), (Nesterov, "momentum", -1e-9),
    (FedAdam, "server_lr", 0.0), (FedAdam, "beta1", 1.0), (FedAdam, "beta1", -0.5),
    (FedAdam, "beta2", 1.0), (FedAdam, "beta2", -0.01), (FedAdam, "tau", 0.0), (FedAdam, "tau", -1e-3),
])
def test_parameters_out_of_range_are_refused(cls, key, value):
    with pytest.raises(FusionError, match=re.escape(f"config key 'fusion.{key}'")):
        cls(**{key: value})


@pytest.mark.parametrize(("cls", "params"), [
    (FedAvgM, {"momentum": 0.0, "server_lr": 2}), (Nesterov, {"momentum": 0, "server_lr": 1e-4}),
    (FedAdam, {"beta1": 0.0, "beta2": 0.0, "tau": 1e-12}),
])
def test_parameters_at_the_edges_are_accepted(cls, params):
    assert cls(**params).params() == cls().params() | params


@pytest.mark.parametrize(("cls", "params"), CASES, ids=CASE_IDS)
def test_restored_state_gives_bit_identical_round(cls, params):
    base = make_base()
    rounds = make_rounds(base)
    first = cls(**params)
    current = base
    for r, bodies in enumerate(rounds[:2], start=1):
        current = run_round(first, current, bodies, server_round=r)
    buffer = io.BytesIO()  # through a checkpoint's serialization
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = cls(**params)
    resumed.load_state_dict(torch.load(buffer))
    assert_equal_dicts(resumed.state_dict(), first.state_dict())

    out_first = run_round(first, current, rounds[2], server_round=3)
    out_resumed = run_round(resumed, current, rounds[2], server_round=3)
    assert_equal_dicts(out_resumed, out_first)
    assert_equal_dicts(resumed.state_dict(), first.state_dict())
    # the state is what made them equal: a fresh operator's third round differs
    out_fresh = run_round(cls(**params), current, rounds[2], server_round=3)
    assert not torch.equal(out_fresh["w"], out_first["w"])


def assert_equal_dicts(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("cls", [FedAvgM, Nesterov, FedAdam])
def test_round_that_does_not_fuse_leaves_state(cls):
    base = make_base()
    rounds = make_rounds(base)
    op = cls()
    after_one = run_round(op, base, rounds[0], server_round=1)
    saved = {k: v.clone() for k, v in op.state_dict().items()}

    with pytest.raises(FusionError, match="nothing to fuse"):
        op.start(after_one, 2).finish()
    abandoned = op.start(after_one, 2)  # folded but never finished: too few valid contributions
    for i, body in enumerate(rounds[1][:2]):
        abandoned.fold(body, label=f"c{i}", weight=WEIGHTS[i])
    assert_equal_dicts(op.state_dict(), saved)

    # and the next round that fuses goes on from round 1's state as if nothing happened in between
    reference = cls()
    run_round(reference, base, rounds[0], server_round=1)
    assert_equal_dicts(run_round(op, after_one, rounds[1], server_round=2),
                       run_round(reference, after_one, rounds[1], server_round=2))


@pytest.mark.parametrize("cls", [FedAvgM, Nesterov, FedAdam])
def test_finishing_twice_takes_one_step(cls):
    base = make_base()
    op = cls()
    acc = op.start(base, 1)
    for i, body in enumerate(make_rounds(base)[0]):
        acc.fold(body, label=f"c{i}", weight=WEIGHTS[i])
    out = acc.finish()
    state = op.state_dict()
    assert_equal_dicts(acc.finish(), out)
    assert_equal_dicts(op.state_dict(), state)


def trained(cls):
    base = make_base()
    op = cls()
    run_round(op, base, make_rounds(base)[0])
    return op, base


@pytest.mark.parametrize(("cls", "mutate", "named"), [
    (FedAvgM, lambda s: s | {"velocity/w": s["momentum/w"]}, "velocity/w"),
    (FedAvgM, lambda s: s | {"momentum/": s["momentum/w"]}, "momentum/"),
    (FedAvgM, lambda s: s | {"momentum/w": s["momentum/w"].float()}, "momentum/w"),
    (FedAvgM, lambda s: s | {"momentum/w": s["momentum/w"].numpy()}, "momentum/w"),
    (FedAdam, lambda s: {k: v for k, v in s.items() if k != "v/b"}, "v/b"),
    (FedAdam, lambda s: {k: v for k, v in s.items() if k != "m/w"}, "m/w"),
    (FedAdam, lambda s: s | {"v/w": torch.zeros(4, 3, dtype=torch.float64)}, "v/w"),
])
def test_malformed_state_is_refused_on_load(cls, mutate, named):
    op, _ = trained(cls)
    saved = op.state_dict()
    with pytest.raises(FusionError, match=re.escape(f"'{named}'")):
        op.load_state_dict(mutate(saved))
    assert_equal_dicts(op.state_dict(), saved)  # a refused load keeps the state it had


@pytest.mark.parametrize(("cls", "mutate", "named"), [
    (FedAvgM, lambda s: s | {"momentum/w": torch.zeros(4, 3, dtype=torch.float64)}, "momentum/w"),
    (Nesterov, lambda s: s | {"momentum/b": torch.zeros(6, dtype=torch.float64)}, "momentum/b"),
    (FedAdam, lambda s: s | {"m/w": torch.zeros(2, 6, dtype=torch.float64),
                             "v/w": torch.zeros(2, 6, dtype=torch.float64)}, "m/w"),
    (FedAvgM, lambda s: s | {"momentum/pos": torch.zeros(6, dtype=torch.float64)}, "momentum/pos"),
    (FedAdam, lambda s: s | {"m/gone": torch.zeros(2, dtype=torch.float64),
                             "v/gone": torch.zeros(2, dtype=torch.float64)}, "m/gone"),
    (Nesterov, lambda s: {k: v for k, v in s.items() if not k.endswith("/b")}, "momentum/b"),
])
def test_state_not_matching_the_base_is_refused(cls, mutate, named):
    op, base = trained(cls)
    op.load_state_dict(mutate(op.state_dict()))
    with pytest.raises(FusionError, match=re.escape(f"'{named}'")):
        op.start(base, 2)


@pytest.mark.parametrize("cls", [FedAvgM, Nesterov, FedAdam])
def test_empty_state_means_no_state_yet(cls):
    op, base = trained(cls)
    assert op.state_dict()
    op.load_state_dict({})
    assert op.state_dict() == {}
    bodies = make_rounds(base, seed=3)[0]
    assert_equal_dicts(run_round(op, base, bodies), run_round(cls(), base, bodies))


def test_fedavgm_without_momentum_is_task_arithmetic():
    base = make_base() | {"d": torch.linspace(-1, 1, 7, dtype=torch.float64)}
    rounds = make_rounds(base)
    rng = np.random.default_rng(4)
    for bodies in rounds:
        for body in bodies:
            body["d"] = base["d"] + torch.from_numpy(rng.normal(size=7))
    op, ta = FedAvgM(server_lr=1.0, momentum=0.0), TaskArithmetic(scale=1.0)
    current = base
    for r, bodies in enumerate(rounds, start=1):
        out, expected = run_round(op, current, bodies, server_round=r), run_round(ta, current, bodies, server_round=r)
        for key, e in expected.items():
            assert out[key].dtype == e.dtype
            tol = torch.finfo(torch.float64).eps if e.is_floating_point() else 0.0
            torch.testing.assert_close(out[key], e, rtol=4 * tol, atol=4 * tol)
        current = out


@pytest.mark.parametrize(("cls", "params"), CASES, ids=CASE_IDS)
def test_describe_lists_parameters_not_state(cls, params):
    op = cls(**params)
    base = make_base()
    run_round(op, base, make_rounds(base)[0])
    assert op.describe() == {"operator": cls.name, **(cls().params() | params)}
    assert all(isinstance(v, float) for v in op.params().values())


def test_names_and_streaming():
    assert [(c.name, c.streams) for c in (FedAvgM, Nesterov, FedAdam)] == [
        ("fedavgm", True), ("nesterov", True), ("fedadam", True)]
    assert FedAvgM().params() == {"server_lr": 1.0, "momentum": 0.9}
    assert Nesterov().params() == {"server_lr": 0.7, "momentum": 0.9}
    assert FedAdam().params() == {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
