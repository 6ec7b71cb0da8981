"""The ColD Fusion strategy end to end over an in-process Grid with the real ClientApp."""

import json
import re

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType

from app.client_app import app as client_app
from app.learning.model import initial_body
from app.run.server import round_configs
from strategies.coldfusion import ColdFusion
from strategies.discovery import FederationError, NodeTask, check_consistent_tasks, wait_for_nodes
from tasks.spec import TaskInfo
from tests.conftest import model_json
from tests.inprocess import InProcessGrid


def assert_uniform_mean(fused, bodies) -> None:
    """``fused`` is the plain (unweighted) mean of ``bodies``, key by key: a float64 numpy oracle."""
    assert set(fused) == set(bodies[0])
    for key, tensor in fused.items():
        oracle = np.mean([b[key].numpy().astype(np.float64) for b in bodies], axis=0)
        np.testing.assert_allclose(tensor.numpy().astype(np.float64), oracle, rtol=1e-6, atol=1e-7, err_msg=key)


def assert_same_body(a, b) -> None:
    """Bit for bit: same keys, same dtypes, same values."""
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _task(message) -> str:
    return json.loads(str(message.content["config"]["task-entry"]))["name"]


def _train_bodies(grid, server_round: int) -> dict[str, dict]:
    """Task -> the body its node sent back in ``server_round`` (error replies left out)."""
    sent = {m.metadata.message_id: m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN}
    out = {}
    for reply in grid.replies:
        message = sent.get(reply.metadata.reply_to_message_id)
        if message is not None and int(message.content["config"]["server-round"]) == server_round \
                and not reply.has_error():
            out[_task(message)] = reply.content["arrays"].to_torch_state_dict()
    return out


def _configs(cfg):
    return round_configs(cfg, model_json(cfg))


def _run(cfg, pool, tiny_path, client=client_app, rounds=2, node_id_step=1, arrival="sent", **kwargs):
    grid = InProcessGrid(client, [{"partition-id": i, "num-partitions": len(pool)} for i in range(len(pool))],
                         node_id_step=node_id_step, arrival=arrival)
    records = []
    grid.bases = []  # the base standing after each round, as on_round is given it (round 0: the start body)
    kwargs = {"contributors_per_round": 4, **kwargs}
    strategy = ColdFusion(pool=pool, seed=0, node_wait_timeout=5,
                          on_round=lambda record, arrays: (records.append(record),
                                                           grid.bases.append(arrays.to_torch_state_dict())), **kwargs)
    train, evaluate = _configs(cfg)
    start = ArrayRecord(initial_body(tiny_path))
    result = strategy.start(grid, start, num_rounds=rounds, timeout=60, train_config=train, evaluate_config=evaluate)
    return grid, strategy, records, start, result


def test_rounds_sample_contributors_fuse_uniformly_and_evaluate_everyone(tiny_cfg, small_pool, tiny_path):
    grid, strategy, records, start, result = _run(tiny_cfg, small_pool, tiny_path)
    pool = small_pool
    heldout = {e["name"] for e in pool if e["role"] == "heldout"}
    assert [r.round for r in records] == [0, 1, 2]
    assert records[0].contributors == [] and records[0].probe_heldout is not None
    for record in records[1:]:
        assert len(record.contributors) == 4 == len(set(record.contributors))
        assert not heldout & set(record.contributors), "a held-out task was trained on"
        assert record.fused and not record.failures
        assert set(record.probe) == {e["name"] for e in pool}  # every node evaluated, every round
    # the final base is the uniform mean of round 2's returned bodies, computed independently in numpy
    round2 = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN][-4:]
    final = result.arrays.to_torch_state_dict()
    assert_uniform_mean(final, [r.content["arrays"].to_torch_state_dict() for r in round2])
    assert any(not torch.equal(final[k], start.to_torch_state_dict()[k]) for k in final)
    # bytes on the wire: the body to each of 4 contributors and back, to every node for evaluation, nothing back
    tensor_bytes = sum(t.numel() * t.element_size() for t in start.to_torch_state_dict().values())
    body_bytes = ArrayRecord(start.to_torch_state_dict()).count_bytes()  # Flower's serialised size
    assert tensor_bytes <= body_bytes < 1.1 * tensor_bytes
    assert [(r.bytes_train_sent, r.bytes_train_received) for r in records] == [(0, 0)] + [(4 * body_bytes,) * 2] * 2
    assert all((r.bytes_eval_sent, r.bytes_eval_received) == (len(pool) * body_bytes, 0) for r in records)
    # only contributing nodes ever received a train message
    trained = {strategy.nodes[m.metadata.dst_node_id].name for m in grid.sent
               if m.metadata.message_type == MessageType.TRAIN}
    assert trained and not trained & heldout


