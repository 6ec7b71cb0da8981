"""Turn a task's text columns into model inputs, lazily (no padding: batches are padded dynamically)."""

from __future__ import annotations

from datasets import DatasetDict


def tokenize_task(data: DatasetDict, tokenizer, max_length: int) -> DatasetDict:
    """Every split as model inputs: ``text`` (and ``text_pair`` when present), truncated to ``max_length``.

    Rows come out with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them) and
    ``labels``, as plain lists for a padding collator (``DataCollatorWithPadding``). Tokenisation is **lazy**:
    ``datasets``' ``with_transform`` runs the tokenizer on the rows a batch reads, when it reads them, and
    ``shuffle``/``select``/``train_test_split`` keep the transform. So a message that trains on 480 examples of
    IMDB's 25,000, or probes 400 + 200 of them, tokenises those, not the whole dataset; in a deployment, where
    every message is a fresh process, that is paid per message. The inputs are the same as an eager ``map``'s:
    a fast tokenizer encodes each example on its own, whatever batch it is in.
    """
    pair = "text_pair" in data["train"].column_names

    def encode(batch):
        args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
        return {**tokenizer(*args, truncation=True, max_length=max_length), "labels": batch["label"]}

    return data.with_transform(encode)
