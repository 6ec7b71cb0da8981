"""The paper's dataset pool (conf/tasks/paper.yaml): offline resolution, missing datasets, k-fold roles,
multi-field formatters and the ``coldfusion-pool`` CLI (app/run/pool.py).

No network: hub definitions are only resolved (never fetched), except a local directory laid out like
a hub dataset repo. Tests that read shared/data beside the repository are skipped when it is absent.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from app.run.config import compose_config, to_container
from tasks.formatting import FORMATTERS, get_formatter
from tasks.hub import load_hub_task
from tasks.registry import assign_folds, build_pool, load_task, resolve_pool
from tests.test_task_loading import raises

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO.parent / "shared" / "data").resolve()  # the registry resolves symlinks (CI clones next to a link)
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real datasets not found at {SHARED}")

# the paper pool's datasets with no copy in shared/data (catalog `local: null`)
NO_LOCAL = {"mrpc", "qqp", "qnli", "cb", "isear", "yahoo_answers", "dbpedia", "20_newsgroup", "trec_fine",
            "trec_coarse", "amazon_reviews_multi", "financial_phrasebank", "tweet_ev_irony"}


@pytest.fixture(scope="module")
def paper() -> dict:
    """conf/tasks/paper.yaml as the run composes it (data_root left to the test)."""
    return to_container(compose_config("", ["tasks=paper"]), "tasks")


def with_(cfg: dict, **changes) -> dict:
    return {**cfg, **changes}


def fake_task(root: Path, name: str, pair: bool = False) -> Path:
    """A minimal valid task directory in the local format."""
    d = root / name
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"label_names": ["no", "yes"], "sentence_pair": pair}))
    for split in ("train", "test"):
        rows = [{"text": f"{name} {split} {i}", **({"text_pair": "p"} if pair else {}), "label": i % 2} for i in range(4)]
        (d / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


# ----------------------------------------------------------------------------- the paper pool


def test_paper_pool_lists_36_datasets_each_with_a_catalog_entry(paper):
    names = paper["contributing"] + paper["heldout"]
    assert len(names) == len(set(names)) == 36
    assert set(paper["catalog"]) == set(names)
    assert (paper["kind"], paper["resolve"], paper["on_missing"], paper["folds"], paper["fold"]) == (
        "catalog", "local", "skip", 3, 0)
    # multi-field SuperGLUE sets go through a formatter; GLUE / SuperGLUE test on validation (hidden test labels)
    for name in ("copa", "wic", "wsc", "multirc"):
        assert paper["catalog"][name]["hub"]["format"] in FORMATTERS
    assert paper["catalog"]["cola"]["hub"]["splits"] == {"train": "train", "test": "validation"}
    assert paper["catalog"]["cola"]["split_policy"] == "validation_as_test"


@needs_shared
def test_paper_pool_resolves_shared_data_and_names_the_missing(paper, caplog):
    cfg = with_(paper, data_root=str(SHARED))
    with caplog.at_level(logging.WARNING, logger="tasks.registry"):
        res = resolve_pool(cfg)
    by_name = {e["name"]: e for e in res.entries}
    assert by_name["sst2"] == {"source": "local", "path": str(SHARED / "sst2"), "name": "sst2",
                               "role": by_name["sst2"]["role"]}
    assert by_name["sst_5bins"]["path"] == str(SHARED / "sst5")
    assert by_name["esnli"]["path"] == str(SHARED / "snli")
    assert by_name["tweet_ev_emotion"]["path"] == str(SHARED / "tweet_eval_emotion")
    assert len(res.entries) == 23 and all(e["source"] == "local" for e in res.entries)
    assert {m.name for m in res.missing} == NO_LOCAL
    qqp = next(m for m in res.missing if m.name == "qqp")
    assert "no local copy" in qqp.reason and qqp.role in ("contributing", "heldout")
    # roles are assigned before resolution: resolved + missing still make 24 / 12
    roles = [e["role"] for e in res.entries] + [m.role for m in res.missing]
    assert roles.count("contributing") == 24 and roles.count("heldout") == 12
    # skip is never silent: one WARNING names every missing dataset with its role
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for m in res.missing:
        assert f"{m.name} ({m.role})" in warning
    assert build_pool(cfg) == res.entries


@needs_shared
def test_paper_pool_on_missing_error_names_every_missing_dataset(paper):
    msg = raises(["13 dataset(s)", "tasks.on_missing=skip"], build_pool,
                 with_(paper, data_root=str(SHARED), on_missing="error"))
    for name in NO_LOCAL:
        assert f"{name} (" in msg
    assert "sst2" not in msg


def test_tmp_data_root_resolves_exactly_its_directories(paper, tmp_path):
    fake_task(tmp_path, "sst2")
    fake_task(tmp_path, "snli", pair=True)
    cfg = with_(paper, data_root=str(tmp_path))
    res = resolve_pool(cfg, check=False)
    assert {e["name"]: e["path"] for e in res.entries} == {"sst2": str(tmp_path / "sst2"),
                                                            "esnli": str(tmp_path / "snli")}
    assert len(res.missing) == 34
    cola = next(m for m in res.missing if m.name == "cola")
    assert cola.reason == f"no directory {tmp_path / 'cola'}"  # where it looked
    info, dd = load_task(next(e for e in res.entries if e["name"] == "esnli"))
    assert info.name == "esnli" and info.sentence_pair and dd["train"][0]["text"] == "snli train 0"

    # auto: local where present, hub otherwise; only isear has neither
    auto = resolve_pool(with_(cfg, resolve="auto"), check=False)
    assert [m.name for m in auto.missing] == ["isear"]
    sources = {e["name"]: e["source"] for e in auto.entries}
    assert sources["sst2"] == sources["esnli"] == "local"
    qqp = next(e for e in auto.entries if e["name"] == "qqp")
    assert qqp == {"source": "hub", "path": "nyu-mll/glue", "config": "qqp", "text_column": "question1",
                   "text_pair_column": "question2", "splits": {"train": "train", "test": "validation"},
                   "name": "qqp", "role": qqp["role"]}
    # hub: every definition, local copies ignored
    hub = resolve_pool(with_(cfg, resolve="hub"), check=False)
    assert all(e["source"] == "hub" for e in hub.entries) and len(hub.entries) == 35
    assert next(e for e in hub.entries if e["name"] == "wsc")["format"] == "wsc"


def test_existing_catalog_form_keeps_its_behaviour(tmp_path):
    fake_task(tmp_path, "a")
    fake_task(tmp_path, "b")
    cfg = {"kind": "catalog", "data_root": str(tmp_path), "catalog": {},
           "contributing": ["a"], "heldout": ["b"]}
    assert build_pool(cfg) == [
        {"source": "local", "path": str(tmp_path / "a"), "name": "a", "role": "contributing"},
        {"source": "local", "path": str(tmp_path / "b"), "name": "b", "role": "heldout"},
    ]
    # default resolve=local, on_missing=error: a missing directory stops the run, saying where it looked
    raises(["c (contributing)", f"no directory {tmp_path / 'c'}"], build_pool, with_(cfg, contributing=["a", "c"]))
    # a pinned hub definition stays as written, whatever tasks.resolve says
    pinned = {"source": "hub", "path": "nyu-mll/glue", "config": "rte", "text_column": "sentence1"}
    pool = build_pool(with_(cfg, catalog={"rte": pinned}, contributing=["a", "rte"]))
    assert pool[1] == {**pinned, "name": "rte", "role": "contributing"}
    # and conf/tasks/shared_data.yaml states the defaults
    shared = to_container(compose_config("", ["tasks=shared_data"]), "tasks")
    assert (shared["resolve"], shared["on_missing"], shared["folds"]) == ("local", "error", None)


def test_skip_with_nothing_contributing_left_is_an_error(tmp_path):
    fake_task(tmp_path, "b")
    cfg = {"kind": "catalog", "data_root": str(tmp_path), "contributing": ["a"], "heldout": ["b"],
           "on_missing": "skip"}
    raises(["no contributing dataset"], build_pool, cfg)


# ----------------------------------------------------------------------------- folds


def test_three_folds_of_36(paper):
    names = paper["contributing"] + paper["heldout"]
    folds = assign_folds(names, 3, seed=0)
    assert [len(f) for f in folds] == [12, 12, 12]
    assert sorted(n for f in folds for n in f) == sorted(names)  # disjoint and complete
    assert assign_folds(list(reversed(names)), 3, seed=0) == folds  # the listing order does not matter
    assert assign_folds(names, 3, seed=1) != folds

    held = []
    for i in range(3):
        res = resolve_pool(with_(paper, fold=i, resolve="hub"), check=False)
        roles = {e["name"]: e["role"] for e in res.entries} | {m.name: m.role for m in res.missing}
        assert sorted(n for n, r in roles.items() if r == "heldout") == folds[i]
        assert list(roles.values()).count("contributing") == 24
        held += folds[i]
    assert sorted(held) == sorted(names)  # every dataset held out in exactly one fold


def test_folds_use_contributing_and_heldout_together():
    names = [f"d{i:02d}" for i in range(10)]
    cfg = {"kind": "catalog", "resolve": "hub", "folds": 2, "fold": 1, "fold_seed": 7,
           "contributing": names[:4], "heldout": names[4:],
           "catalog": {n: {"hub": {"path": f"org/{n}"}} for n in names}}
    pool = build_pool(cfg)
    assert [e["name"] for e in pool] == names  # listed order kept
    assert sorted(e["name"] for e in pool if e["role"] == "heldout") == assign_folds(names, 2, 7)[1]


@pytest.mark.parametrize("changes, fragments", [
    ({"fold": 3}, ["tasks.fold must be an integer in [0, 3)", "got 3"]),
    ({"fold": -1}, ["tasks.fold", "got -1"]),
    ({"fold": "1"}, ["tasks.fold must be an integer", "'1'"]),
    ({"folds": 1}, ["tasks.folds", "from 2", "got 1"]),
    ({"folds": 40}, ["tasks.folds", "(36)", "got 40"]),
    ({"folds": True}, ["tasks.folds must be an integer"]),
    ({"resolve": "remote"}, ["tasks.resolve must be one of 'local', 'hub', 'auto'", "'remote'"]),
    ({"on_missing": "ignore"}, ["tasks.on_missing must be one of 'error', 'skip'", "'ignore'"]),
    ({"heldout": ["cola"]}, ["listed more than once", "'cola'"]),
])
def test_bad_pool_keys_name_the_key(paper, changes, fragments):
    raises(fragments, resolve_pool, with_(paper, **changes), check=False)


def test_bad_catalog_definitions_name_the_entry(paper):
    catalog = dict(paper["catalog"])
    raises(["tasks.catalog.copa.hub.format", "unknown format 'copa2'", "'multirc'"], resolve_pool,
           with_(paper, resolve="hub", catalog={**catalog, "copa": {"hub": {"path": "x", "format": "copa2"}}}))
    raises(["tasks.catalog.cola.hub", "unknown key(s) ['text']", "text_column"], resolve_pool,
           with_(paper, resolve="hub", catalog={**catalog, "cola": {"hub": {"path": "x", "text": "s"}}}))
    raises(["tasks.catalog.cola", "unknown key(s) ['hbu']"], resolve_pool,
           with_(paper, catalog={**catalog, "cola": {"hbu": {"path": "x"}}}))


# ----------------------------------------------------------------------------- formatters


def test_formatters_on_raw_rows():
    copa = get_formatter("copa")
    row = {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
           "choice2": "He got a hole in his sock.", "question": "cause", "label": 0}
    assert copa(row) == {"text": "The man broke his toe. What was the CAUSE of this?",
                         "text_pair": "1) He dropped a hammer on his foot. 2) He got a hole in his sock."}
    assert copa({**row, "question": "effect"})["text"] == "The man broke his toe. What happened as a RESULT?"
    raises(["format 'copa'", "'why'"], copa, {**row, "question": "why"})

    wic = {"word": "bank", "sentence1": "He sat on the bank.", "sentence2": "She robbed the bank."}
    assert get_formatter("wic")(wic) == {"text": "He sat on the bank.", "text_pair": "She robbed the bank."}
    assert get_formatter("wic_word")(wic)["text"] == "bank: He sat on the bank."

    wsc = {"text": "Mark told Pete many lies about himself, which Pete included in his book.",
           "span1_text": "Mark", "span2_text": "himself", "span1_index": 0, "span2_index": 5}
    assert get_formatter("wsc")(wsc) == {"text": wsc["text"], "text_pair": "himself -> Mark"}

    multirc = {"paragraph": "Sent 1. Sent 2.", "question": "What is sent?", "answer": "Sent 1"}
    assert get_formatter("multirc")(multirc) == {"text": "Sent 1. Sent 2.", "text_pair": "What is sent? || Sent 1"}

    yahoo = {"question_title": "Why is the sky blue?", "question_content": "", "best_answer": " Rayleigh scattering."}
    assert get_formatter("yahoo_answers")(yahoo) == {"text": "Why is the sky blue? Rayleigh scattering."}

    raises(["unknown format 'cpa'", "'copa'", "'wsc'"], get_formatter, "cpa")


@needs_shared
def test_formatters_agree_with_the_shared_data_copies():
    """Rebuilt from their kept raw fields, copa and wsc rows come out as the local files have them."""
    for line in (SHARED / "copa" / "train.jsonl").read_text().splitlines()[:50]:
        r = json.loads(line)
        assert get_formatter("copa")(r) == {"text": r["text"], "text_pair": r["text_pair"]}
    for line in (SHARED / "wsc" / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        raw = {"text": r["text"], "span1_text": r["span1"], "span2_text": r["span2"]}
        assert get_formatter("wsc")(raw) == {"text": r["text"], "text_pair": r["text_pair"]}


# ----------------------------------------------------------------------------- hub loader with format=


def wsc_repo(root: Path) -> Path:
    """A local directory laid out like the SuperGLUE wsc.fixed hub config (raw fields, ClassLabel)."""
    feats = datasets.Features({
        "text": datasets.Value("string"), "span1_index": datasets.Value("int32"),
        "span2_index": datasets.Value("int32"), "span1_text": datasets.Value("string"),
        "span2_text": datasets.Value("string"), "idx": datasets.Value("int32"),
        "label": datasets.ClassLabel(names=["False", "True"]),
    })
    (root / "data").mkdir(parents=True)
    for split, n in [("train", 6), ("validation", 4), ("test", 3)]:
        rows = {"text": [f"{split} sentence {i} about it" for i in range(n)], "span1_index": [0] * n,
                "span2_index": [4] * n, "span1_text": [f"noun{i}" for i in range(n)], "span2_text": ["it"] * n,
                "idx": list(range(n)), "label": [i % 2 for i in range(n)] if split != "test" else [-1] * n}
        pq.write_table(datasets.Dataset.from_dict(rows, features=feats).data.table,
                       root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_hub_loader_applies_format(tmp_path):
    repo = wsc_repo(tmp_path / "wsc_repo")
    splits = {"train": "train", "test": "validation"}
    info, dd = load_hub_task(str(repo), format="wsc", splits=splits, name="wsc", cache_dir=tmp_path / "c")
    assert info.name == "wsc" and info.sentence_pair and info.label_names == ("False", "True")
    assert list(dd) == ["train", "test"] and dd["test"].num_rows == 4
    assert dd["train"].column_names == ["text", "text_pair", "label"]
    assert dd["train"][1] == {"text": "train sentence 1 about it", "text_pair": "it -> noun1", "label": 1}

    # through the pool: a catalog hub definition with format=, resolved and loaded like any entry
    cfg = {"kind": "catalog", "resolve": "hub", "contributing": ["wsc"],
           "catalog": {"wsc": {"local": None, "hub": {"path": str(repo), "format": "wsc", "splits": splits,
                                                      "label_names": ["no", "yes"], "cache_dir": str(tmp_path / "c")}}}}
    (entry,) = build_pool(cfg)
    info, dd = load_task(entry)
    assert info.label_names == ("no", "yes") and dd["test"][0]["text_pair"] == "it -> noun0"


def test_hub_loader_format_errors(tmp_path):
    repo = wsc_repo(tmp_path / "wsc_repo")
    kw = {"splits": {"train": "train", "test": "validation"}, "cache_dir": tmp_path / "c"}
    raises(["unknown format 'wsc2'", "known formats", "'wsc'"], load_hub_task, str(repo), format="wsc2", **kw)
    raises(["format 'copa' needs the raw field(s)", "'premise'", "split 'train'"], load_hub_task, str(repo),
           format="copa", **kw)

    # a raw value the formatter cannot read: the message says which dataset and split
    copa = tmp_path / "copa_repo"
    (copa / "data").mkdir(parents=True)
    feats = datasets.Features({**{k: datasets.Value("string") for k in ("premise", "choice1", "choice2", "question")},
                               "label": datasets.ClassLabel(names=["choice1", "choice2"])})
    for split in ("train", "validation"):
        rows = {"premise": ["p0", "p1"], "choice1": ["a", "b"], "choice2": ["c", "d"],
                "question": ["cause", "why" if split == "validation" else "effect"], "label": [0, 1]}
        pq.write_table(datasets.Dataset.from_dict(rows, features=feats).data.table,
                       copa / "data" / f"{split}-00000-of-00001.parquet")
    raises(["split 'validation'", "format 'copa': question must be 'cause' or 'effect'", "'why'"], load_hub_task,
           str(copa), format="copa", cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str, data_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLDFUSION_DATA_ROOT": str(data_root)}
    return subprocess.run([sys.executable, "-m", "app.run.pool", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@needs_shared
def test_cli_shows_the_resolution_and_the_missing():
    out = _cli("tasks=paper", data_root=SHARED)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:3] == ["sst2", "heldout", "local"] or line.split()[:3] == ["sst2", "contributing", "local"]
               for line in lines)
    missing = {line.split()[0] for line in lines if "MISSING" in line}
    assert missing == NO_LOCAL
    assert "36 datasets: 23 resolved (23 local), 13 missing" in out.stdout
    assert "qqp (" in out.stderr  # the skip warning

    out = _cli("tasks=paper", "tasks.on_missing=error", data_root=SHARED)
    assert out.returncode == 2 and "MISSING" in out.stdout and "error: 13 dataset(s)" in out.stderr


def test_cli_exits_2_on_a_bad_fold(tmp_path):
    out = _cli("tasks=paper", "tasks.fold=5", data_root=tmp_path)
    assert out.returncode == 2 and "tasks.fold must be an integer in [0, 3)" in out.stderr
    assert out.stdout == ""
