"""A seeded family of 35 synthetic text-classification tasks over a small artificial language.

Why this file is long: it is one generator (a lexicon, a sentence grammar and the 35 label functions over
the same hidden attributes); split, its parts would only be read together.

The language
------------
Every word is a lower-case pseudo-word ("bako", "tirel") drawn for the seed, and every word carries
hidden attributes.  A sentence is a main clause, optionally followed by a second clause::

    [place-phrase] [det] NUM [adj] NOUN AUX [NEG] [INT|HEDGE] PRED [place-phrase] [CONJ NOUN2 AUX2 [NEG2] PRED2] [filler]

* ``NOUN`` belongs to one of 6 *topics* (topics 0-2 form one topic group, 3-5 the other) and comes
  in a singular and a plural form; ``NUM`` is one of 5 numeral classes (1..5, two synonyms each)
  that agrees with the noun's number.  -> attributes *topic*, *quantity*, *plural*.
* ``AUX`` marks one of 3 *tenses*.  A place phrase (preposition + place word) marks one of 4
  *locations*; it sits either at the start or after the predicate.
* ``PRED`` has a lexical *polarity*: positive, negative or neutral.  ``NEG`` (optional negator)
  flips it: the *sentiment* of the clause is ``polarity XOR negation`` (neutral stays neutral).
  An intensifier ``INT`` (as opposed to a hedge word or nothing) marks *intensity*.
* The second clause has its own noun (topic), negation and predicate, i.e. its own sentiment; it
  acts as a distractor for the main-clause tasks and as the subject of the clause tasks.
* Determiners, descriptive adjectives and fillers carry no attribute (noise).

Task families (``FAMILIES``)
---------------------------
Each task is a function of the hidden attributes of one sentence, or of two (sentence-pair tasks,
column ``text_pair``); labels are sampled uniformly first and a matching sentence is then drawn,
so every task is label-balanced.

* **sentiment** (S): sentiment, 3-way sentiment, lexical polarity, negation, intensity,
  sentiment x intensity, 5-point sentiment strength.
* **topic** (T): topic, topic group, topic mod 3, location, topic group x sentiment, topic of
  the second clause, topic group x location.
* **quantity** (Q): quantity, plural, tense, parity, "many", quantity bucket.
* **clause / compositional** (C): sentiment of the second clause, contrast between the clauses,
  sentiment x number, tense x sentiment, negation x intensity, number of positive clauses,
  topic group x quantity bucket.
* **pair** (P): same topic, same sentiment, quantity comparison, paraphrase (same topic, quantity and
  sentiment, possibly expressed as "not good" vs "bad"), topic relation, sentiment relation,
  same tense, same location.

Why they transfer
-----------------
All 35 tasks read the same handful of latent features, and the interesting ones are
*compositional*: sentiment is an XOR of a predicate word and a negator, it belongs to a clause
(position matters because a second clause carries its own topic and sentiment), and the pair tasks
compare features across the two segments.  A randomly initialised encoder essentially exposes a
bag of words, on which a linear probe cannot read XORs, clause membership or cross-segment
equality; an encoder trained on some tasks of a family learns to compute those features, which a
linear probe then reads for the other tasks of the family (and for the compositions that mix
families).  The default held-out tasks (``default_heldout``) take one or two tasks from every
family, each with several related contributing tasks.

Everything is deterministic for a seed: words and data come from ``random.Random`` instances
seeded with integers derived through ``zlib.crc32`` (never Python's ``hash``).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from tasks.spec import TaskDataError, TaskInfo

# ----------------------------------------------------------------------------------------------
# the language

N_TOPICS = 6
NOUNS_PER_TOPIC = 6
N_QUANT = 5
N_TENSES = 3
N_LOCS = 4
NEG, POS, NEU = 0, 1, 2
P_NEGATION = 0.3  # a clause is negated this often (unless a task's label needs otherwise)

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "ch", "tr", "pl", "br", "gl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "l", "r", "s", "m", "k"]


def _seed_int(*parts: object) -> int:
    return zlib.crc32(":".join(str(p) for p in parts).encode("utf-8"))


def _pseudo_word(rng: random.Random) -> str:
    n_syll = rng.choice((2, 2, 2, 3))
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syll)) + rng.choice(_CODAS)


@dataclass(frozen=True)
class _Lexicon:
    nouns: tuple  # [topic][k] -> (singular, plural)
    nums: tuple  # [q-1] -> synonyms
    dets: tuple
    adjs: tuple  # neutral descriptive adjectives (noise)
    aux: tuple  # [tense] -> synonyms
    negs: tuple
    ints: tuple  # intensifiers
    hedges: tuple
    preds: tuple  # [polarity] -> synonyms (NEG, POS, NEU)
    preps: tuple
    places: tuple  # [loc] -> synonyms
    conjs: tuple
    fillers: tuple

    def all_words(self) -> list[str]:
        out: list[str] = []
        for topic in self.nouns:
            for sg, pl in topic:
                out += [sg, pl]
        for group in (self.nums, self.aux, self.preds, self.places):
            for syns in group:
                out += list(syns)
        for flat in (self.dets, self.adjs, self.negs, self.ints, self.hedges, self.preps, self.conjs, self.fillers):
            out += list(flat)
        return out


@lru_cache(maxsize=16)
def _lexicon(seed: int) -> _Lexicon:
    rng = random.Random(_seed_int("synthetic-lexicon", seed))
    used: set[str] = set()

    def fresh(k: int) -> tuple:
        words = []
        while len(words) < k:
            w = _pseudo_word(rng)
            if w not in used and 3 <= len(w) <= 9:
                used.add(w)
                words.append(w)
        return tuple(words)

    nouns = []
    for _ in range(N_TOPICS):
        topic = []
        for stem in fresh(NOUNS_PER_TOPIC):
            plural = stem + rng.choice(("en", "i", "ar"))
            while plural in used:
                plural = plural + "a"
            used.add(plural)
            topic.append((stem, plural))
        nouns.append(tuple(topic))
    return _Lexicon(
        nouns=tuple(nouns),
        nums=tuple(fresh(2) for _ in range(N_QUANT)),
        dets=fresh(4),
        adjs=fresh(10),
        aux=tuple(fresh(3) for _ in range(N_TENSES)),
        negs=fresh(3),
        ints=fresh(4),
        hedges=fresh(3),
        preds=(fresh(6), fresh(6), fresh(5)),
        preps=fresh(4),
        places=tuple(fresh(3) for _ in range(N_LOCS)),
        conjs=fresh(3),
        fillers=fresh(8),
    )


# ----------------------------------------------------------------------------------------------
# hidden attributes of a sentence and their rendering

# attribute tuple indices
T, Q, P, N, I, TENSE, LOC, HAS2, T2, P2, N2 = range(11)


def _sample_attrs(rng: random.Random, polar: bool, has2: float, base: list | None = None, keep: float = 0.0) -> list:
    """Draw a sentence's attributes; with ``base``, each attribute is copied from it with probability ``keep``."""
    r = rng.random
    a = [
        rng.randrange(N_TOPICS),
        rng.randrange(1, N_QUANT + 1),
        rng.randrange(2) if polar else rng.randrange(3),
        int(r() < P_NEGATION),
        int(r() < 0.5),
        rng.randrange(N_TENSES),
        rng.randrange(N_LOCS),
        int(r() < has2),
        rng.randrange(N_TOPICS),
        rng.randrange(2) if polar else rng.randrange(3),
        int(r() < P_NEGATION),
    ]
    if base is not None:
        for k in range(len(a)):
            if k != HAS2 and r() < keep:
                a[k] = base[k]
    return a


