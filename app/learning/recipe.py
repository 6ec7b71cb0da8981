"""Local finetuning: the contributor recipe (AdamW, linear schedule with warm-up, dynamic padding),
optionally with the paper's early stopping on a dev split.

Early stopping (``recipe["early_stopping"]``, the paper's rule): evaluate the dev split every
``every_examples`` training examples; stop once the best dev score has gained less than ``min_gain``
over the last ``patience_examples`` examples; the weights of the best evaluation are restored.

The optimisation itself (``RecipeOptimizer``, ``train_steps``) is shared with the centralised multitask
baseline (``app.run.multitask``), so both train with exactly the same recipe.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

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
    first_batch_at: float | None = None  # time.time() when the first batch was ready to train on


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


@dataclass
class RecipeOptimizer:
    """The recipe's optimisation of a set of parameters: AdamW with weight decay, a linear schedule that
    warms up over the first ``warmup_ratio`` of the steps, optional gradient clipping."""

    parameters: list[torch.nn.Parameter]  # each once, even where models share a body (clipping sees them all)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    max_grad_norm: float | None

    @classmethod
    def build(cls, parameters: list[torch.nn.Parameter], recipe: Mapping[str, Any],
              total_steps: int) -> RecipeOptimizer:
        optimizer = torch.optim.AdamW(parameters, lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"]))
        warmup = math.ceil(float(recipe["warmup_ratio"]) * total_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
        clip = recipe.get("max_grad_norm")
        return cls(parameters, optimizer, scheduler, None if clip is None else float(clip))

    def step(self, model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One optimisation step of ``model`` on ``batch`` (already on its device); returns the batch's loss."""
        loss = model(**batch).loss
        loss.backward()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def train_steps(batches: Iterable[tuple[Any, Mapping[str, torch.Tensor]]], optimizer: RecipeOptimizer,
                device) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """One optimisation step per ``(model, batch)`` of ``batches``; yields each batch (on ``device``) and its loss.

    A generator, so that each caller keeps its own bookkeeping between steps (early stopping, progress)
    and may stop by leaving its loop. Dropout draws from torch's global generator: seed it beforehand.
    """
    for model, batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        yield batch, optimizer.step(model, batch)


def endless(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches, epoch after epoch; a shuffling loader reshuffles each epoch with its generator."""
    return itertools.chain.from_iterable(itertools.repeat(loader))


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
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                        collate_fn=DataCollatorWithPadding(tokenizer))
    total = _budget(len(loader), recipe.get("max_steps"), recipe.get("epochs"))
    optimizer = RecipeOptimizer.build(list(model.parameters()), recipe, total)
    rule = recipe.get("early_stopping") if dev_set is not None else None
    stopper = EarlyStopping(rule["patience_examples"], rule["min_gain"]) if rule else None
    eval_every = max(1, math.ceil(int(rule["every_examples"]) / batch_size)) if rule else 0
    stats = TrainStats(0.0, 0, 0, 0.0)
    best_state = None
    model.to(device).train()
    torch.manual_seed(seed)  # dropout masks
    loss_sum = 0.0
    batches = ((model, batch) for batch in itertools.islice(endless(loader), total))  # the step budget
    for batch, loss in train_steps(_stamp_first(batches, stats), optimizer, device):
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
            if stats.stopped_early:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
        stats.best_dev = stopper.best
    model.eval()
    stats.loss = loss_sum / max(stats.steps, 1)
    stats.seconds = time.perf_counter() - start
    return stats


def _stamp_first(items: Iterator[Any], stats: TrainStats) -> Iterator[Any]:
    """``items``, noting in ``stats`` when the first one was ready (the start of training, data loading done)."""
    for item in items:
        if stats.first_batch_at is None:
            stats.first_batch_at = time.time()
        yield item


@torch.inference_mode()
def predict(model, dataset, tokenizer, batch_size: int, device, regression: bool) -> tuple[np.ndarray, np.ndarray]:
    """Predictions (class indices, or values for regression) and labels for a tokenised split."""
    was_training = model.training
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
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
