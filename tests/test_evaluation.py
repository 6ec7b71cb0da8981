"""The evaluation views (linear probe, full finetuning), early stopping, few-shot and the regression path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from app.client_app import app as client_app
from app.run.config import compose_config, to_container
from app.learning.views import finetune_view, probe_view, view_recipe
from app.learning.model import (
    build_classifier,
    initial_body,
    load_body,
    load_tokenizer,
)
from app.learning.recipe import EarlyStopping, finetune
from strategies.schedule import due
from tasks.registry import entry_key, load_task_cached
from tasks.splits import fit_dev, subsample, train_dev
from tasks.tokenize import tokenize_task
from tests.conftest import SHARED_DATA, model_json
from tests.test_client import _evaluate_message

STOPPING = {"every_examples": 64, "patience_examples": 128, "min_gain": 0.001, "dev_fraction": 0.1,
            "dev_max_examples": 100}


def _task(cfg, path, entry):
    info, data = load_task_cached(entry_key(entry))
    tokenizer = load_tokenizer(path)
    return info, tokenizer, tokenize_task(data, tokenizer, int(cfg.client.max_length))


def test_schedules():
    assert [r for r in range(7) if due(2, r, 6)] == [0, 2, 4, 6]
    assert [r for r in range(8) if due(3, r, 7)] == [0, 3, 6, 7]  # the last round always
    assert [r for r in range(6) if due("first_last", r, 5)] == [0, 5]
    assert not any(due(None, r, 5) for r in range(6))


def test_early_stopping_rule_stops_when_the_gain_over_the_patience_window_is_too_small():
    rule = EarlyStopping(patience_examples=100, min_gain=0.01)
    decisions = [rule.update(seen, score) for seen, score in
                 [(50, 0.5), (100, 0.6), (150, 0.7), (200, 0.705), (250, 0.70), (300, 0.9)]]
    # at 200 the best gained 0.105 over 100 examples; at 250 only 0.005 (0.705 vs 0.7 at 150): stop
    assert decisions == [False, False, False, False, True, False]
    assert rule.best == 0.9


def test_subsample_and_dev_split_are_seeded_random_and_disjoint():
    ordered = Dataset.from_dict({"label": [0] * 500 + [1] * 500, "i": list(range(1000))})
    sample = subsample(ordered, 100, seed=3)
    assert sample["i"] == subsample(ordered, 100, seed=3)["i"]  # the same draw every time
    assert 20 < sum(sample["label"]) < 80  # not the first (all-0) rows of an ordered file
    assert subsample(ordered, None, 0) is ordered
    train, dev = train_dev(DatasetDict(train=ordered, test=ordered), fraction=0.05, max_examples=30, seed=0)
    assert len(dev) == 30 and len(train) == 970 and not set(dev["i"]) & set(train["i"])
    with_validation = DatasetDict(train=ordered, validation=ordered.select(range(10)), test=ordered)
    assert train_dev(with_validation, 0.05, 1000, 0)[1]["i"] == list(range(10))  # a real dev split wins


def _rows(split) -> set[int]:
    return set(split["i"])


def test_the_views_dev_rows_are_disjoint_from_the_fit_and_test_rows_and_leave_the_fit_draw_as_it_was():
    """tasks.splits.fit_dev, row by row: decisions read dev rows, never a test row nor a row the model fits on."""
    train = Dataset.from_dict({"label": [0] * 500 + [1] * 500, "i": list(range(1000))})
    test = Dataset.from_dict({"label": [0, 1] * 100, "i": list(range(1000, 1200))})
    data = DatasetDict(train=train, test=test)
    # enough rows past the fit draw: the fit rows are the draw the views always made, dev the next 200 rows
    fit, dev = fit_dev(data, 300, 200, 0.2, seed=3)
    assert fit["i"] == subsample(train, 300, 3)["i"] and len(dev) == 200
    assert _rows(dev) <= _rows(train) and not _rows(dev) & _rows(fit) and not _rows(dev) & _rows(test)
    assert 50 < sum(dev["label"]) < 150  # a random draw, not the last (all-1) rows of an ordered file
    again, dev_again = fit_dev(data, 300, 200, 0.2, seed=3)
    assert again["i"] == fit["i"] and dev_again["i"] == dev["i"]  # the same rows in every round
    assert fit_dev(data, 300, 200, 0.2, seed=4)[1]["i"] != dev["i"]  # another seed, another draw
    few, few_dev = fit_dev(data, 16, 200, 0.2, seed=3)  # a few-shot draw: its k rows as before, dev disjoint
    assert few["i"] == subsample(train, 16, 3)["i"] and not _rows(few_dev) & (_rows(few) | _rows(test))
    # train too small to spare 200 rows past the draw (1000 <= 900 + 200): dev (20% of train) is carved first
    for limit in (900, 1000, None):
        fit, dev = fit_dev(data, limit, 200, 0.2, seed=3)
        assert len(dev) == 200 and len(fit) == min(limit or 800, 800)
        assert _rows(dev) <= _rows(train) and not _rows(dev) & _rows(fit) and not _rows(dev) & _rows(test)
        assert fit_dev(data, limit, 200, 0.2, seed=3)[1]["i"] == dev["i"]
    assert len(fit_dev(data, None, 500, 0.1, seed=3)[1]) == 100  # the fraction caps a carved dev split
    # a task with a validation split: dev comes from it, and the fit draw is untouched
    with_validation = DatasetDict(train=train, validation=Dataset.from_dict({"label": [0] * 5, "i": [-1] * 5}),
                                  test=test)
    fit, dev = fit_dev(with_validation, 1000, 200, 0.2, seed=3)
    assert dev["i"] == [-1] * 5 and fit["i"] == train["i"]


def test_no_probe_dev_score_reads_a_test_row(tiny_cfg, tiny_path, pool):
    """Adversarial test labels: every test label moved to another class. The test scores change; the dev scores,
    the only ones decisions read, must not move at all, in both poolings."""
    entry = next(e for e in pool if e["name"] == "syn01_topic")
    info, raw = load_task_cached(entry_key(entry))
    tokenizer = load_tokenizer(tiny_path)
    flipped = DatasetDict(train=raw["train"], test=raw["test"].map(
        lambda row: {"label": (row["label"] + 1) % info.num_labels}))
    settings, recipe = to_container(tiny_cfg, "eval"), to_container(tiny_cfg, "client")
    scores = []
    for data in (raw, flipped):
        model = build_classifier(tiny_path, info.num_labels, 0)
        tokenized = tokenize_task(data, tokenizer, int(tiny_cfg.client.max_length))
        scores.append(probe_view(model, info, tokenizer, tokenized, settings, recipe, 0, "cpu"))
    honest, adversarial = scores
    dev = {k: v for k, v in honest.items() if k.startswith("dev_")}
    assert set(dev) == {"dev_accuracy", "dev_macro_f1", "dev_mean_pool_accuracy", "dev_mean_pool_macro_f1"}
    assert {k: v for k, v in adversarial.items() if k.startswith("dev_")} == dev
    assert adversarial["accuracy"] != honest["accuracy"]
    assert adversarial["mean_pool_accuracy"] != honest["mean_pool_accuracy"]


def test_probe_on_a_body_trained_on_the_task_beats_chance_and_the_untrained_body(tiny_cfg, tiny_path, pool):
    entry = next(e for e in pool if e["name"] == "syn01_topic")
    info, tokenizer, data = _task(tiny_cfg, tiny_path, entry)
    settings, recipe = to_container(tiny_cfg, "eval"), to_container(tiny_cfg, "client")
    start = build_classifier(tiny_path, info.num_labels, 0)
    before = probe_view(start, info, tokenizer, data, settings, recipe, 0, "cpu")
    trained = build_classifier(tiny_path, info.num_labels, 0)
    finetune(trained, data["train"], tokenizer, {**recipe, "max_steps": 150}, 0, "cpu")
    after = probe_view(trained, info, tokenizer, data, settings, recipe, 0, "cpu")
    assert after["accuracy"] > 1 / info.num_labels + 0.25, (before, after)
    assert after["accuracy"] > before["accuracy"] and 0 < after["macro_f1"] <= 1


def test_finetune_view_trains_a_fresh_head_and_stops_early_where_the_rule_says(tiny_cfg, tiny_path, pool):
    entry = next(e for e in pool if e["name"] == "syn01_topic")
    info, tokenizer, data = _task(tiny_cfg, tiny_path, entry)
    settings = to_container(tiny_cfg, "eval")
    settings["finetune"].update(max_steps=None, epochs=20, max_train_examples=None, early_stopping={**STOPPING, "min_gain": 2.0,
                                                                                    "dev_fraction": 0.04})
    model = build_classifier(tiny_path, info.num_labels, 0)
    scores = finetune_view(model, info, tokenizer, data, settings, to_container(tiny_cfg, "client"), 0, "cpu")
    # a gain of 2.0 is impossible: the run must stop at the first evaluation that closes a full
    # patience window: evaluations at 64, 128, 192 examples; at 192 the window back to 64 is full.
    # 200 train examples minus a 4% dev split = 192 = 6 batches of 32, so no short batch shifts the count.
    assert int(tiny_cfg.client.batch_size) == 32 and scores["train_examples"] == 192
    assert scores["stopped_early"] == 1.0 and scores["steps"] == 6
    assert 0 <= scores["accuracy"] <= 1


def test_early_stopping_keeps_the_best_weights(tiny_cfg, tiny_path, pool):
    entry = next(e for e in pool if e["name"] == "syn01_topic")
    info, tokenizer, data = _task(tiny_cfg, tiny_path, entry)
    train, dev = train_dev(data, 0.1, 100, 0)
    recipe = {**to_container(tiny_cfg, "client"), "max_steps": 40, "early_stopping": STOPPING}
    model = build_classifier(tiny_path, info.num_labels, 0)
    stats = finetune(model, train, tokenizer, recipe, 0, "cpu", dev, info.is_regression)
    assert len(stats.dev_curve) >= 3 and stats.best_dev == max(score for _, score in stats.dev_curve)
    from app.learning.recipe import evaluate_model

    assert evaluate_model(model, dev, tokenizer, 64, "cpu", False)["accuracy"] == pytest.approx(stats.best_dev)


def test_few_shot_trains_held_out_tasks_on_k_examples_only(tiny_cfg, tiny_path, pool, node):
    cfg = compose_config("quick", [f"model.cache_dir={tiny_cfg.model.cache_dir}", "tasks.train_size=200",
                                   "tasks.test_size=100", "eval.few_shot=16", "eval.finetune.max_steps=3"])
    entry = next(e for e in pool if e["role"] == "heldout")
    heldout = client_app(_evaluate_message(cfg, tiny_path, entry, "finetune", role="heldout"), node)
    seen = client_app(_evaluate_message(cfg, tiny_path, entry, "finetune", role="contributing"), node)
    assert heldout.content["metrics"]["finetune.train_examples"] == 16
    # few-shot applies to held-out tasks only; the 200 train rows cannot spare eval.finetune.max_dev_examples=200
    # past the fit draw, so the view carves its dev split first: 20% of 200 = 40 rows, and fits on the other 160
    assert seen.content["metrics"]["finetune.train_examples"] == 160


@pytest.fixture(scope="module")
def regression_task(tiny_cfg, pool, tmp_path_factory):
    """A local regression task in the tiny language: syn05_sentiment3's classes as scores 0, 2.5, 5."""
    entry = next(e for e in pool if e["name"] == "syn05_sentiment3")
    _, data = load_task_cached(entry_key(entry))
    root = tmp_path_factory.mktemp("sentiment_score")
    (root / "meta.json").write_text(json.dumps({"name": "sentiment_score", "task": "regression",
                                                "label_names": None, "sentence_pair": False}))
    for split in ("train", "test"):
        rows = [{"text": r["text"], "label": 2.5 * r["label"]} for r in data[split]]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"source": "local", "name": "sentiment_score", "path": str(root)}