def _sent(p: int, n: int) -> int:
    """Effective sentiment of a clause: negation flips positive/negative, neutral stays neutral."""
    return NEU if p == NEU else p ^ n


def _render(a: list, lex: _Lexicon, rng: random.Random) -> str:
    r, ch = rng.random, rng.choice
    words: list[str] = []
    place = [ch(lex.preps), ch(lex.places[a[LOC]])]
    place_first = r() < 0.4
    if place_first:
        words += place
    if r() < 0.6:
        words.append(ch(lex.dets))
    q = a[Q]
    if q > 1 or r() < 0.5:
        words.append(ch(lex.nums[q - 1]))
    if r() < 0.3:
        words.append(ch(lex.adjs))
    words.append(ch(lex.nouns[a[T]])[1 if q > 1 else 0])
    words.append(ch(lex.aux[a[TENSE]]))
    if a[N]:
        words.append(ch(lex.negs))
    if a[I]:
        words.append(ch(lex.ints))
    elif r() < 0.4:
        words.append(ch(lex.hedges))
    words.append(ch(lex.preds[a[P]]))
    if not place_first:
        words += place
    if a[HAS2]:
        words.append(ch(lex.conjs))
        if r() < 0.5:
            words.append(ch(lex.dets))
        words.append(ch(lex.nouns[a[T2]])[0])
        words.append(ch(lex.aux[rng.randrange(N_TENSES)]))
        if a[N2]:
            words.append(ch(lex.negs))
        words.append(ch(lex.preds[a[P2]]))
    if r() < 0.3:
        words.insert(rng.randrange(len(words) + 1), ch(lex.fillers))
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# the tasks


