"""Lazy tokenisation (tasks/tokenize.py): a batch holds exactly what the tokenizer makes of its own rows, and only
the rows read are tokenised."""

from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from app.learning.model import load_tokenizer
from tasks.tokenize import tokenize_task


class Counting:
    """The real tokenizer, counting the texts it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.encoded = tokenizer, 0

    def __call__(self, texts, *args, **kwargs):
        self.encoded += len(texts)
        return self.tokenizer(texts, *args, **kwargs)


def _data(n=500):
    rows = {"text": [f"{i} example " + "word " * (i % 7) for i in range(n)],
            "text_pair": [f"pair {i}" for i in range(n)], "label": [i % 3 for i in range(n)]}
    return DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)})


def test_only_the_rows_a_loader_reads_are_tokenised_and_match_the_tokenizer(tiny_path):
    tokenizer = load_tokenizer(tiny_path)
    counting = Counting(tokenizer)
    data = tokenize_task(_data(), counting, max_length=8)
    subset = data["train"].shuffle(seed=0).select(range(40))  # as views.subsample draws a capped split
    loader = DataLoader(subset, batch_size=16, collate_fn=DataCollatorWithPadding(tokenizer))
    batch = next(iter(loader))
    assert counting.encoded == 16  # one batch read: 16 of 500 rows tokenised
    raw = _data()["train"].shuffle(seed=0).select(range(40))
    assert len({raw[i]["label"] for i in range(16)}) == 3
    for i in range(16):  # oracle: the tokenizer on that row alone, truncated to 8
        ids = tokenizer(raw[i]["text"], raw[i]["text_pair"], truncation=True, max_length=8)["input_ids"]
        assert batch["input_ids"][i, :len(ids)].tolist() == ids
        assert batch["attention_mask"][i].sum() == len(ids) and batch["labels"][i] == raw[i]["label"]
