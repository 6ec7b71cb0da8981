import json
import random

import pytest
import torch

from app.run.checkpoint import config_differences, load_latest_checkpoint, resume_checkpoint, save_checkpoint
from app.run.config import ConfigError
from strategies.records import SCHEMA_VERSION, RoundRecord


def test_checkpoint_round_trips_body_rng_history_and_config(tmp_path):
    rng = random.Random(5)
    rng.random()
    body = {"w": torch.randn(3, 2), "ids": torch.arange(4)}
    save_checkpoint(tmp_path, 1, body, rng.getstate(), [RoundRecord(1)], {"seed": 0, "client": {"lr": 0.1}})
    history = [RoundRecord(1), RoundRecord(2, fused=True, base_round=2, update_norms={"a": 0.5})]
    save_checkpoint(tmp_path, 2, body, rng.getstate(), history, {"seed": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0002"]  # only the newest is kept
    state = json.loads((tmp_path / "ckpt-0002" / "state.json").read_text())
    assert state["schema"] == SCHEMA_VERSION and all(r["schema"] == SCHEMA_VERSION for r in state["history"])
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.round == 2 and ckpt.history == history
    assert all(torch.equal(ckpt.body[k], body[k]) for k in body)
    restored = random.Random()
    restored.setstate(ckpt.rng_state)
    assert restored.random() == rng.random()


def test_a_half_written_checkpoint_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, random.Random(0).getstate(), [], {})
    (tmp_path / ".ckpt-0002.tmp").mkdir()  # a crash mid-write leaves only the temporary folder
    (tmp_path / ".ckpt-0002.tmp" / "body.safetensors").write_bytes(b"garbage")
    assert load_latest_checkpoint(tmp_path).round == 1
    assert load_latest_checkpoint(tmp_path / "nothing-here") is None


def test_config_differences_name_the_keys_and_allow_more_rounds():
    saved = {"rounds": 3, "seed": 0, "client": {"lr": 0.1, "batch_size": 32}, "resume": None}
    current = {"rounds": 5, "seed": 1, "client": {"lr": 0.1, "batch_size": 16}, "resume": "/x"}
    assert config_differences(saved, current) == ["client.batch_size: 32 -> 16", "seed: 0 -> 1"]


def test_a_checkpoint_from_a_newer_version_is_refused_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, random.Random(0).getstate(), [RoundRecord(1)], {})
    state_file = tmp_path / "ckpt-0001" / "state.json"
    state = json.loads(state_file.read_text())
    state["schema"] = SCHEMA_VERSION + 1
    state_file.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=rf"resume=.*ckpt-0001/state.json: checkpoint schema {SCHEMA_VERSION + 1} is newer"):
        resume_checkpoint(tmp_path, {}, allow_config_change=True)


def test_a_fusion_operators_state_is_saved_with_the_checkpoint(tmp_path):
    momentum = {"momentum/w": torch.randn(3, 2, dtype=torch.float64)}
    save_checkpoint(tmp_path, 1, {"w": torch.ones(3, 2)}, random.Random(0).getstate(), [RoundRecord(1)], {},
                    fusion_state=momentum)
    restored = load_latest_checkpoint(tmp_path).fusion_state
    assert set(restored) == {"momentum/w"} and torch.equal(restored["momentum/w"], momentum["momentum/w"])
    save_checkpoint(tmp_path, 2, {"w": torch.ones(3, 2)}, random.Random(0).getstate(), [RoundRecord(1)], {})
    assert load_latest_checkpoint(tmp_path).fusion_state == {}  # a stateless operator: no file, no state