@dataclass(frozen=True)
class _TaskDef:
    short: str
    family: str
    labels: tuple[str, ...]
    fn: Callable  # single: fn(a) -> label or None ; pair: fn(a, b) -> label or None
    pair: bool = False
    polar: bool = False  # predicates only positive/negative
    has2: float = 0.25  # probability of a second clause
    keep: float = 0.5  # pair tasks: probability that B copies each attribute of A


def _grp(t: int) -> int:
    return t // 3


def _qbucket(q: int) -> int:
    return 0 if q <= 2 else (1 if q == 3 else 2)


def _strength(a: list) -> int:
    s = _sent(a[P], a[N])
    if s == NEU:
        return 2
    return (3 + a[I]) if s == POS else (1 - a[I])


def _cmp(x: int, y: int) -> int:
    return 0 if x < y else (1 if x == y else 2)


_S3 = ("negative", "positive", "neutral")
_SENT2 = ("negative", "positive")

_TASKS: tuple[_TaskDef, ...] = (
    # 00-04
    _TaskDef("sentiment", "S", _SENT2, lambda a: _sent(a[P], a[N]), polar=True),
    _TaskDef("topic", "T", tuple(f"topic{k}" for k in range(N_TOPICS)), lambda a: a[T]),
    _TaskDef("quantity", "Q", tuple(str(k) for k in range(1, N_QUANT + 1)), lambda a: a[Q] - 1),
    _TaskDef("same_topic", "P", ("different", "same"), lambda a, b: int(a[T] == b[T]), pair=True, keep=0.3),
    _TaskDef("clause2_sent", "C", _SENT2, lambda a: _sent(a[P2], a[N2]), polar=True, has2=1.0),
    # 05-09
    _TaskDef("sentiment3", "S", _S3, lambda a: _sent(a[P], a[N])),
    _TaskDef("topic_group", "T", ("group0", "group1"), lambda a: _grp(a[T])),
    _TaskDef("plural", "Q", ("singular", "plural"), lambda a: int(a[Q] > 1)),
    _TaskDef("same_sent", "P", ("different", "same"), lambda a, b: int(_sent(a[P], a[N]) == _sent(b[P], b[N])), pair=True, polar=True),
    _TaskDef("contrast", "C", ("agree", "contrast"), lambda a: int(_sent(a[P], a[N]) != _sent(a[P2], a[N2])), polar=True, has2=1.0),
    # 10-14
    _TaskDef("polarity_lex", "S", _SENT2, lambda a: a[P], polar=True),
    _TaskDef("location", "T", tuple(f"loc{k}" for k in range(N_LOCS)), lambda a: a[LOC]),
    _TaskDef("tense", "Q", ("past", "present", "future"), lambda a: a[TENSE]),
    _TaskDef("quantity_cmp", "P", ("fewer", "equal", "more"), lambda a, b: _cmp(b[Q], a[Q]), pair=True, keep=0.3),
    _TaskDef("sent_number", "C", ("neg_sg", "neg_pl", "pos_sg", "pos_pl"), lambda a: 2 * _sent(a[P], a[N]) + int(a[Q] > 1), polar=True),
    # 15-19
    _TaskDef("negation", "S", ("affirmed", "negated"), lambda a: a[N]),
    _TaskDef("topic_sent", "T", ("g0_neg", "g0_pos", "g1_neg", "g1_pos"), lambda a: 2 * _grp(a[T]) + _sent(a[P], a[N]), polar=True),
    _TaskDef("parity", "Q", ("even", "odd"), lambda a: a[Q] % 2),
    _TaskDef("paraphrase", "P", ("different", "paraphrase"),
             lambda a, b: int(a[T] == b[T] and a[Q] == b[Q] and _sent(a[P], a[N]) == _sent(b[P], b[N])), pair=True, keep=0.7),
    _TaskDef("tense_sent", "C", tuple(f"{t}_{s}" for t in ("past", "present", "future") for s in _SENT2),
             lambda a: 2 * a[TENSE] + _sent(a[P], a[N]), polar=True),
    # 20-24
    _TaskDef("sent_intensity", "S", ("strong_neg", "mild_neg", "mild_pos", "strong_pos"),
             lambda a: (1 - a[I]) if _sent(a[P], a[N]) == NEG else 2 + a[I], polar=True),
    _TaskDef("topic_mod3", "T", ("m0", "m1", "m2"), lambda a: a[T] % 3),
    _TaskDef("many", "Q", ("few", "many"), lambda a: int(a[Q] >= 3)),
    _TaskDef("topic_relation", "P", ("same_topic", "same_group", "other_group"),
             lambda a, b: 0 if a[T] == b[T] else (1 if _grp(a[T]) == _grp(b[T]) else 2), pair=True, keep=0.3),
    _TaskDef("neg_intensity", "C", ("plain", "intense", "negated", "negated_intense"), lambda a: 2 * a[N] + a[I]),
    # 25-29
    _TaskDef("intensity", "S", ("mild", "intense"), lambda a: a[I]),
    _TaskDef("clause2_topic", "T", tuple(f"topic{k}" for k in range(N_TOPICS)), lambda a: a[T2], has2=1.0),
    _TaskDef("qty_bucket", "Q", ("few", "some", "lots"), lambda a: _qbucket(a[Q])),
    _TaskDef("sent_relation", "P", ("agree", "oppose", "unrelated"),
             lambda a, b: 2 if a[T] != b[T] else int(_sent(a[P], a[N]) != _sent(b[P], b[N])), pair=True, polar=True, keep=0.5),
    _TaskDef("pos_clauses", "C", ("none", "one", "both"),
             lambda a: int(_sent(a[P], a[N]) == POS) + int(_sent(a[P2], a[N2]) == POS), polar=True, has2=1.0),
    # 30-34
    _TaskDef("sent_strength", "S", ("strong_neg", "neg", "neutral", "pos", "strong_pos"), _strength),
    _TaskDef("topic_loc", "T", ("g0_in", "g0_out", "g1_in", "g1_out"), lambda a: 2 * _grp(a[T]) + a[LOC] // 2),
    _TaskDef("same_tense", "P", ("different", "same"), lambda a, b: int(a[TENSE] == b[TENSE]), pair=True, keep=0.3),
    _TaskDef("same_location", "P", ("different", "same"), lambda a, b: int(a[LOC] == b[LOC]), pair=True, keep=0.3),
    _TaskDef("topic_qty", "C", tuple(f"g{g}_{b}" for g in (0, 1) for b in ("few", "some", "lots")),
             lambda a: 3 * _grp(a[T]) + _qbucket(a[Q])),
)

MAX_TASKS = len(_TASKS)
FAMILIES = {"S": "sentiment", "T": "topic", "Q": "quantity", "C": "clause/compositional", "P": "pair"}

# one or two per family; each has several related contributing tasks
_HELDOUT_PREFERENCE = (
    "sent_intensity",  # S: sentiment, intensity, neg_intensity, sent_strength
    "topic_sent",  # T: topic_group, sentiment, topic
    "qty_bucket",  # Q: quantity, many, plural
    "same_sent",  # P: sentiment, same_topic, sent_relation, paraphrase
    "quantity_cmp",  # P: quantity, many, same_topic, paraphrase
    "tense_sent",  # C: tense, sentiment, sent_number
    "topic_qty",  # C: topic_group, quantity, many, topic_loc
    "topic_mod3",
    "contrast",
    "parity",
)


def _name(idx: int) -> str:
    return f"syn{idx:02d}_{_TASKS[idx].short}"


def _check_num_tasks(num_tasks: int) -> None:
    if not 1 <= num_tasks <= MAX_TASKS:
        raise TaskDataError(f"num_tasks must be between 1 and {MAX_TASKS}, got {num_tasks}")


def _task_names(num_tasks: int) -> list[str]:
    _check_num_tasks(num_tasks)
    return [_name(i) for i in range(num_tasks)]


def synthetic_task_infos(seed: int = 0, num_tasks: int = 35) -> list[TaskInfo]:
    """The tasks' definitions, in a fixed order (names do not depend on the seed)."""
    _check_num_tasks(num_tasks)
    return [
        TaskInfo(name=_name(i), num_labels=len(d.labels), sentence_pair=d.pair, label_names=tuple(d.labels))
        for i, d in enumerate(_TASKS[:num_tasks])
    ]


def task_family(name: str) -> str:
    """The family letter (see ``FAMILIES``) of a task name."""
    return _TASKS[_resolve(name, MAX_TASKS)].family


def default_heldout(seed: int = 0, num_tasks: int = 35, num_heldout: int = 7) -> list[str]:
    """Names of the held-out tasks: spread over the families, the rest of the tasks contribute."""
    names = _task_names(num_tasks)
    if not 0 <= num_heldout < num_tasks:
        raise TaskDataError(f"num_heldout must be between 0 and {num_tasks - 1}, got {num_heldout}")
    by_short = {_TASKS[i].short: names[i] for i in range(num_tasks)}
    chosen = [by_short[s] for s in _HELDOUT_PREFERENCE if s in by_short][:num_heldout]
    if len(chosen) < num_heldout:
        rest = [n for n in names if n not in chosen]
        random.Random(_seed_int("heldout", seed, num_tasks)).shuffle(rest)
        chosen += rest[: num_heldout - len(chosen)]
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


def _resolve(name: str, num_tasks: int) -> int:
    names = _task_names(num_tasks)
    try:
        return names.index(name)
    except ValueError:
        raise TaskDataError(
            f"unknown synthetic task {name!r}; valid names include {', '.join(names[:5])}, ... "
            f"({len(names)} tasks, syn00_... to syn{len(names) - 1:02d}_...)"
        ) from None


def _examples(d: _TaskDef, lex: _Lexicon, rng: random.Random, n: int) -> dict[str, list]:
    k = len(d.labels)
    texts, pairs, labels = [], [], []
    # labels: a shuffled near-uniform sequence, then a sentence is drawn for each by rejection
    want = [i % k for i in range(n)]
    rng.shuffle(want)
    for y in want:
        for _ in range(10_000):
            a = _sample_attrs(rng, d.polar, d.has2)
            if d.pair:
                b = _sample_attrs(rng, d.polar, d.has2, base=a, keep=d.keep)
                got = d.fn(a, b)
            else:
                got = d.fn(a)
            if got == y:
                break
        else:  # pragma: no cover - every label is reachable with a sizeable probability
            raise TaskDataError(f"task {d.short}: could not sample label {y}")
        texts.append(_render(a, lex, rng))
        if d.pair:
            pairs.append(_render(b, lex, rng))
        labels.append(y)
    out = {"text": texts, "label": labels}
    if d.pair:
        out["text_pair"] = pairs
    return out


def load_synthetic(name: str, seed: int = 0, num_tasks: int = 35, train_size: int = 1000, test_size: int = 500):
    """One task's data: a ``DatasetDict`` with ``train`` and ``test`` splits (label-balanced)."""
    import datasets

    idx = _resolve(name, num_tasks)
    d = _TASKS[idx]
    lex = _lexicon(seed)
    features = {"text": datasets.Value("string")}
    if d.pair:
        features["text_pair"] = datasets.Value("string")
    features["label"] = datasets.Value("int64")
    feats = datasets.Features(features)
    splits = {}
    for split, size in (("train", train_size), ("test", test_size)):
        rng = random.Random(_seed_int("synthetic-data", seed, name, split))
        cols = _examples(d, lex, rng, size)
        splits[split] = datasets.Dataset.from_dict({c: cols[c] for c in features}, features=feats)
    return datasets.DatasetDict(splits)


def synthetic_vocabulary(seed: int = 0) -> list[str]:
    """Every word of the language for this seed (no duplicates, fixed order)."""
    return _lexicon(seed).all_words()


def synthetic_corpus(seed: int = 0, num_sentences: int = 5000) -> list[str]:
    """Sentences of the language for training a tokenizer; the first ones cover every word.

    Returns ``max(num_sentences, number of coverage sentences)`` sentences.
    """
    lex = _lexicon(seed)
    rng = random.Random(_seed_int("synthetic-corpus", seed))
    vocab = lex.all_words()
    # a few sentences listing the vocabulary guarantee coverage whatever num_sentences is
    out = [" ".join(vocab[i : i + 16]) for i in range(0, len(vocab), 16)]
    while len(out) < num_sentences:
        out.append(_render(_sample_attrs(rng, False, 0.25), lex, rng))
    return out
