"""The two views of a base body on one task (the paper's "Evaluation"), and when each one runs.

* ``probe`` ("ColD-Frozen"): the body stays frozen; a fresh linear model is fitted on its features,
  once on the first token (the paper's view, the primary score) and once on the mean-pooled tokens.
* ``finetune`` ("ColD"): the body with a fresh head is finetuned as a whole with the contributor
  recipe, under the view's own budget (``eval.finetune``), and scored on the test split.

Each view also scores a **dev** split (``tasks.splits.fit_dev``: disjoint from the rows it fits on and from
test), reported under the prefix ``dev_``: the only scores decisions read (back-tracking, the best round),
so that no test row ever steers training or selects what is reported.

Both take the same arguments and return the task's metrics (``tasks.metrics``); the finetune view adds
``steps``, ``train_examples`` and ``stopped_early``. Held-out tasks train on only ``few_shot``
examples when that is set. Every cap draws a seeded random subset, the same in every round.
"""

from __future__ import annotations

from typing import Any, Mapping

from app.learning.probe import extract_features, probe_score
from app.learning.recipe import evaluate_model, finetune
from tasks.splits import fit_dev, subsample, train_dev

BUDGET_KEYS = ("max_steps", "epochs", "early_stopping")


def view_recipe(client: Mapping[str, Any], finetune_settings: Mapping[str, Any]) -> dict[str, Any]:
    """The contributor recipe with the finetune view's own budget (steps, epochs, early stopping)."""
    return {**client, **{key: finetune_settings[key] for key in BUDGET_KEYS}}


def probe_view(model, info, tokenizer, data, settings: Mapping[str, Any], recipe: Mapping[str, Any],
               seed: int, device, few_shot: int | None = None) -> dict[str, float]:
    probe = settings["probe"]
    fit, dev = fit_dev(data, few_shot or probe["max_train_examples"], int(probe["max_dev_examples"]),
                       float(probe["dev_fraction"]), seed)
    test = subsample(data["test"], probe["max_test_examples"], seed)
    fit_feats, test_feats, dev_feats = (
        extract_features(model.base_model, split, tokenizer, int(probe["batch_size"]), device)
        for split in (fit, test, dev))
    # The first-token probe is the paper's ColD-Frozen view, so its test metrics keep the plain names; the
    # mean-pooled probe's carry the prefix ``mean_pool_``, and the dev scores (the only ones decisions read)
    # ``dev_`` (strategies.records.SERIES and DEV_SERIES read them).
    metrics: dict[str, float] = {}
    for pooling, prefix in (("first_token", ""), ("mean_pool", "mean_pool_")):
        scores = probe_score(fit_feats[pooling], {"": test_feats[pooling], "dev_": dev_feats[pooling]},
                             info.is_regression, probe)
        metrics |= {f"{split}{prefix}{name}": value for split, split_scores in scores.items()
                    for name, value in split_scores.items()}
    return metrics


def finetune_view(model, info, tokenizer, data, settings: Mapping[str, Any], recipe: Mapping[str, Any],
                  seed: int, device, few_shot: int | None = None) -> dict[str, float]:
    view = settings["finetune"]
    recipe = view_recipe(recipe, view)
    stopping = recipe.get("early_stopping")
    limit = few_shot or view["max_train_examples"]
    if stopping:  # the dev split is set aside before the few-shot draw, so it never overlaps the k examples
        train, dev = train_dev(data, float(stopping["dev_fraction"]), int(stopping["dev_max_examples"]), seed)
        train = subsample(train, limit, seed)
    else:  # a dev split only for the decisions read on this view (the best round): the fit rows stay as they were
        train, dev = fit_dev(data, limit, int(view["max_dev_examples"]), float(view["dev_fraction"]), seed)
    test = subsample(data["test"], view["max_test_examples"], seed)
    stats = finetune(model, train, tokenizer, recipe, seed, device, dev if stopping else None, info.is_regression)
    batch = int(recipe["batch_size"])
    metrics = evaluate_model(model, test, tokenizer, batch, device, info.is_regression)
    dev_metrics = evaluate_model(model, dev, tokenizer, batch, device, info.is_regression)
    return {**metrics, **{f"dev_{name}": value for name, value in dev_metrics.items()},
            "steps": stats.steps, "train_examples": len(train), "stopped_early": float(stats.stopped_early)}


VIEW_FUNCTIONS = {"probe": probe_view, "finetune": finetune_view}
