"""The round record schema (strategies/records.py): one typed definition, versioned, older versions upgraded."""

import json

import pytest

from app.run.outputs import json_line
from strategies.records import SCHEMA_VERSION, RecordError, RoundRecord, read_records, saved_model_record


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
