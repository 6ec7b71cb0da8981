"""Which examples each step sees: seeded subsamples, few-shot sets, dev splits (early stopping, the views' decisions).

Files are often ordered (by label, by source), so a cap on the number of examples always takes a
seeded random subset, never the first rows.
"""

from __future__ import annotations

from datasets import Dataset, DatasetDict


def subsample(split: Dataset, limit: int | None, seed: int) -> Dataset:
    """At most ``limit`` examples of ``split``, drawn at random with ``seed`` (the same draw every call)."""
    if limit is None or len(split) <= limit:
        return split
    return split.shuffle(seed=seed).select(range(int(limit)))


def train_dev(data: DatasetDict, fraction: float, max_examples: int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, dev): the task's validation split when it has one, else a seeded slice carved from train.

    The dev set has at most ``max_examples``; a carved one is ``fraction`` of train (the paper's authors held out
    a few percent, or 1K examples for large sets), and at least one example; it leaves train.
    A task whose test labels are hidden already uses its original validation split as test
    (``tasks.local`` / ``tasks.hub``), so its dev set is carved here.
    """
    if "validation" in data:
        return data["train"], subsample(data["validation"], max_examples, seed)
    train = data["train"]
    size = min(int(max_examples), max(1, round(float(fraction) * len(train))))
    if size >= len(train):
        raise ValueError(f"cannot carve a dev split of {size} examples from a train split of {len(train)}")
    parts = train.train_test_split(test_size=size, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def fit_dev(data: DatasetDict, limit: int | None, dev_max: int, dev_fraction: float,
            seed: int) -> tuple[Dataset, Dataset]:
    """(fit, dev) of an evaluation view: the rows its fresh model is trained on, and the rows decisions read.

    Decisions (back-tracking, the best round) must never read a test row, nor a row the model was fitted on, and
    the reported figures should not move: so ``fit`` is ``subsample(train, limit, seed)``, the draw the views have
    always made, and dev comes from elsewhere, at most ``dev_max`` rows:

    * the task's validation split, when it has one (as ``train_dev``);
    * else the train rows that draw leaves, when at least ``dev_max`` are left: the next rows of the same seeded
      shuffle, so they are disjoint from ``fit`` by construction;
    * else (train too small to spare them) ``train_dev`` carves dev first, ``dev_fraction`` of train, and ``fit``
      is drawn from the rest: only such a small task's fit rows change.
    """
    train = data["train"]
    if "validation" in data:
        return subsample(train, limit, seed), subsample(data["validation"], dev_max, seed)
    if limit is not None and len(train) - int(limit) >= dev_max:
        order = train.shuffle(seed=seed)  # subsample's draw: its first ``limit`` rows are exactly ``fit``
        return order.select(range(int(limit))), order.select(range(int(limit), int(limit) + int(dev_max)))
    rest, dev = train_dev(DatasetDict(train=train), dev_fraction, dev_max, seed)
    return subsample(rest, limit, seed), dev
