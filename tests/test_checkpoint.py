import random

import torch

from app.run.checkpoint import config_differences, load_latest_checkpoint, save_checkpoint


def test_checkpoint_round_trips_body_rng_history_and_config(tmp_path):
    rng = random.Random(5)
    rng.random()
    body = {"w": torch.randn(3, 2), "ids": torch.arange(4)}
    save_checkpoint(tmp_path, 1, body, rng.getstate(), [{"round": 1}], {"seed": 0, "client": {"lr": 0.1}})
    save_checkpoint(tmp_path, 2, body, rng.getstate(), [{"round": 1}, {"round": 2}], {"seed": 0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0002"]  # only the newest is kept
    ckpt = load_latest_checkpoint(tmp_path)
    assert ckpt.round == 2 and [h["round"] for h in ckpt.history] == [1, 2]
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
