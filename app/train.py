"""Local finetuning: the contributor recipe (AdamW, linear schedule with warm-up, dynamic padding)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup


@dataclass
class TrainStats:
    loss: float  # mean training loss over the steps taken
    steps: int
    examples: int
    seconds: float


def finetune(model, train_set, tokenizer, recipe: Mapping[str, Any], seed: int, device) -> TrainStats:
    """Finetune the whole model on ``train_set`` (tokenised) within the recipe's budget.

    The budget is ``max_steps`` optimizer steps and/or ``epochs`` passes, whichever ends first
    (a null entry means "no limit of that kind"; at least one must be set).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        train_set.with_format("torch"),
        batch_size=int(recipe["batch_size"]),
        shuffle=True,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )
    total = _budget(len(loader), recipe.get("max_steps"), recipe.get("epochs"))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=float(recipe["lr"]), weight_decay=float(recipe["weight_decay"])
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(float(recipe["warmup_ratio"]) * total), total
    )
    model.to(device).train()
    torch.manual_seed(seed)  # dropout masks
    steps, examples, loss_sum = 0, 0, 0.0
    while steps < total:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            loss.backward()
            if recipe.get("max_grad_norm") is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(recipe["max_grad_norm"]))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            examples += batch["labels"].shape[0]
            loss_sum += loss.item()
            if steps >= total:
                break
    model.eval()
    return TrainStats(loss_sum / max(steps, 1), steps, examples, time.perf_counter() - start)


def _budget(batches_per_epoch: int, max_steps: Any, epochs: Any) -> int:
    limits = []
    if max_steps is not None:
        limits.append(int(max_steps))
    if epochs is not None:
        limits.append(math.ceil(float(epochs) * batches_per_epoch))
    if not limits:
        raise ValueError("client recipe needs a budget: set max_steps and/or epochs")
    return max(1, min(limits))
