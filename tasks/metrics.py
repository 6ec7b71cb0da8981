"""Task metrics, shared by both evaluation views and early stopping.

Classification: accuracy (the paper's metric) and macro-F1. Regression (STS-B): Pearson and Spearman
correlation. The first metric of each kind is the task's *primary* score: the one that is averaged,
plotted and used for early stopping.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score

CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
PRIMARY_METRICS = {"accuracy", "pearson"}  # what :func:`primary` reads: one of these is in every task's metrics
REGRESSION_METRICS = ("pearson", "spearman")


def task_metrics(predictions: np.ndarray, labels: np.ndarray, regression: bool) -> dict[str, float]:
    """All metrics of one task's predictions (class indices, or real values for regression)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if regression:
        if np.ptp(predictions) == 0 or np.ptp(labels) == 0:  # a constant predictor has no correlation
            return {"pearson": 0.0, "spearman": 0.0}
        return {"pearson": float(pearsonr(predictions, labels).statistic),
                "spearman": float(spearmanr(predictions, labels).statistic)}
    return {"accuracy": float((predictions == labels).mean()),
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0))}


def primary(metrics: dict[str, float]) -> float:
    """The score that is averaged and compared: accuracy, or Pearson r for regression."""
    return metrics["pearson"] if "pearson" in metrics else metrics["accuracy"]
