"""The round record schema (strategies/records.py): one typed definition, versioned, older versions upgraded."""

import json

import pytest

from app.run.outputs import json_line
from strategies.backtrack import Backtracking
from strategies.records import (SCHEMA_VERSION, RecordError, RoundRecord, fused_norms, monitored_score, read_records,
                                saved_model_record)


def test_a_record_round_trips_through_its_json_line():
    record = RoundRecord(3, contributors=["a", "b"], fused_contributors=["a"], train_loss={"a": 0.5}, fused=True,
                         base_round=3, roles={"a": "contributing", "s": "heldout"}, regression=["s"],
                         probe={"a": 0.75, "s": 0.2}, probe_contributing=0.75,
                         scores={"probe": {"a": {"accuracy": 0.75}, "s": {"pearson": 0.2}}})
    line = json_line(record.to_dict())
    assert json.loads(line)["schema"] == SCHEMA_VERSION
    assert read_records([json.loads(line)]) == [record]


def test_version_1_records_are_upgraded():
    # As written before the schema was versioned: no `schema`, no `base_round`, no `regression`.
    v1 = [{"round": 0, "probe": {"a": 0.5}},
          {"round": 1, "fused": True, "probe": {"a": 0.6}},
          {"round": 2, "fused": True, "rolled_back": True, "probe": {"a": 0.1}},
          {"round": 3, "fused": False, "scores": {"probe": {"a": {"accuracy": 0.6}, "s": {"pearson": 0.3}}}}]
    records = read_records(v1)
    assert [r.base_round for r in records] == [0, 1, 1, 1]  # a rolled-back or unfused round keeps the base
    assert records[3].regression == ["s"] and records[0].regression == []
    assert [r.fusion for r in records] == [{}, {"operator": "uniform_mean"}, {"operator": "uniform_mean"}, {}]
    assert records[1].bytes_train_sent is None and RoundRecord(1).bytes_train_sent == 0  # not counted, vs none sent
    assert all(r.schema == SCHEMA_VERSION for r in records)
    # later version-1 files recorded base_round already: it is kept as written
    assert read_records([{"round": 4, "fused": True, "base_round": 2}])[0].base_round == 2


def test_a_newer_or_unknown_record_is_refused_naming_the_round():
    with pytest.raises(RecordError, match=rf"round 5: record schema {SCHEMA_VERSION + 1} is newer"):
        read_records([{"round": 5, "schema": SCHEMA_VERSION + 1}])
    with pytest.raises(RecordError, match=r"round 2: unknown record field\(s\) \['surprise'\]"):
        read_records([{"round": 2, "schema": SCHEMA_VERSION, "surprise": 1}])
    with pytest.raises(RecordError, match=r"record 1: expected an object with an integer 'round'"):
        read_records([{"round": "1"}])


def test_the_saved_model_record_skips_rounds_that_were_rolled_back():
    records = read_records([
        {"round": 0, "probe": {"a": 0.5}},
        {"round": 1, "fused": True, "base_round": 1, "probe": {"a": 0.7}},
        {"round": 2, "fused": True, "rolled_back": True, "base_round": 1, "probe": {"a": 0.2}},
        {"round": 3, "fused": False, "base_round": 1},  # the probe was not due
    ])
    assert saved_model_record(records, "probe").round == 1  # the latest round that scored the saved base
    assert saved_model_record(records, "finetune") is None  # no round scored it in that series


# ------------------------------------------------------------------------------- decisions read dev rows, never test

def _scored(round_: int, test: float, dev: float, **fields) -> RoundRecord:
    """A record as the strategy fills it: every task of a role scored ``test`` on test rows and ``dev`` on dev."""
    record = RoundRecord(round_, roles={"a": "contributing", "b": "contributing", "u": "heldout"}, **fields)
    metrics = {"accuracy": test, "macro_f1": test, "dev_accuracy": dev, "dev_macro_f1": dev,
               "mean_pool_accuracy": test / 2, "dev_mean_pool_accuracy": dev / 2}
    record.scores = {"probe": {t: dict(metrics) for t in record.roles}}
    record.summarise_scores(set())
    return record


