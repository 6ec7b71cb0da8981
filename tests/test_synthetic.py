"""Tests for the synthetic task generator (tasks/synthetic.py)."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from tasks.spec import TaskDataError, TaskInfo
from tasks.synthetic import (
    default_heldout,
    load_synthetic,
    synthetic_corpus,
    synthetic_task_infos,
    synthetic_vocabulary,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(train_size=200, test_size=100)


def _digest(dd) -> int:
    h = 0
    for split in ("train", "test"):
        for row in dd[split]:
            h = zlib.crc32(repr(sorted(row.items())).encode(), h)
    return h


def test_35_tasks_with_2_to_6_labels_and_both_kinds():
    infos = synthetic_task_infos()
    assert len(infos) == 35
    assert all(isinstance(i, TaskInfo) for i in infos)
    names = [i.name for i in infos]
    assert len(set(names)) == 35
    assert all(re.fullmatch(r"syn\d\d_[a-z0-9_]+", n) and len(n) <= 24 for n in names)
    assert all(2 <= i.num_labels <= 6 for i in infos)
    assert all(len(i.label_names) == i.num_labels for i in infos)
    assert {i.num_labels for i in infos} == {2, 3, 4, 5, 6}
    n_pair = sum(i.sentence_pair for i in infos)
    assert 5 <= n_pair <= 30
    # names and order do not depend on the seed; a prefix keeps its names
    assert [i.name for i in synthetic_task_infos(seed=3)] == names
    assert [i.name for i in synthetic_task_infos(num_tasks=10)] == names[:10]


def test_default_heldout_is_seven_existing_tasks_spread_over_families():
    names = [i.name for i in synthetic_task_infos()]
    held = default_heldout()
    assert len(held) == 7 and len(set(held)) == 7
    assert set(held) <= set(names)
    assert held == default_heldout(seed=0)
    held_pairs = [n for n in held if next(i for i in synthetic_task_infos() if i.name == n).sentence_pair]
    assert 1 <= len(held_pairs) < 7
    # smaller task sets still get held-out names among their own tasks
    small = default_heldout(num_tasks=12, num_heldout=3)
    assert len(small) == 3 and set(small) <= set(names[:12])


def test_deterministic_for_seed_and_different_across_seeds():
    name = "syn18_paraphrase"
    a = load_synthetic(name, seed=0, **SMALL)
    b = load_synthetic(name, seed=0, **SMALL)
    c = load_synthetic(name, seed=1, **SMALL)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    assert a["train"]["text"] != a["test"]["text"]
    assert synthetic_vocabulary(0) == synthetic_vocabulary(0)
    assert synthetic_vocabulary(0) != synthetic_vocabulary(1)


def test_deterministic_across_processes():
    """Another interpreter, with another hash seed, makes the very same data (no use of hash())."""
    code = (
        "import zlib;from tasks.synthetic import load_synthetic, synthetic_vocabulary;"
        "d=load_synthetic('syn03_same_topic', seed=5, train_size=50, test_size=20);"
        "print(zlib.crc32(repr([list(d[s]['text']) + list(d[s]['text_pair']) + list(d[s]['label']) for s in ('train','test')]).encode()),"
        " zlib.crc32(' '.join(synthetic_vocabulary(5)).encode()))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    d = load_synthetic("syn03_same_topic", seed=5, train_size=50, test_size=20)
    here = zlib.crc32(
        repr([list(d[s]["text"]) + list(d[s]["text_pair"]) + list(d[s]["label"]) for s in ("train", "test")]).encode()
    )
    assert out.stdout.split() == [str(here), str(zlib.crc32(" ".join(synthetic_vocabulary(5)).encode()))]


@pytest.mark.parametrize("seed", [0, 7])
def test_every_task_columns_labels_balance_and_length(seed):
    vocab = set(synthetic_vocabulary(seed))
    for info in synthetic_task_infos(seed):
        dd = load_synthetic(info.name, seed=seed, train_size=300, test_size=120)
        assert set(dd) == {"train", "test"}
        assert len(dd["train"]) == 300 and len(dd["test"]) == 120
        cols = {"text", "label"} | ({"text_pair"} if info.sentence_pair else set())
        for split in ("train", "test"):
            ds = dd[split]
            assert set(ds.column_names) == cols, info.name
            labels = np.asarray(ds["label"])
            assert labels.min() >= 0 and labels.max() < info.num_labels
            counts = collections.Counter(labels.tolist())
            assert len(counts) == info.num_labels, info.name  # every label occurs
            assert max(counts.values()) / len(labels) <= 0.6, info.name
            for col in cols - {"label"}:
                for text in ds[col]:
                    words = text.split()
                    assert 4 <= len(words) <= 20, (info.name, text)
                    assert set(words) <= vocab
                    assert text == text.lower()


def test_unknown_name_raises_task_data_error():
    with pytest.raises(TaskDataError) as err:
        load_synthetic("syn99_nonsense")
    msg = str(err.value)
    assert "syn99_nonsense" in msg and "syn00_" in msg
    with pytest.raises(TaskDataError):
        load_synthetic("syn34_topic_qty", num_tasks=10)  # exists only in the full set


def test_vocabulary_and_corpus():
    vocab = synthetic_vocabulary()
    assert 100 <= len(vocab) <= 500
    assert len(set(vocab)) == len(vocab)
    assert all(re.fullmatch(r"[a-z]+", w) for w in vocab)
    corpus = synthetic_corpus(num_sentences=300)
    assert len(corpus) == 300
    assert set(" ".join(corpus).split()) == set(vocab)
    assert corpus == synthetic_corpus(num_sentences=300)


def _bow_accuracy(name: str) -> tuple[float, float]:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    dd = load_synthetic(name, seed=0, train_size=1000, test_size=400)
    vec = CountVectorizer(token_pattern=r"\S+")
    xtr = vec.fit_transform(dd["train"]["text"])
    xte = vec.transform(dd["test"]["text"])
    clf = LogisticRegression(max_iter=1000).fit(xtr, dd["train"]["label"])
    acc = float((clf.predict(xte) == np.asarray(dd["test"]["label"])).mean())
    k = len(set(dd["train"]["label"]))
    return acc, 1.0 / k


@pytest.mark.parametrize("name,margin", [("syn01_topic", 0.4), ("syn15_negation", 0.3), ("syn12_tense", 0.4), ("syn00_sentiment", 0.1)])
def test_learnable_by_bag_of_words(name, margin):
    acc, chance = _bow_accuracy(name)
    assert acc >= chance + margin, (name, acc, chance)


def test_negation_makes_sentiment_compositional():
    """Lexical polarity alone does not decide sentiment: negation flips it (XOR), so it needs composition."""
    dd = load_synthetic("syn00_sentiment", seed=0, train_size=400, test_size=10)
    lex = load_synthetic("syn10_polarity_lex", seed=0, train_size=400, test_size=10)
    # same language: every sentence of both tasks is made of the same words, but the labels differ in how they relate
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = CountVectorizer(token_pattern=r"\S+").fit(list(lex["train"]["text"]) + list(dd["train"]["text"]))
    clf = LogisticRegression(max_iter=1000).fit(vec.transform(lex["train"]["text"]), lex["train"]["label"])
    agree = (clf.predict(vec.transform(dd["train"]["text"])) == np.asarray(dd["train"]["label"])).mean()
    assert 0.55 < agree < 0.9  # lexical polarity predicts sentiment, but negated sentences go the other way
