"""Turn a task's text columns into model inputs, lazily (no padding: batches are padded dynamically)."""

from __future__ import annotations

from datasets import DatasetDict

from tasks.spec import TaskDataError


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


def _head(text: str, max_chars: int) -> str:
    """The start of ``text``, cut at a space (half a word could read as unknown): the model reads only the first
    ``max_length`` tokens anyway, and a long review costs its whole length to tokenize."""
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0]


def unknown_fraction(data: DatasetDict, tokenizer, max_rows: int = 300, max_chars: int = 400) -> float | None:
    """The fraction of the tokens of ``max_rows`` train rows (evenly spaced over the split, so a file sorted by label
    is sampled across; the first ``max_chars`` characters of each text) that ``tokenizer`` maps to its unknown token;
    None for a tokenizer without one (byte-level BPE, which can encode any text). ``text`` and, when present,
    ``text_pair`` are counted; special tokens are not."""
    unk = tokenizer.unk_token_id
    train = data["train"]
    if unk is None or train.num_rows == 0:
        return None
    step = max(1, train.num_rows // max_rows)
    rows = train.select(range(0, train.num_rows, step)[:max_rows])
    texts = list(rows["text"]) + (list(rows["text_pair"]) if "text_pair" in rows.column_names else [])
    ids = tokenizer([_head(t, max_chars) for t in texts], add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    return sum(x.count(unk) for x in ids) / total if total else 0.0


def check_known_tokens(fractions: dict[str, float | None], max_fraction: float | None, model: str) -> None:
    """TaskDataError naming every task whose unknown-token fraction (:func:`unknown_fraction`) is above
    ``max_fraction`` (None: no limit), with its fraction and the fix. A model that reads most of a task as ``<unk>``
    trains and scores at chance while the run reports success, so this is refused before anything starts."""
    over = {name: f for name, f in fractions.items() if f is not None and max_fraction is not None and f > max_fraction}
    if over:
        listing = ", ".join(f"{name!r} {f:.0%}" for name, f in over.items())
        raise TaskDataError(
            f"{len(over)} task(s) have most of their tokens unknown to the tokenizer of model {model!r} (sampled train "
            f"rows; above tasks.max_unknown_fraction={max_fraction}): {listing}. The model cannot read this text and "
            "would score at chance. Use a model whose tokenizer covers it (e.g. model=minilm, or a local Hugging Face "
            "model: model.name_or_path=/path/to/model), or raise tasks.max_unknown_fraction.")
