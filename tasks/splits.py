"""Which examples each step sees: seeded subsamples, few-shot sets and dev splits carved from train.

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