def test_regression_path_end_to_end(tiny_cfg, tiny_path, regression_task, node):
    """Through the ClientApp: a regression head trains (MSE) and both views report Pearson and Spearman."""
    body = initial_body(tiny_path)
    recipe = {**to_container(tiny_cfg, "client"), "max_steps": 150, "device": "cpu"}
    config = ConfigRecord({"model": model_json(tiny_cfg), "seed": 0, "task-entry": entry_key(regression_task),
                           "server-round": 1, "recipe": json.dumps(recipe)})
    trained = client_app(Message(content=RecordDict({"arrays": ArrayRecord(body), "config": config}),
                                 message_type=MessageType.TRAIN, dst_node_id=7), node)
    assert not trained.has_error(), trained.error
    trained_body = trained.content["arrays"].to_torch_state_dict()
    cfg = compose_config("quick", [f"model.cache_dir={tiny_cfg.model.cache_dir}", "eval.finetune.max_steps=150"])
    scores = {}
    for name, start in (("start", body), ("trained", trained_body)):
        message = _evaluate_message(cfg, tiny_path, regression_task, "probe,finetune")
        message.content["arrays"] = ArrayRecord(start)
        reply = client_app(message, node)
        assert not reply.has_error(), reply.error
        scores[name] = dict(reply.content["metrics"])
    assert "probe.accuracy" not in scores["start"]
    # a body trained on the scores carries them linearly; full finetuning learns them from any start
    assert scores["trained"]["probe.pearson"] > max(0.5, scores["start"]["probe.pearson"]), scores
    assert scores["start"]["finetune.pearson"] > 0.5 and scores["start"]["finetune.spearman"] > 0.5, scores


