"""The two views of a base body on one task (the paper's "Evaluation"), and when each one runs.

* ``probe`` ("ColD-Frozen"): the body stays frozen; a fresh linear model is fitted on its features,
  once on the first token (the paper's view, the primary score) and once on the mean-pooled tokens.
* ``finetune`` ("ColD"): the body with a fresh head is finetuned as a whole with the contributor
  recipe, under the view's own budget (``eval.finetune``), and scored on the test split.

Both take the same arguments and return the task's metrics (``tasks.metrics``); the finetune view adds
``steps``, ``train_examples`` and ``stopped_early``. Held-out tasks train on only ``few_shot``
examples when that is set. Every cap draws a seeded random subset, the same in every round.
"""

from __future__ import annotations

from typing import Any, Mapping

from app.learning.probe import extract_features, probe_score
from app.learning.recipe import evaluate_model, finetune
from tasks.splits import subsample, train_dev

BUDGET_KEYS = ("max_steps", "epochs", "early_stopping")


def view_recipe(client: Mapping[str, Any], finetune_settings: Mapping[str, Any]) -> dict[str, Any]:
    """The contributor recipe with the finetune view's own budget (steps, epochs, early stopping)."""
    return {**client, **{key: finetune_settings[key] for key in BUDGET_KEYS}}


def probe_view(model, info, tokenizer, data, settings: Mapping[str, Any], recipe: Mapping[str, Any],
               seed: int, device, few_shot: int | None = None) -> dict[str, float]:
    probe = settings["probe"]
    train = subsample(data["train"], few_shot or probe["max_train_examples"], seed)
    test = subsample(data["test"], probe["max_test_examples"], seed)
    train_feats, test_feats = (extract_features(model.base_model, split, tokenizer, int(probe["batch_size"]), device)
                               for split in (train, test))
    # The first-token probe is the paper's ColD-Frozen view, so its metrics keep the plain names; the
    # mean-pooled probe's carry the prefix ``mean_pool_`` (strategies.coldfusion.SERIES reads both).
    scores = probe_score(train_feats["first_token"], test_feats["first_token"], info.is_regression, probe)
    pooled = probe_score(train_feats["mean_pool"], test_feats["mean_pool"], info.is_regression, probe)
    return {**scores, **{f"mean_pool_{name}": value for name, value in pooled.items()}}


def finetune_view(model, info, tokenizer, data, settings: Mapping[str, Any], recipe: Mapping[str, Any],
                  seed: int, device, few_shot: int | None = None) -> dict[str, float]:
    view = settings["finetune"]
    recipe = view_recipe(recipe, view)
    stopping = recipe.get("early_stopping")
    train, dev = data["train"], None
    if stopping:  # the dev split is set aside before the few-shot draw, so it never overlaps the k examples
        train, dev = train_dev(data, float(stopping["dev_fraction"]), int(stopping["dev_max_examples"]), seed)
    train = subsample(train, few_shot or view["max_train_examples"], seed)
    test = subsample(data["test"], view["max_test_examples"], seed)
    stats = finetune(model, train, tokenizer, recipe, seed, device, dev, info.is_regression)
    metrics = evaluate_model(model, test, tokenizer, int(recipe["batch_size"]), device, info.is_regression)
    return {**metrics, "steps": stats.steps, "train_examples": len(train), "stopped_early": float(stats.stopped_early)}


VIEW_FUNCTIONS = {"probe": probe_view, "finetune": finetune_view}
