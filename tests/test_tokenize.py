"""Lazy tokenisation (tasks/tokenize.py): a batch holds exactly what the tokenizer makes of its own rows, and only
the rows read are tokenised."""

import pytest
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


# ------------------------------------------------------------------ text the model's tokenizer cannot read
KNOWN = ["gloukek", "gokoul", "vebek", "laglaigem"]  # words of the tiny model's (synthetic) vocabulary


def _texts(texts, pairs=None):
    rows = {"text": texts, "label": [0] * len(texts), **({"text_pair": pairs} if pairs else {})}
    return DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)})


def test_the_unknown_fraction_counts_the_tokens_read_as_unk(tiny_path):
    from tasks.tokenize import unknown_fraction

    tokenizer = load_tokenizer(tiny_path)
    assert all(tokenizer.convert_tokens_to_ids(w) != tokenizer.unk_token_id for w in KNOWN)
    # hand count (word-level tokenizer: one token per word): 2 + 1 unknown words of 4 + 2 + 3 + 1 = 10 tokens
    data = _texts(["gloukek gokoul zzqx vebek", "qqqq laglaigem"], pairs=["vebek wqwq gokoul", "gloukek"])
    assert unknown_fraction(data, tokenizer) == 3 / 10
    assert unknown_fraction(_texts([" ".join(KNOWN)] * 5), tokenizer) == 0.0
    # the sample is spread over the split: a file sorted with its unreadable rows last is still seen
    sorted_rows = _texts([" ".join(KNOWN)] * 500 + ["the film was wonderful"] * 500)
    assert unknown_fraction(sorted_rows, tokenizer, max_rows=100) == 0.5  # 50 rows of each: 200 of 400 tokens


def test_mostly_unknown_text_is_refused_naming_the_tasks_the_fractions_and_the_fix():
    from tasks.spec import TaskDataError
    from tasks.tokenize import check_known_tokens

    with pytest.raises(TaskDataError) as info:
        check_known_tokens({"sst2": 1.0, "synthetic": 0.0, "imdb": 0.75, "gpt2-like": None}, 0.5, "tiny")
    message = str(info.value)
    for needle in ("2 task(s)", "'sst2' 100%, 'imdb' 75%", "model 'tiny'", "tasks.max_unknown_fraction=0.5",
                   "model=minilm"):
        assert needle in message, message
    assert "synthetic" not in message and "gpt2-like" not in message
    check_known_tokens({"sst2": 1.0}, None, "tiny")  # null: no limit
    check_known_tokens({"a": 0.5, "b": 0.25}, 0.5, "tiny")  # at the limit is not above it


def test_coldfusion_sim_refuses_real_text_with_the_tiny_model_before_anything_starts(tmp_path, capsys, monkeypatch,
                                                                                     cache_dir):
    """The issue's case: the tiny model's word-level tokenizer on English text. Exit 2 before any SuperLink."""
    import json

    import app.run.launch as launch
    from rich.console import Console

    def tripwire(*_args, **_kwargs):
        raise AssertionError("the launcher started a SuperLink")
    monkeypatch.setattr(launch, "simulation_superlink", tripwire)
    monkeypatch.setattr(launch, "console", Console(width=10_000))
    for name, text in (("readable", " ".join(KNOWN)), ("english", "the film was wonderful")):
        root = tmp_path / "data" / name
        root.mkdir(parents=True)
        (root / "meta.json").write_text(json.dumps({"label_names": ["neg", "pos"], "sentence_pair": False}))
        for split in ("train", "test"):
            (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{text}", "label": i % 2}) + "\n"
                                                         for i in range(20)))
    code = launch.main(["tasks=shared_data", f"tasks.data_root={tmp_path / 'data'}", "tasks.contributing=[readable,english]",
                        "tasks.heldout=[]", "min_contributions=1", f"model.cache_dir={cache_dir}",
                        "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 2, out
    assert "error: 1 task(s) have most of their tokens unknown to the tokenizer of model 'tiny'" in out
    assert "'english' 100%" in out and "'readable'" not in out and "model=minilm" in out