def test_replies_arriving_in_another_order_give_the_same_base_and_records(tiny_cfg, small_pool, tiny_path, caplog):
    """The strategy folds each reply as it arrives (strategies/intake.py) yet in a canonical order: the last
    contributor answering first changes nothing, bit for bit."""
    runs = [_run(tiny_cfg, small_pool, tiny_path, arrival=arrival, poll_s=0.0, progress_s=0.0,
                 eval_schedule={"probe": None}) for arrival in ("sent", "reversed")]
    # while replies are pending, progress lines: the reversed run waits three polls per training round
    assert re.search(r"Round 2 training: 1/4 replied \(0 failed or rejected, [01] waiting on disk\), 3 pending",
                     caplog.text)
    (_, _, records_a, _, result_a), (grid_b, _, records_b, _, result_b) = runs
    final_a, final_b = result_a.arrays.to_torch_state_dict(), result_b.arrays.to_torch_state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    strip = ("seconds_train", "seconds_eval")
    assert [{k: v for k, v in vars(r).items() if k not in strip} for r in records_a] == \
           [{k: v for k, v in vars(r).items() if k not in strip} for r in records_b]
    # the reversed run really took its replies in another order: the last sent first
    train = [m.metadata.message_id for m in grid_b.sent if m.metadata.message_type == MessageType.TRAIN][-4:]
    assert [r.metadata.reply_to_message_id for r in grid_b.pulled
            if r.metadata.reply_to_message_id in train] == train[::-1]
    assert records_b[2].fused_contributors == sorted(records_b[2].fused_contributors)


def test_an_all_contributions_operator_fuses_the_round_by_its_rule(tiny_cfg, small_pool, tiny_path):
    grid, strategy, records, start, result = _run(tiny_cfg, small_pool, tiny_path, rounds=1,
                                                  fusion={"operator": "median"})
    assert records[1].fused and records[1].fusion == {"operator": "median"}
    bodies = [r.content["arrays"].to_torch_state_dict() for r in grid.replies
              if r.metadata.message_type == MessageType.TRAIN]
    final = result.arrays.to_torch_state_dict()
    assert len(bodies) == 4
    for key, tensor in final.items():  # the coordinate-wise median, computed independently in numpy
        if tensor.is_floating_point():
            oracle = np.median([b[key].numpy().astype(np.float64) for b in bodies], axis=0)
            np.testing.assert_allclose(tensor.numpy().astype(np.float64), oracle, rtol=1e-6, atol=1e-7, err_msg=key)


def test_sampling_is_seeded(tiny_cfg, small_pool, tiny_path):
    _, _, first, _, _ = _run(tiny_cfg, small_pool, tiny_path, rounds=1)
    # a new run: other node ids, in another order; the seed must still pick the same tasks
    _, _, second, _, _ = _run(tiny_cfg, small_pool, tiny_path, rounds=1, node_id_step=-1)
    assert first[1].contributors == second[1].contributors


def _failing_client(names, rounds=None):
    """The real ClientApp, except that the train messages of tasks in ``names`` (in ``rounds``; None: every round)
    get an error reply."""
    def client(message, context):
        if message.metadata.message_type == MessageType.TRAIN:
            task = _task(message)
            if task in names and (rounds is None or int(message.content["config"]["server-round"]) in rounds):
                return Message(error=Error(code=0, reason=f"injected failure on {task}"), reply_to=message)
        return client_app(message, context)
    return client


def test_error_replies_are_skipped_and_the_base_is_the_mean_of_the_others(tiny_cfg, small_pool, tiny_path):
    contributing = [e["name"] for e in small_pool if e["role"] == "contributing"]
    failing = set(contributing[::2])  # 3 of 6: each round of 4 has at least one failing and one working task
    grid, _, records, _, _ = _run(tiny_cfg, small_pool, tiny_path, client=_failing_client(failing), rounds=2,
                                  eval_schedule={"probe": None})
    for record in records[1:]:
        failed, working = sorted(set(record.contributors) & failing), sorted(set(record.contributors) - failing)
        assert failed and working
        assert record.failures == [f"{t}: error reply: injected failure on {t}" for t in failed]
        assert record.fused and record.fused_contributors == working and set(record.train_loss) == set(working)
        bodies = _train_bodies(grid, record.round)
        assert sorted(bodies) == working
        assert_uniform_mean(grid.bases[record.round], list(bodies.values()))  # the failed ones count for nothing


