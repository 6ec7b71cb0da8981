"""Linear probing ("ColD-Frozen"): a frozen body, a fresh linear head, its test (and dev) scores.

Features are computed once per call with the body in inference mode; the linear model is fitted by
scikit-learn (L-BFGS logistic regression, or ridge for regression tasks), which is far faster and
more stable on a few thousand examples than training a torch head by SGD.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from tasks.metrics import task_metrics


POOLINGS = ("first_token", "mean_pool")  # the paper's view first: it is the primary score


@torch.inference_mode()
def extract_features(body, dataset, tokenizer, batch_size: int, device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Both poolings of ``body``'s last hidden states in one pass: pooling -> (features, labels).

    ``first_token`` is what the paper's frozen classification head reads (RoBERTa's ``<s>``, BERT's
    ``[CLS]``); ``mean_pool`` averages the non-pad tokens, as sentence encoders such as MiniLM are trained.
    """
    body.to(device).eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer)
    )
    feats: dict[str, list[np.ndarray]] = {name: [] for name in POOLINGS}
    labels = []
    for batch in loader:
        labels.append(batch.pop("labels").numpy())
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = body(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        feats["first_token"].append(hidden[:, 0].float().cpu().numpy())
        feats["mean_pool"].append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy())
    y = np.concatenate(labels)
    return {name: (np.concatenate(parts), y) for name, parts in feats.items()}


def probe_score(train: tuple[np.ndarray, np.ndarray], scored: Mapping[str, tuple[np.ndarray, np.ndarray]],
                regression: bool, settings: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Metrics (``tasks.metrics``) of one linear model fitted on frozen training features, on each split of
    ``scored`` (name -> features and labels): one fit serves the test and the dev scores."""
    x_train, y_train = train
    if regression:
        model = make_pipeline(StandardScaler(), Ridge(alpha=float(settings.get("ridge_alpha", 1.0))))
    else:
        model = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=float(settings.get("C", 1.0)), max_iter=int(settings.get("max_iter", 1000))),
        )
    model.fit(x_train, y_train)
    return {name: task_metrics(model.predict(x), y, regression) for name, (x, y) in scored.items()}
