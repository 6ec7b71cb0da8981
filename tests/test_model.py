"""Model building, the body/head split declared per architecture (KEY_LAYOUTS), dtypes, and the saved fused model."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers.initialization
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

import app.learning.model
from app.learning.model import (
    DEFAULT_LAYOUT,
    KEY_LAYOUTS,
    ModelLoadError,
    body_state,
    build_classifier,
    check_layout,
    head_state,
    initial_body,
    load_body,
    load_head,
    load_tokenizer,
    resolve_model,
    save_fused_model,
)
from app.learning.allocation import ParametersOnMeta, unsaved_buffers
from app.learning.tiny import build_tiny_model
from tests.conftest import SPLITS


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
def test_body_and_head_are_the_declared_keys(name, tiny_cfg):
    """RoBERTa: body = the encoder without pooler, head = classifier.dense + out_proj; BERT: pooler in the body."""
    path = resolve_model({**dict(tiny_cfg.model), "name_or_path": name})
    expected = SPLITS[name]
    model = build_classifier(path, 3, head_seed=0)
    body, head = body_state(model), head_state(model)
    assert set(body) == expected["body"]  # hand-written oracle (tests/conftest.py)
    assert set(head) == expected["head"]
    # together they are the whole model, each key once
    assert {f"{expected['prefix']}.{k}" for k in body} | set(head) == set(model.state_dict())
    for key, tensor in body.items():  # copies of the model's own tensors, not views into it
        live = model.state_dict()[f"{expected['prefix']}.{key}"]
        assert torch.equal(tensor, live) and tensor.data_ptr() != live.data_ptr()


# model_type -> the keys (relative to the base model) AutoModel adds to / lacks from the classifier's body, in
# transformers itself. KEY_LAYOUTS must declare exactly these; the default rule must hold for the others.
def _observed_difference(model_type: str) -> tuple[set[str], set[str], str]:
    kwargs = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, vocab_size=99)
    if model_type == "distilbert":
        kwargs = dict(dim=32, n_layers=1, n_heads=2, hidden_dim=37, vocab_size=99)
    if model_type == "albert":
        kwargs["embedding_size"] = 16
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except ValueError:
        pytest.skip(f"this transformers has no model_type '{model_type}'")
    config.num_labels = 3
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config)
        automodel = AutoModel.from_config(config)
    prefix = classifier.base_model_prefix + "."
    base = {k[len(prefix):] for k in classifier.state_dict() if k.startswith(prefix)}
    full = set(automodel.state_dict())
    return full - base, base - full, classifier.base_model_prefix


@pytest.mark.parametrize("model_type", sorted(KEY_LAYOUTS) + ["distilbert", "electra", "deberta-v2", "albert"])
def test_key_layouts_declare_exactly_what_transformers_does(model_type):
    adds, lacks, _ = _observed_difference(model_type)
    layout = KEY_LAYOUTS.get(model_type, DEFAULT_LAYOUT)
    assert adds == {k for k in adds if k.startswith(layout.automodel_adds)} and (adds or not layout.automodel_adds)
    assert lacks == {k for k in lacks if k.startswith(layout.automodel_lacks)} and (lacks or not layout.automodel_lacks)
    if model_type in ("roberta", "xlm-roberta"):
        assert adds == {"pooler.dense.weight", "pooler.dense.bias"} and not lacks
    if model_type == "bert":
        assert not adds and not lacks  # the pooler is in BertForSequenceClassification's base model: body


def test_an_undeclared_architecture_difference_fails_when_the_run_starts(tiny_path, monkeypatch):
    check_layout(tiny_path)  # RoBERTa's pooler is declared
    monkeypatch.delitem(app.learning.model.KEY_LAYOUTS, "roberta")
    with pytest.raises(ModelLoadError, match=r"'roberta'.*pooler\.dense.*KEY_LAYOUTS"):
        initial_body(tiny_path)


def test_fresh_heads_are_explicit_and_seeded(tiny_path):
    a, b, c = (head_state(build_classifier(tiny_path, 4, s)) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_a_model_built_around_a_body_initialises_only_the_head(name, tiny_cfg, monkeypatch):
    """A node builds its model around the received body: nothing is randomly drawn for it (only the head is), the
    body's values are the received ones, the unsaved buffers are right, and the head is the seed's, body or not."""
    path = resolve_model({**dict(tiny_cfg.model), "name_or_path": name})
    g = torch.Generator().manual_seed(1)
    layout = body_state(build_classifier(path, 3, 0))
    body = {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in layout.items()}
    drawn = []  # elements of real (not meta) tensors given random values by transformers' init functions
    for fn in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_", "xavier_uniform_"):
        original = transformers.initialization.TORCH_INIT_FUNCTIONS[fn]
        monkeypatch.setitem(transformers.initialization.TORCH_INIT_FUNCTIONS, fn,
                            lambda t, *a, _f=original, **k: (drawn.append(0 if t.is_meta else t.numel()), _f(t, *a, **k))[1])
    model = build_classifier(path, 3, head_seed=7, body=body)
    state, prefix = model.state_dict(), SPLITS[name]["prefix"]
    head_weights = [state[k] for k in SPLITS[name]["head"] if k.endswith("weight")]
    assert sum(drawn) == sum(w.numel() for w in head_weights)  # the head's weights, nothing of the body
    assert all(torch.equal(state[f"{prefix}.{k}"], v) for k, v in body.items())
    embeddings = model.base_model.embeddings
    np.testing.assert_array_equal(embeddings.position_ids[0].numpy(), np.arange(embeddings.position_ids.shape[-1]))
    plain = head_state(build_classifier(path, 3, head_seed=7))
    assert all(torch.equal(plain[k], v) for k, v in head_state(model).items())


def checkpoint_body(path: str) -> dict[str, torch.Tensor]:
    """The start body as the checkpoint's files store it, read with safetensors alone (not transformers' loading):
    the body's keys (relative to base_model), each in its stored dtype; keys stored with the prefix are found too."""
    with torch.device("meta"):
        layout = build_classifier(path, 3, 0)
    stored = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        stored.update(load_file(file))
    keys, prefix = app.learning.model.body_dtypes(layout), layout.base_model_prefix
    return {k: stored[k] if k in stored else stored[f"{prefix}.{k}"] for k in keys}


