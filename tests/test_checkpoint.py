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


def _snapshot(root):
    """Every file under root with its bytes: resuming from a damaged checkpoint must leave them all as they were."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _damaged_run(tmp_path, damage):
    body = {"w": torch.randn(64, 8)}
    save_checkpoint(tmp_path, 3, body, random.Random(0).getstate(), [RoundRecord(1), RoundRecord(2), RoundRecord(3)],
                    {"seed": 0}, fusion_state={"momentum/w": torch.zeros(64, 8)})
    ckpt = tmp_path / "ckpt-0003"
    damage(ckpt)
    return ckpt


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize(
    ("damage", "file", "needle"),
    [
        (lambda c: _truncate(c / "body.safetensors"), "body.safetensors", "cannot be read as safetensors"),
        (lambda c: _truncate(c / "body.safetensors", keep=0.01), "body.safetensors", "cannot be read as safetensors"),
        (lambda c: _truncate(c / "fusion.safetensors"), "fusion.safetensors", "cannot be read as safetensors"),
        (lambda c: _truncate(c / "state.json"), "state.json", "not valid JSON"),
        (lambda c: (c / "state.json").write_bytes(b"\xff\xfe garbage"), "state.json", "not valid JSON"),
        (lambda c: (c / "state.json").write_text("[1, 2]"), "state.json", "must hold a JSON object"),
        (lambda c: (c / "state.json").write_text(json.dumps({"round": 3, "rng_state": [], "history": [],
                                                             "config": {}})), "state.json", "'rng_state'"),
        (lambda c: (c / "state.json").write_text(json.dumps({"rng_state": [3], "history": [], "config": {}})),
         "state.json", "key 'round' is missing"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_nothing_is_written(tmp_path, damage, file, needle):
    ckpt = _damaged_run(tmp_path, damage)
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError) as info:
        resume_checkpoint(tmp_path, {"seed": 0}, allow_config_change=False)
    message = str(info.value)
    assert message.startswith(f"resume={tmp_path}: {ckpt / file}: ") and needle in message, message
    assert _snapshot(tmp_path) == before


def test_coldfusion_sim_exits_2_on_a_truncated_checkpoint(tmp_path, capsys, monkeypatch):
    """Through the CLI: a message naming the file, exit 2, no traceback, no SuperLink, the run untouched."""
    import app.run.launch as launch
    from rich.console import Console

    def tripwire(*_args, **_kwargs):
        raise AssertionError("the launcher started a SuperLink")
    monkeypatch.setattr(launch, "simulation_superlink", tripwire)
    monkeypatch.setattr(launch, "console", Console(width=10_000))
    ckpt = _damaged_run(tmp_path, lambda c: _truncate(c / "body.safetensors"))
    before = _snapshot(tmp_path)
    assert launch.main([f"resume={tmp_path}", "--output-dir", str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out
    assert f"error: resume={tmp_path}: {ckpt / 'body.safetensors'}: cannot be read as safetensors" in out
    assert _snapshot(tmp_path) == before
