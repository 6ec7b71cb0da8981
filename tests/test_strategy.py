"""The ColD Fusion strategy end to end over an in-process Grid with the real ClientApp."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MessageType

from app.client_app import app as client_app
from app.model import initial_body
from app.server_app import round_configs
from strategies.coldfusion import (
    ColdFusion,
    FederationError,
    NodeTask,
    check_consistent_tasks,
    wait_for_nodes,
)
from strategies.fusion import uniform_mean
from tasks.spec import TaskInfo
from tests.conftest import model_json
from tests.inprocess import InProcessGrid


def _configs(cfg):
    return round_configs(cfg, model_json(cfg))


def _run(cfg, pool, tiny_path, client=client_app, rounds=2, node_id_step=1, **kwargs):
    grid = InProcessGrid(client, [{"partition-id": i, "num-partitions": len(pool)} for i in range(len(pool))],
                         node_id_step=node_id_step)
    records = []
    kwargs = {"contributors_per_round": 4, **kwargs}
    strategy = ColdFusion(pool=pool, seed=0, node_wait_timeout=5,
                          on_round=lambda record, arrays: records.append(record), **kwargs)
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
    # the final base is exactly the uniform mean of round 2's returned bodies
    round2 = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN][-4:]
    expected = uniform_mean([r.content["arrays"].to_torch_state_dict() for r in round2])
    final = result.arrays.to_torch_state_dict()
    assert all(torch.allclose(final[k], expected[k]) for k in expected)
    assert any(not torch.equal(final[k], start.to_torch_state_dict()[k]) for k in final)
    # only contributing nodes ever received a train message
    trained = {strategy.nodes[m.metadata.dst_node_id].name for m in grid.sent
               if m.metadata.message_type == MessageType.TRAIN}
    assert trained and not trained & heldout


def test_sampling_is_seeded(tiny_cfg, small_pool, tiny_path):
    _, _, first, _, _ = _run(tiny_cfg, small_pool, tiny_path, rounds=1)
    # a new run: other node ids, in another order; the seed must still pick the same tasks
    _, _, second, _, _ = _run(tiny_cfg, small_pool, tiny_path, rounds=1, node_id_step=-1)
    assert first[1].contributors == second[1].contributors


def _failing_client(names):
    def client(message, context):

        if message.metadata.message_type == MessageType.TRAIN:
            task = json.loads(str(message.content["config"]["task-entry"]))["name"]
            if task in names:
                return Message(error=Error(code=0, reason=f"injected failure on {task}"), reply_to=message)
        return client_app(message, context)
    return client


def test_error_replies_are_skipped_and_counted(tiny_cfg, small_pool, tiny_path):
    contributing = [e["name"] for e in small_pool if e["role"] == "contributing"]
    _, _, records, _, _ = _run(tiny_cfg, small_pool, tiny_path, client=_failing_client(set(contributing[::2])), rounds=2)
    failures = [f for r in records for f in r.failures]
    assert failures and all("injected failure" in f for f in failures)
    for record in records[1:]:
        assert len(record.train_loss) + len(record.failures) == len(record.contributors)


def test_too_few_valid_contributions_keep_the_previous_base(tiny_cfg, small_pool, tiny_path):
    everyone = {e["name"] for e in small_pool}
    _, _, records, start, result = _run(tiny_cfg, small_pool, tiny_path, client=_failing_client(everyone), rounds=1)
    assert not records[1].fused and len(records[1].failures) == 4
    final, initial = result.arrays.to_torch_state_dict(), start.to_torch_state_dict()
    assert all(torch.equal(final[k], initial[k]) for k in initial)


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
    from app.model import body_signature

    grid = InProcessGrid(client_app, [{"partition-id": i} for i in range(len(small_pool))])
    query = {"model": model_json(tiny_cfg)}
    good = ColdFusion(pool=small_pool, query_config=query, body_signature=body_signature(initial_body(tiny_path)))
    assert len(good.discover(grid, timeout=60)) == len(small_pool)
    stale = ColdFusion(pool=small_pool, query_config=query, body_signature="0123456789abcdef")
    with pytest.raises(FederationError, match=r"its model's body does not match the server's"):
        stale.discover(grid, timeout=60)


def test_backtracking_rolls_back_a_round_that_hurts_the_monitored_score(tiny_cfg, small_pool, tiny_path):
    from flwr.app import MetricRecord, RecordDict

    def harmed(message, context):  # the base after round 1 scores 0 everywhere: a harmful round
        if message.metadata.message_type == MessageType.EVALUATE and int(message.content["config"]["server-round"]):
            metrics = MetricRecord({"probe.accuracy": 0.0, "probe.macro_f1": 0.0, "num-examples": 1})
            return Message(content=RecordDict({"metrics": metrics}), reply_to=message)
        return client_app(message, context)

    grid, strategy, records, start, result = _run(tiny_cfg, small_pool, tiny_path, client=harmed, rounds=1,
                                                  backtrack_threshold=0.05, backtrack_monitor="heldout")
    assert records[1].fused and records[1].rolled_back and len(records[1].contributors) == 4
    final, initial = result.arrays.to_torch_state_dict(), start.to_torch_state_dict()
    assert all(torch.equal(final[k], initial[k]) for k in initial)
    # without back-tracking the same round's fusion stands
    _, _, records, _, result = _run(tiny_cfg, small_pool, tiny_path, client=harmed, rounds=1)
    assert not records[1].rolled_back
    assert any(not torch.equal(result.arrays.to_torch_state_dict()[k], initial[k]) for k in initial)
