"""Model building and the generic body/head split, on the tiny model and on a real pretrained BERT."""

import pytest
import torch
from transformers import AutoModel

from app.model import (
    ModelLoadError,
    body_state,
    build_classifier,
    build_tiny_model,
    head_state,
    initial_body,
    load_body,
    load_tokenizer,
    resolve_model,
    save_fused_model,
)


def test_tiny_model_is_cached_and_deterministic(tiny_cfg, tiny_path, tmp_path):
    settings = dict(tiny_cfg.model.tiny)
    again = build_tiny_model(settings, str(tmp_path))  # a second, independent build
    assert again != tiny_path
    a, b = initial_body(tiny_path), initial_body(str(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert load_tokenizer(tiny_path).get_vocab() == load_tokenizer(str(again)).get_vocab()
    assert build_tiny_model(settings, str(tmp_path)) == again  # reused, not rebuilt


def test_tiny_tokenizer_encodes_pairs_roberta_style(tiny_path):
    tok = load_tokenizer(tiny_path)
    ids = tok("a b", "c")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.eos_token_id) == 3


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_body_and_head_split_is_generic(name, tiny_cfg):
    path = resolve_model({**dict(tiny_cfg.model), "name_or_path": name})
    model = build_classifier(path, 3, head_seed=0)
    body, head = body_state(model), head_state(model)
    prefix = model.base_model_prefix + "."
    assert set(body) == {k[len(prefix):] for k in model.state_dict() if k.startswith(prefix)}
    assert head and not any(k.startswith(prefix) for k in head)
    assert len(body) + len(head) == len(model.state_dict())


def test_fresh_heads_are_explicit_and_seeded(tiny_path):
    a, b, c = (head_state(build_classifier(tiny_path, 4, s)) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_load_body_refuses_a_body_that_does_not_fit(tiny_path):
    model = build_classifier(tiny_path, 2, 0)
    body = body_state(model)
    body.pop(next(iter(body)))
    with pytest.raises(ValueError, match="missing"):
        load_body(model, body)


def test_pretrained_minilm_body_round_trips_and_saves(tmp_path, tiny_cfg):
    path = resolve_model({"name_or_path": "minilm"})
    body = initial_body(path)
    model = build_classifier(path, 2, 0)
    load_body(model, body)
    assert all(torch.equal(model.base_model.state_dict()[k], body[k]) for k in body)
    out = save_fused_model(path, body, tmp_path / "fused")
    reloaded = AutoModel.from_pretrained(out)
    assert all(torch.equal(reloaded.state_dict()[k], body[k]) for k in body)
    assert load_tokenizer(str(out))("hello")["input_ids"]


def test_a_model_path_that_does_not_load_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "missing")):
        initial_body(str(tmp_path / "missing"))