def test_the_base_is_the_mean_of_exactly_the_contributions_that_pass_validation(tiny_cfg, small_pool, tiny_path):
    """Every contributing task trains; one sends NaN in one tensor, one an update 100x what it trained. The base
    must be the numpy mean of the four honest bodies: neither rejected body counts, not even partly."""
    contributing = sorted(e["name"] for e in small_pool if e["role"] == "contributing")
    nan_task, scaled_task = contributing[1], contributing[4]
    key = "encoder.layer.1.attention.self.query.weight"

    def corrupting(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type == MessageType.TRAIN and _task(message) in (nan_task, scaled_task):
            received = message.content["arrays"].to_torch_state_dict()
            body = reply.content["arrays"].to_torch_state_dict()
            if _task(message) == nan_task:
                body[key] = torch.full_like(body[key], float("nan"))
            else:
                body = {k: received[k] + 100 * (v - received[k]) if v.is_floating_point() else v
                        for k, v in body.items()}
            reply.content["arrays"] = ArrayRecord(body)
        return reply

    grid, _, records, start, result = _run(tiny_cfg, small_pool, tiny_path, client=corrupting, rounds=1,
                                           contributors_per_round=None, max_relative_norm=5.0,
                                           eval_schedule={"probe": None})
    record, honest = records[1], sorted(set(contributing) - {nan_task, scaled_task})
    assert sorted(record.contributors) == contributing and not record.failures
    reasons = {line.split(" (node")[0]: line for line in record.rejections}
    assert set(reasons) == {nan_task, scaled_task}, record.rejections
    assert "contains non-finite values" in reasons[nan_task] and "x the reference norm" in reasons[scaled_task]
    assert record.fused and record.fused_contributors == honest
    bodies = _train_bodies(grid, 1)
    final = result.arrays.to_torch_state_dict()
    assert_uniform_mean(final, [bodies[t] for t in honest])
    # the oracle tells the two apart: the mean with the scaled body in it is far from the base
    with_scaled = np.mean([bodies[t][key].numpy().astype(np.float64) for t in honest + [scaled_task]], axis=0)
    assert np.abs(final[key].numpy() - with_scaled).max() > 1e-3


def test_a_round_under_min_contributions_keeps_the_previous_base_bit_for_bit(tiny_cfg, small_pool, tiny_path):
    """Round 1 fuses; in round 2 two of the four contributors fail, so 2 valid < min_contributions=3: the base
    after round 2 is round 1's, bit for bit (not the start body, not a mean of the two)."""
    failed_in_round_2 = []

    def half_failing(message, context):
        if message.metadata.message_type == MessageType.TRAIN and int(message.content["config"]["server-round"]) == 2 \
                and len(failed_in_round_2) < 2:
            failed_in_round_2.append(_task(message))
            return Message(error=Error(code=0, reason="injected failure"), reply_to=message)
        return client_app(message, context)

    grid, _, records, start, result = _run(tiny_cfg, small_pool, tiny_path, client=half_failing, rounds=2,
                                           min_contributions=3, eval_schedule={"probe": None})
    assert records[1].fused and records[1].base_round == 1
    assert_uniform_mean(grid.bases[1], list(_train_bodies(grid, 1).values()))
    assert any(not torch.equal(grid.bases[1][k], start.to_torch_state_dict()[k]) for k in grid.bases[1])
    assert not records[2].fused and len(records[2].failures) == 2 and len(_train_bodies(grid, 2)) == 2
    assert records[2].base_round == 1 and records[2].fused_contributors == []
    assert_same_body(grid.bases[2], grid.bases[1])
    assert_same_body(result.arrays.to_torch_state_dict(), grid.bases[1])


def test_too_few_valid_contributions_keep_the_previous_base(tiny_cfg, small_pool, tiny_path):
    everyone = {e["name"] for e in small_pool}
    _, _, records, start, result = _run(tiny_cfg, small_pool, tiny_path, client=_failing_client(everyone), rounds=1,
                                        eval_schedule={"probe": None})
    assert not records[1].fused and len(records[1].failures) == 4
    assert_same_body(result.arrays.to_torch_state_dict(), start.to_torch_state_dict())


def test_a_rolled_back_round_keeps_the_previous_base_bit_for_bit(tiny_cfg, small_pool, tiny_path, monkeypatch):
    """The strategy's side of back-tracking, whatever the rule reads: when the rule undoes round 2, the base after
    it is round 1's bit for bit, and the record says so; round 1's, which stood, is the mean of its bodies."""
    from strategies.backtrack import Backtracking

    monkeypatch.setattr(Backtracking, "judge", lambda self, record: (0.6, 0.1) if record.round == 2 else None)
    grid, _, records, start, result = _run(tiny_cfg, small_pool, tiny_path, rounds=2, eval_schedule={"probe": None})
    assert [r.rolled_back for r in records] == [False, False, True] and records[2].fused
    assert [r.base_round for r in records] == [0, 1, 1]
    assert_uniform_mean(grid.bases[1], list(_train_bodies(grid, 1).values()))
    assert_same_body(grid.bases[2], grid.bases[1])
    assert_same_body(result.arrays.to_torch_state_dict(), grid.bases[1])
    # what was undone was a real fusion: round 2's mean differs from round 1's base
    undone = np.mean([b["embeddings.word_embeddings.weight"].numpy() for b in _train_bodies(grid, 2).values()], axis=0)
    assert np.abs(undone - grid.bases[1]["embeddings.word_embeddings.weight"].numpy()).max() > 1e-6


def test_waiting_for_nodes_times_out_with_a_clear_message():
    grid = InProcessGrid(client_app, [{"partition-id": 0}])
    with pytest.raises(FederationError, match=r"only 1 of the 3 expected nodes connected within 0s"):
        wait_for_nodes(grid, expected=3, timeout=0.2, poll=0.05)


def test_conflicting_task_definitions_are_refused():
    a = NodeTask(1, "t", "contributing", TaskInfo("t", 2, False, ("a", "b")), "{}")
    b = NodeTask(2, "t", "contributing", TaskInfo("t", 3, False, ("a", "b", "c")), "{}")
    with pytest.raises(FederationError, match="incompatible definitions of task 't'"):
        check_consistent_tasks([a, b])
    check_consistent_tasks([a, NodeTask(3, "t", "contributing", a.info, "{}")])


def test_nodes_whose_model_does_not_fit_the_server_body_are_refused(tiny_cfg, small_pool, tiny_path):
    from app.learning.model import body_signature

    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(len(small_pool))])
    query = {"model": model_json(tiny_cfg)}
    good = ColdFusion(pool=small_pool, query_config=query, body_signature=body_signature(initial_body(tiny_path)))
    assert len(good.discover(grid, timeout=60)) == len(small_pool)
    stale = ColdFusion(pool=small_pool, query_config=query, body_signature="0123456789abcdef")
    with pytest.raises(FederationError, match=r"its model's body does not match the server's"):
        stale.discover(grid, timeout=60)