def test_a_record_holds_each_series_dev_means_beside_its_test_means():
    record = RoundRecord(1, roles={"a": "contributing", "b": "contributing", "u": "heldout", "r": "contributing"},
                         scores={"probe": {"a": {"accuracy": 0.9, "dev_accuracy": 0.6, "mean_pool_accuracy": 0.5,
                                                 "dev_mean_pool_accuracy": 0.3},
                                           "b": {"accuracy": 0.7, "dev_accuracy": 0.4},
                                           "u": {"accuracy": 0.2, "dev_accuracy": 0.8},
                                           "r": {"pearson": 0.1, "dev_pearson": 0.99}},  # regression: not in means
                                 "finetune": {"u": {"accuracy": 0.5, "dev_accuracy": 0.25}}})
    record.summarise_scores({"r"})
    assert record.probe_contributing == pytest.approx(0.8) and record.probe_heldout == pytest.approx(0.2)  # test
    assert record.dev == {"probe": {"contributing": pytest.approx(0.5), "heldout": 0.8},
                          "probe_mean_pool": {"contributing": 0.3, "heldout": None},
                          "finetune": {"contributing": None, "heldout": 0.25}}
    assert record.dev_mean("probe", "contributing") == pytest.approx(0.5) and record.dev_mean("finetune", "x") is None
    assert read_records([json.loads(json_line(record.to_dict()))]) == [record]


def test_version_3_records_read_with_no_dev_scores_and_set_no_back_tracking_reference():
    v3 = [{"round": 0, "schema": 3, "roles": {"a": "contributing"}, "probe": {"a": 0.5}, "probe_contributing": 0.5}]
    records = read_records(v3)
    assert records[0].schema == SCHEMA_VERSION == 4 and records[0].dev == {}
    assert monitored_score(records, "contributing") is None  # a test score is never a decision's reference


def test_the_back_tracking_reference_is_the_last_standing_dev_score_never_a_test_score():
    history = [_scored(0, test=0.5, dev=0.5), _scored(1, test=0.9, dev=0.6),
               _scored(2, test=0.1, dev=0.2, rolled_back=True), _scored(3, test=0.0, dev=0.55)]
    assert monitored_score(history, "contributing") == 0.55
    assert monitored_score(history[:3], "contributing") == 0.6  # not the undone 0.2, nor any test score


def test_back_tracking_follows_the_dev_score_when_the_test_score_says_otherwise():
    rule = Backtracking(threshold=0.05)
    rule.resume([_scored(0, test=0.5, dev=0.5)])
    assert rule.judge(_scored(1, test=0.0, dev=0.5, fused=True)) is None  # test collapses, dev holds: it stands
    assert rule.judge(_scored(2, test=1.0, dev=0.3, fused=True)) == (0.5, 0.3)  # dev falls, test soars: undone
    assert rule.reference == 0.5  # the undone round's score is no reference
    assert rule.judge(_scored(3, test=0.0, dev=0.47, fused=True)) is None and rule.reference == 0.47
    assert Backtracking(None).judge(_scored(4, test=0.0, dev=0.0, fused=True)) is None  # off


def test_held_out_tasks_cannot_steer_back_tracking():
    with pytest.raises(ValueError, match="held-out .* must not steer training"):
        Backtracking(0.02, "heldout")


def test_reference_norms_come_from_the_last_fused_round_that_stood():
    stood = RoundRecord(1, fused=True, fused_contributors=["a", "b"], update_norms={"a": 1.0, "b": 2.0, "c": 9.0})
    undone = RoundRecord(2, fused=True, rolled_back=True, fused_contributors=["a"], update_norms={"a": 50.0})
    unfused = RoundRecord(3, update_norms={"a": 70.0})
    assert fused_norms([stood, undone, unfused]) == [1.0, 2.0]
    assert fused_norms([undone]) == []


def test_the_reports_best_round_follows_dev_and_reports_that_rounds_test_score():
    from app.report.aggregate import summarise_series
    from app.report.markdown import backtrack_lines

    records = [_scored(0, test=0.5, dev=0.5), _scored(1, test=0.95, dev=0.52, fused=True, base_round=1),
               _scored(2, test=0.6, dev=0.8, fused=True, base_round=2),
               _scored(3, test=0.99, dev=0.9, fused=True, rolled_back=True, base_round=2)]
    points = summarise_series(records, "probe", "contributing")
    assert points == {"start": (0, 0.5), "final": (2, 0.6), "best": (2, 0.6)}  # not round 1's test peak
    assert summarise_series(records, "probe_mean_pool", "heldout")["best"] == (2, 0.3)
    old = [RoundRecord(0, roles={"a": "contributing"}, probe={"a": 0.5}, probe_contributing=0.5)]  # no dev scores
    assert summarise_series(old, "probe", "contributing")["best"] is None
    config = {"backtrack": {"threshold": 0.02, "monitor": "contributing"}}
    assert "probe accuracy on dev rows over the contributing" in backtrack_lines(config, records)[0]
    assert "Warning: test scores steered" in " ".join(backtrack_lines(config, old))
    held = backtrack_lines({"backtrack": {"threshold": 0.02, "monitor": "heldout"}}, records)
    assert "every unseen figure is selected on held-out data" in " ".join(held)