def unsaved(model) -> dict[str, torch.Tensor]:
    """The buffers no checkpoint stores (BERT's position_ids and token_type_ids)."""
    saved = set(model.state_dict())
    return {k: b for k, b in model.named_buffers() if k not in saved}


@pytest.mark.parametrize("fixture", ["tiny_path", "minilm_path", "half_path"])
def test_the_body_before_the_first_step_is_the_body_sent(fixture, request):
    """What a node trains is what it received, tensor for tensor, and it computes what from_pretrained's model does
    (the oracle: the checkpoint read with safetensors, and a model loaded by transformers with the same head)."""
    path = request.getfixturevalue(fixture)
    sent = checkpoint_body(path)
    model = build_classifier(path, 3, head_seed=7, body=sent)
    state, prefix = model.state_dict(), model.base_model_prefix
    assert all(torch.equal(state[f"{prefix}.{k}"], v.float()) for k, v in sent.items())  # float16: exact upcast
    received = body_state(model)
    assert all(received[k].dtype == v.dtype and torch.equal(received[k], v) for k, v in sent.items())
    reference = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, dtype=torch.float32)
    expected = unsaved(reference)
    assert expected.keys() == unsaved(model).keys() and expected  # position_ids at least
    assert all(torch.equal(b, expected[k]) for k, b in unsaved(model).items())
    load_head(reference, head_state(model))
    batch = load_tokenizer(path)(["the first sentence here", "a second one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, reference.eval()(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_the_body_sent_survives_an_initialisation_that_ignores_transformers_flags(name, tiny_cfg, monkeypatch):
    """transformers 4.x (allowed by pyproject.toml) re-initialises every module its ``initialize_weights`` visits,
    whatever ``_is_hf_initialized`` says, and fills no buffer in ``_init_weights``: simulated here on version 5
    by unguarded init functions and a no-op ``copy_``. The body and the buffers must not depend on either."""
    path = resolve_model({**dict(tiny_cfg.model), "name_or_path": name})
    sent = checkpoint_body(path)
    init = transformers.initialization
    for fn in ("normal_", "uniform_", "zeros_", "ones_", "constant_", "trunc_normal_"):
        monkeypatch.setattr(init, fn, getattr(torch.nn.init, fn))
    monkeypatch.setattr(init, "copy_", lambda tensor, *args, **kwargs: tensor)
    model = build_classifier(path, 3, head_seed=7, body=sent)
    received = body_state(model)
    assert [k for k, v in sent.items() if not torch.equal(received[k], v)] == []
    positions = model.base_model.embeddings.position_ids
    np.testing.assert_array_equal(positions.numpy(), np.arange(positions.shape[-1])[None])


def test_a_buffer_an_architecture_makes_with_torch_empty_comes_from_a_real_build():
    """ParametersOnMeta sends torch.empty to the meta device; a buffer made that way is taken from a real build,
    drawn in a forked RNG (the caller's random state is untouched)."""
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 2)
            self.register_buffer("table", torch.empty(3).fill_(5.0), persistent=False)
            self.register_buffer("positions", torch.arange(4), persistent=False)

    with ParametersOnMeta():
        toy = Toy()
    assert toy.linear.weight.is_meta and toy.table.is_meta and not toy.positions.is_meta
    rng = torch.random.get_rng_state()
    buffers = unsaved_buffers(toy, Toy)
    assert torch.equal(torch.random.get_rng_state(), rng)
    np.testing.assert_array_equal(buffers["table"].numpy(), [5.0, 5.0, 5.0])
    np.testing.assert_array_equal(buffers["positions"].numpy(), np.arange(4))


def test_load_body_refuses_a_body_that_does_not_fit(tiny_path):
    model = build_classifier(tiny_path, 2, 0)
    body = body_state(model)
    with pytest.raises(ValueError, match=r"missing \['embeddings.LayerNorm.bias'\]"):
        load_body(model, {k: v for k, v in body.items() if k != "embeddings.LayerNorm.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['pooler.dense.bias'\]"):
        load_body(model, {**body, "pooler.dense.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match="'embeddings.LayerNorm.bias' is torch.float64, the model's is torch.float32"):
        load_body(model, {**body, "embeddings.LayerNorm.bias": body["embeddings.LayerNorm.bias"].double()})
    with pytest.raises(ValueError, match="stored head does not fit"):
        load_head(model, {k: v for k, v in head_state(model).items() if k != "classifier.dense.bias"})


def test_load_body_and_head_copy_exact_values(tiny_path):
    model = build_classifier(tiny_path, 3, 0)
    g = torch.Generator().manual_seed(0)
    body = {k: torch.randn(v.shape, generator=g) for k, v in body_state(model).items()}
    head = {k: torch.randn(v.shape, generator=g) for k, v in head_state(model).items()}
    oracle = {k: v.numpy().copy() for k, v in {**body, **head}.items()}
    load_body(model, body)
    load_head(model, head)
    state = model.state_dict()
    for key, value in body.items():
        np.testing.assert_array_equal(state[f"roberta.{key}"].numpy(), oracle[key])
    for key in head:
        np.testing.assert_array_equal(state[key].numpy(), oracle[key])


def test_pretrained_minilm_body_round_trips_and_saves(tmp_path, minilm_path):
    body = initial_body(minilm_path)
    model = build_classifier(minilm_path, 2, 0)
    load_body(model, body)
    assert all(torch.equal(model.base_model.state_dict()[k], body[k]) for k in body)
    fused = {k: v + 0.5 for k, v in body.items()}  # a body unlike the start model's, pooler included
    out = save_fused_model(minilm_path, fused, tmp_path / "fused")
    reloaded = AutoModel.from_pretrained(out).state_dict()
    assert set(reloaded) == set(body)  # BERT: AutoModel is exactly the body (the pooler is body)
    assert all(torch.equal(reloaded[k], fused[k]) for k in body)
    assert load_tokenizer(str(out))("hello")["input_ids"]


def test_saved_roberta_model_keeps_the_start_pooler_and_the_fused_body(tiny_path, tmp_path):
    body = initial_body(tiny_path)
    fused = {k: v * 2 for k, v in body.items()}
    reloaded = AutoModel.from_pretrained(save_fused_model(tiny_path, fused, tmp_path / "m")).state_dict()
    start = AutoModel.from_pretrained(tiny_path).state_dict()
    assert set(reloaded) - set(fused) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert all(torch.equal(reloaded[k], fused[k]) for k in fused)
    assert all(torch.equal(reloaded[k], start[k]) for k in ("pooler.dense.weight", "pooler.dense.bias"))


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("encoder.layer.1.output.dense.weight"), r"missing 1 key\(s\) \['encoder.layer.1.output.dense.weight'\]"),
    (lambda b: b.update({"encoder.layer.9.output.dense.bias": torch.zeros(64)}),
     r"unexpected 1 \['encoder.layer.9.output.dense.bias'\]"),
    (lambda b: b.update({"embeddings.LayerNorm.bias": b["embeddings.LayerNorm.bias"].half()}),
     "'embeddings.LayerNorm.bias' is torch.float16, the model stores torch.float32"),
    (lambda b: b.update({"embeddings.LayerNorm.bias": torch.zeros(3)}), r"has shape \(3,\)"),
], ids=["lost", "extra", "cast", "reshaped"])
def test_saving_a_fused_body_with_a_lost_extra_or_cast_key_fails_loudly(tiny_path, tmp_path, change, message):
    body = initial_body(tiny_path)
    change(body)
    with pytest.raises(ValueError, match=message):
        save_fused_model(tiny_path, body, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_half_precision_model_keeps_its_dtype_and_trains_in_float32(half_path):
    body = initial_body(half_path)
    assert {v.dtype for v in body.values()} == {torch.float16}
    model = build_classifier(half_path, 3, 0)
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights on the node
    load_body(model, body)
    sent = body_state(model)
    assert all(sent[k].dtype == torch.float16 and torch.equal(sent[k], body[k]) for k in body)  # lossless round trip
    with pytest.raises(ValueError, match="is torch.float32, the model's is torch.float16"):
        load_body(model, {k: v.float() for k, v in body.items()})


def test_a_bfloat16_model_is_refused_at_the_start_with_the_reason(tiny_path, tmp_path):
    AutoModel.from_pretrained(tiny_path).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    load_tokenizer(tiny_path).save_pretrained(tmp_path / "bf16")
    with pytest.raises(ModelLoadError, match="bfloat16, which a Flower ArrayRecord cannot carry"):
        initial_body(str(tmp_path / "bf16"))


def test_a_model_path_that_does_not_load_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=str(tmp_path / "missing")):
        initial_body(str(tmp_path / "missing"))


@pytest.mark.parametrize("fixture", ["tiny_path", "half_path"])
def test_the_query_signature_is_worked_out_without_weights_and_equals_the_real_bodys(fixture, request):
    from app.learning.model import body_signature, body_state, model_body_signature

    path = request.getfixturevalue(fixture)
    for num_labels in (1, 3):
        built = body_state(build_classifier(path, num_labels, 0))
        assert model_body_signature(path, num_labels) == body_signature(built)
    assert body_signature(initial_body(path)) == model_body_signature(path, 2)  # what the server compares it with