def test_backtracking_rolls_back_a_round_that_hurts_the_monitored_score(tiny_cfg, small_pool, tiny_path):
    from flwr.app import MetricRecord, RecordDict

    def harmed(message, context):  # the base after round 1 scores 0 everywhere, dev rows too: a harmful round
        if message.metadata.message_type == MessageType.EVALUATE and int(message.content["config"]["server-round"]):
            metrics = MetricRecord({"probe.accuracy": 0.0, "probe.macro_f1": 0.0, "probe.dev_accuracy": 0.0,
                                    "probe.dev_macro_f1": 0.0, "num-examples": 1})
            return Message(content=RecordDict({"metrics": metrics}), reply_to=message)
        return client_app(message, context)

    # the rule reads the contributing tasks' dev probe (strategies/backtrack.py): round 0's real one, then 0
    grid, strategy, records, start, result = _run(tiny_cfg, small_pool, tiny_path, client=harmed, rounds=1,
                                                  backtrack_threshold=0.05)
    assert records[1].fused and records[1].rolled_back and len(records[1].contributors) == 4
    final, initial = result.arrays.to_torch_state_dict(), start.to_torch_state_dict()
    assert all(torch.equal(final[k], initial[k]) for k in initial)
    # without back-tracking the same round's fusion stands
    _, _, records, _, result = _run(tiny_cfg, small_pool, tiny_path, client=harmed, rounds=1)
    assert not records[1].rolled_back
    assert any(not torch.equal(result.arrays.to_torch_state_dict()[k], initial[k]) for k in initial)


def test_fusion_is_uniform_whatever_the_example_counts(tiny_cfg, small_pool, tiny_path):
    """The paper's fusion counts every contributor once; FedAvg would weight by num-examples. The replies here say
    1, 10, 100 and 1000 examples: the base must be the plain mean, which differs from the weighted one."""
    counts = iter([1, 10, 100, 1000])

    def uneven(message, context):
        reply = client_app(message, context)
        if message.metadata.message_type == MessageType.TRAIN:
            reply.content["metrics"]["num-examples"] = next(counts)
        return reply

    grid, _, records, _, result = _run(tiny_cfg, small_pool, tiny_path, client=uneven, rounds=1,
                                       eval_schedule={"probe": None})
    replies = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN]
    assert len(replies) == 4 and records[1].fused and len(records[1].fused_contributors) == 4
    assert sorted(r.content["metrics"]["num-examples"] for r in replies) == [1, 10, 100, 1000]
    bodies = [r.content["arrays"].to_torch_state_dict() for r in replies]
    final = result.arrays.to_torch_state_dict()
    assert_uniform_mean(final, bodies)
    weights = np.array([r.content["metrics"]["num-examples"] for r in replies], dtype=np.float64)
    key = "encoder.layer.0.attention.self.query.weight"
    weighted = np.average([b[key].numpy().astype(np.float64) for b in bodies], axis=0, weights=weights)
    assert np.abs(final[key].numpy() - weighted).max() > 1e-4, "the oracle cannot tell the two means apart"
