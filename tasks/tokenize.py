"""Turn a task's text columns into model inputs (no padding: batches are padded dynamically)."""

from __future__ import annotations

from datasets import DatasetDict


def tokenize_task(data: DatasetDict, tokenizer, max_length: int) -> DatasetDict:
    """Tokenise every split: ``text`` (and ``text_pair`` when present), truncated to ``max_length``.

    Returns splits with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer
    makes them) and ``labels``; the raw text columns are dropped.
    """
    pair = "text_pair" in data["train"].column_names

    def encode(batch):
        args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
        enc = tokenizer(*args, truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    return data.map(
        encode,
        batched=True,
        remove_columns=data["train"].column_names,
        load_from_cache_file=False,
        keep_in_memory=True,
        desc=None,
    )
