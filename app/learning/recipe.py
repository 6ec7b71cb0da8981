"""Local finetuning: the contributor recipe (AdamW, linear schedule with warm-up, dynamic padding),
optionally with the paper's early stopping on a dev split.

Early stopping (``recipe["early_stopping"]``, the paper's rule): evaluate the dev split every
``every_examples`` training examples; stop once the best dev score has gained less than ``min_gain``
over the last ``patience_examples`` examples; the weights of the best evaluation are restored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup

from tasks.metrics import primary, task_metrics


@dataclass
class TrainStats:
    loss: float  # mean training loss over the steps taken
    steps: int
    examples: int
    seconds: float
    stopped_early: bool = False
    best_dev: float | None = None  # primary dev score of the weights kept (early stopping only)
    dev_curve: list[tuple[int, float]] = field(default_factory=list)  # (examples seen, dev score)


class EarlyStopping:
    """The paper's rule: stop when the best score gained less than ``min_gain`` over ``patience`` examples."""

    def __init__(self, patience_examples: int, min_gain: float) -> None:
        self.patience, self.min_gain = int(patience_examples), float(min_gain)
        self.history: list[tuple[int, float]] = []  # (examples seen, best score so far)

    @property
    def best(self) -> float:
        return self.history[-1][1] if self.history else -math.inf

    def update(self, examples: int, score: float) -> bool:
        """Record a dev score after ``examples`` training examples; True when training should stop."""
        self.history.append((examples, max(score, self.best)))
        past = [best for seen, best in self.history if seen <= examples - self.patience]
        return bool(past) and self.best - past[-1] < self.min_gain


def finetune(model, train_set, tokenizer, recipe: Mapping[str, Any], seed: int, device,
             dev_set=None, regression: bool = False) -> TrainStats:
    """Finetune the whole model on ``train_set`` (tokenised) within the recipe's budget.

    The budget is ``max_steps`` optimizer steps and/or ``epochs`` passes, whichever ends first
    (a null entry means "no limit of that kind"; at least one must be set). With
    ``early_stopping`` in the recipe and a ``dev_set``, training may stop sooner (module docstring).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    batch_size = int(recipe["batch_size"])
    loader = DataLoader(train_set.with_format("torch"), batch_size=batch_size, shuffle=True, generator=generator,
                        collate_fn=DataCollatorWithPadding(tokenizer))
    total = _budget(len(loader), recipe.get("max_steps"), recipe.get("epochs"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]))
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(float(recipe["warmup_ratio"]) * total), total)
    rule = recipe.get("early_stopping") if dev_set is not None else None
    stopper = EarlyStopping(rule["patience_examples"], rule["min_gain"]) if rule else None
    eval_every = max(1, math.ceil(int(rule["every_examples"]) / batch_size)) if rule else 0
    stats = TrainStats(0.0, 0, 0, 0.0)
    best_state = None
    model.to(device).train()
    torch.manual_seed(seed)  # dropout masks
    loss_sum = 0.0
    while stats.steps < total and not stats.stopped_early:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            if recipe.get("max_grad_norm") is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(recipe["max_grad_norm"]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.examples += batch["labels"].shape[0]
            loss_sum += loss.item()
            last = stats.steps >= total
            if stopper is not None and (stats.steps % eval_every == 0 or last):
                score = primary(evaluate_model(model, dev_set, tokenizer, batch_size, device, regression))
                stats.dev_curve.append((stats.examples, score))
                if score > stopper.best:
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                stats.stopped_early = stopper.update(stats.examples, score) and not last
                model.train()
            if last or stats.stopped_early:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        stats.best_dev = stopper.best
    model.eval()
    stats.loss = loss_sum / max(stats.steps, 1)
    stats.seconds = time.perf_counter() - start
    return stats


@torch.inference_mode()
def predict(model, dataset, tokenizer, batch_size: int, device, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    """Predictions (class indices, or values for regression) and labels for a tokenised split."""
    was_training = model.training
    model.to(device).eval()
    loader = DataLoader(dataset.with_format("torch"), batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    predictions, labels = [], []
    for batch in loader:
        labels.append(batch.pop("labels").numpy())
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        predictions.append(logits[:, 0].numpy() if regression else logits.argmax(-1).numpy())
    model.train(was_training)
    return np.concatenate(predictions), np.concatenate(labels)


def evaluate_model(model, dataset, tokenizer, batch_size: int, device, regression: bool) -> dict[str, float]:
    """All task metrics (``tasks.metrics``) of the model on a tokenised split."""
    return task_metrics(*predict(model, dataset, tokenizer, batch_size, device, regression), regression)


def _budget(batches_per_epoch: int, max_steps: Any, epochs: Any) -> int:
    limits = []
    if max_steps is not None:
        limits.append(int(max_steps))
    if epochs is not None:
        limits.append(math.ceil(float(epochs) * batches_per_epoch))
    if not limits:
        raise ValueError("client recipe needs a budget: set max_steps and/or epochs")
    return max(1, min(limits))