@pytest.mark.skipif(not (SHARED_DATA / "stsb").is_dir(), reason="needs ../shared/data/stsb")
def test_stsb_loads_as_regression_and_reports_correlations_with_minilm(node):
    """Real STS-B (float scores 0-5) through the ClientApp with the pretrained encoder."""
    from app.learning.model import resolve_model

    cfg = compose_config("realdata", ["eval.probe.max_train_examples=200", "eval.probe.max_test_examples=100",
                                      "client.max_length=48"])
    path = resolve_model(to_container(cfg, "model"))
    entry = {"source": "local", "name": "stsb", "path": str(SHARED_DATA / "stsb")}
    reply = client_app(_evaluate_message(cfg, path, entry, "probe", role="heldout"), node)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert -1 <= metrics["probe.pearson"] <= 1 and -1 <= metrics["probe.spearman"] <= 1
    assert metrics["num-examples"] == 1379 and "probe.accuracy" not in metrics


def test_view_recipe_takes_the_contributor_recipe_with_the_views_budget(tiny_cfg):
    recipe = view_recipe(to_container(tiny_cfg, "client"), {"max_steps": 7, "epochs": None, "early_stopping": STOPPING})
    assert recipe["lr"] == tiny_cfg.client.lr and recipe["max_steps"] == 7 and recipe["early_stopping"] == STOPPING


def test_the_finetune_view_leaves_the_body_it_was_sent_untouched(tiny_cfg, tiny_path, pool, node):
    """The finetune view trains a model loaded with the body: the body itself must not change (it is copied in),
    and a probe that runs after the finetune view on the same message scores the body as sent."""
    entry = pool[0]
    info, tokenizer, data = _task(tiny_cfg, tiny_path, entry)
    body = initial_body(tiny_path)
    oracle = {k: v.numpy().copy() for k, v in body.items()}  # an independent copy of the values sent
    model = build_classifier(tiny_path, info.num_labels, 0)
    load_body(model, body)
    finetune_view(model, info, tokenizer, data, to_container(tiny_cfg, "eval"), to_container(tiny_cfg, "client"), 0, "cpu")
    trained = model.base_model.state_dict()
    assert any(not np.array_equal(trained[k].numpy(), oracle[k]) for k in oracle), "the finetune view trained nothing"
    for key, value in body.items():
        np.testing.assert_array_equal(value.numpy(), oracle[key])

    # through the handler: "finetune,probe" runs the finetune view first; its probe must equal a probe alone
    def probe_scores(views):
        reply = client_app(_evaluate_message(tiny_cfg, tiny_path, entry, views), node)
        assert not reply.has_error(), reply.error
        return {k: v for k, v in reply.content["metrics"].items() if k.startswith("probe.")}

    after_finetune, alone = probe_scores("finetune,probe"), probe_scores("probe")
    assert after_finetune and after_finetune == alone
