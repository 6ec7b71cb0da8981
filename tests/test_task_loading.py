"""Loading tasks from local directories (tasks.local) and through datasets.load_dataset (tasks.hub).

Real data is read from shared/data beside the repository clone (never copied into the repo); the
tests that need it are skipped with a reason when it is absent. Everything else is written to
tmp_path. No network: the hub tests load a local directory laid out like a hub dataset repo, and
the unreachable-hub test runs in offline mode.
"""

from __future__ import annotations

import csv
import json
import logging
import tempfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tasks.hub import load_hub_task
from tasks.local import load_local_task
from tasks.spec import TaskDataError, TaskInfo

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"real datasets not found at {SHARED} (shared/ beside the repository clone)"
)

PAIR_META = {"name": "toy_pair", "task": "classification", "label_names": ["no", "yes"], "sentence_pair": True}
SINGLE_META = {"name": "toy", "task": "classification", "label_names": ["neg", "pos", "neu"], "sentence_pair": False}
REG_META = {"name": "toy_reg", "task": "regression", "label_names": None, "sentence_pair": True}


# ----------------------------------------------------------------------------- helpers


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def make_task(root: Path, meta: dict | None, splits: dict[str, list[dict]], fmt: str = "jsonl") -> Path:
    """Write a task directory: meta.json plus one file per split in the given format."""
    root.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        (root / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    writer = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}[fmt]
    for split, rows in splits.items():
        writer(root / f"{split}.{fmt}", rows)
    return root


def single_rows(n: int = 6) -> list[dict]:
    return [{"text": f"sentence {i}", "label": i % 3} for i in range(n)]


def pair_rows(n: int = 6) -> list[dict]:
    return [{"text": f"premise {i}", "text_pair": f"hypothesis {i}", "label": i % 2} for i in range(n)]


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        lines = [next(f) for _ in range(limit)] if limit else f.readlines()
    return [json.loads(line) for line in lines]


def small_copy(name: str, dest: Path, n: int = 300) -> Path:
    """The first n rows of each split of a shared set (with its meta.json), as a task in dest."""
    src = SHARED / name
    dest.mkdir(parents=True)
    (dest / "meta.json").write_text((src / "meta.json").read_text(encoding="utf-8"), encoding="utf-8")
    for f in src.glob("*.jsonl"):
        _jsonl(dest / f.name, read_jsonl(f, n))
    return dest


def raises(match_all: list[str], fn, *args, **kwargs) -> str:
    """Call fn, expect TaskDataError, and check that each string occurs in its message."""
    with pytest.raises(TaskDataError) as ei:
        fn(*args, **kwargs)
    msg = str(ei.value)
    for s in match_all:
        assert s in msg, f"{s!r} not in message: {msg}"
    return msg


def assert_schema(dd: datasets.DatasetDict, info: TaskInfo) -> None:
    cols = ["text", "text_pair", "label"] if info.sentence_pair else ["text", "label"]
    label = datasets.Value("float32") if info.is_regression else datasets.Value("int64")
    want = datasets.Features({c: datasets.Value("string") for c in cols[:-1]} | {"label": label})
    assert "train" in dd and "test" in dd
    assert set(dd) <= {"train", "validation", "test"}
    for split, ds in dd.items():
        assert ds.column_names == cols, split
        assert ds.features == want, split
        assert ds.num_rows > 0
        if not info.is_regression:
            lo_hi = pc.min_max(ds.data.column("label")).as_py()
            assert lo_hi["min"] >= 0 and lo_hi["max"] < info.num_labels


# ----------------------------------------------------------------------------- real datasets


@needs_shared
def test_sst2_single_sentence():
    info, dd = load_local_task(SHARED / "sst2")
    assert info == TaskInfo("sst2", 2, False, ("negative", "positive"))
    assert_schema(dd, info)
    counts = json.loads((SHARED / "sst2" / "meta.json").read_text())["counts"]
    assert {k: v.num_rows for k, v in dd.items()} == counts  # train, validation and test kept
    first = read_jsonl(SHARED / "sst2" / "train.jsonl", 1)[0]
    assert dd["train"][0] == {"text": first["text"], "label": first["label"]}
    assert dd["train"].cache_files == []  # in memory, nothing on disk


@needs_shared
def test_rte_pair_without_test_uses_validation():
    info, dd = load_local_task(SHARED / "rte")
    assert info.sentence_pair and info.num_labels == 2
    assert info.label_names == ("entailment", "not_entailment")
    assert_schema(dd, info)
    assert list(dd) == ["train", "test"]  # validation moved to test, not duplicated
    val = read_jsonl(SHARED / "rte" / "validation.jsonl")
    assert dd["test"].num_rows == len(val) == 277
    assert dd["test"][5] == {k: val[5][k] for k in ("text", "text_pair", "label")}


@needs_shared
def test_stsb_regression_float_labels():
    info, dd = load_local_task(SHARED / "stsb")
    assert info.is_regression and info.num_labels == 1 and info.sentence_pair and info.label_names == ()
    assert_schema(dd, info)
    labels = dd["train"]["label"]
    assert 0.0 <= min(labels) and max(labels) <= 5.0
    assert any(not float(x).is_integer() for x in labels)
    first = read_jsonl(SHARED / "stsb" / "train.jsonl", 2)
    assert dd["train"]["label"][:2] == pytest.approx([r["label"] for r in first])


@needs_shared
def test_copa_extra_fields_dropped():
    raw = read_jsonl(SHARED / "copa" / "train.jsonl", 1)[0]
    assert {"premise", "choice1", "choice2", "question"} <= set(raw)
    info, dd = load_local_task(SHARED / "copa")
    assert_schema(dd, info)
    assert dd["train"][0] == {"text": raw["text"], "text_pair": raw["text_pair"], "label": raw["label"]}
    assert list(dd) == ["train", "test"] and dd["test"].num_rows == 100


@needs_shared
def test_every_shared_set_loads():
    """All shared sets load, row counts match meta.json (validation standing in for a missing test)."""
    names = sorted(p.name for p in SHARED.iterdir() if (p / "meta.json").is_file())
    assert len(names) >= 4
    for name in names:
        info, dd = load_local_task(SHARED / name)
        meta = json.loads((SHARED / name / "meta.json").read_text())
        assert info.name == meta["name"] and info.sentence_pair == meta["sentence_pair"]
        assert_schema(dd, info)
        counts = dict(meta["counts"])
        if "test" not in counts:
            counts["test"] = counts.pop("validation")
        assert {k: v.num_rows for k, v in dd.items()} == counts, name


@needs_shared
def test_local_load_leaves_no_cache(tmp_path, monkeypatch):
    default_cache = tmp_path / "default-hf-cache"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", default_cache)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    load_local_task(small_copy("mnli", tmp_path / "mnli", 50))
    assert not default_cache.exists()
    assert list(tmp.iterdir()) == []  # the throw-away cache directory is gone


# ----------------------------------------------------------------------------- formats


@needs_shared
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_match_jsonl(tmp_path, fmt):
    """A real pair set written as csv/parquet loads to the same rows as its jsonl form."""
    src = small_copy("rte", tmp_path / "jsonl", 200)
    meta = json.loads((src / "meta.json").read_text())
    splits = {s: read_jsonl(src / f"{s}.jsonl") for s in ("train", "validation")}
    other = make_task(tmp_path / fmt, meta, splits, fmt)
    info_j, dd_j = load_local_task(src)
    info_o, dd_o = load_local_task(other)
    assert info_o == info_j
    for split in dd_j:
        assert dd_o[split].to_list() == dd_j[split].to_list()
        assert dd_o[split].features == dd_j[split].features


@needs_shared
def test_parquet_regression(tmp_path):
    src = small_copy("stsb", tmp_path / "jsonl", 100)
    meta = json.loads((src / "meta.json").read_text())
    d = make_task(tmp_path / "pq", meta, {s: read_jsonl(src / f"{s}.jsonl") for s in ("train", "test")}, "parquet")
    info, dd = load_local_task(d)
    assert info.is_regression and list(dd) == ["train", "test"]
    assert dd["train"].features["label"] == datasets.Value("float32")
    assert dd["train"]["label"] == pytest.approx([r["label"] for r in read_jsonl(src / "train.jsonl")])


def test_json_array_file_and_mixed_formats(tmp_path):
    d = tmp_path / "t"
    make_task(d, SINGLE_META, {"test": single_rows(3)}, "csv")
    (d / "train.json").write_text(json.dumps(single_rows(4)), encoding="utf-8")
    info, dd = load_local_task(d)
    assert dd["train"].num_rows == 4 and dd["test"].num_rows == 3
    assert_schema(dd, info)


def test_csv_keeps_texts_verbatim_and_maps_label_names(tmp_path):
    rows = [
        {"text": "NA", "label": "pos"},
        {"text": "null", "label": "neg"},
        {"text": "", "label": "neu"},
        {"text": "12", "label": "pos"},
        {"text": 'she said "hi, there"\nand left', "label": "neg"},
    ]
    info, dd = load_local_task(make_task(tmp_path / "t", SINGLE_META, {"train": rows, "test": rows}, "csv"))
    assert dd["train"]["text"] == [r["text"] for r in rows]
    assert dd["train"]["label"] == [1, 0, 2, 1, 0]


def test_integral_float_and_bool_labels(tmp_path):
    meta = {**PAIR_META}
    rows = [{"text": "a", "text_pair": "b", "label": 1.0}, {"text": "c", "text_pair": "d", "label": 0.0}]
    brows = [{"text": "a", "text_pair": "b", "label": True}, {"text": "c", "text_pair": "d", "label": False}]
    info, dd = load_local_task(make_task(tmp_path / "t", meta, {"train": rows, "validation": brows}))
    assert dd["train"]["label"] == [1, 0] and dd["test"]["label"] == [1, 0]
    assert dd["train"].features["label"] == datasets.Value("int64")


def test_name_defaults(tmp_path):
    meta = {k: v for k, v in SINGLE_META.items() if k != "name"}
    d = make_task(tmp_path / "my_task", meta, {"train": single_rows(), "test": single_rows()})
    assert load_local_task(d)[0].name == "my_task"
    assert load_local_task(d, name="renamed")[0].name == "renamed"
    d2 = make_task(tmp_path / "other", SINGLE_META, {"train": single_rows(), "test": single_rows()})
    assert load_local_task(str(d2))[0].name == "toy"


# ----------------------------------------------------------------------------- bad inputs


def test_missing_directory(tmp_path):
    raises([str(tmp_path / "nope"), "does not exist"], load_local_task, tmp_path / "nope")
    f = tmp_path / "file.txt"
    f.write_text("x")
    raises([str(f), "not a directory"], load_local_task, f)


def test_missing_and_invalid_meta(tmp_path):
    d = make_task(tmp_path / "t", None, {"train": single_rows(), "test": single_rows()})
    meta = d / "meta.json"
    raises([str(meta), "not found"], load_local_task, d)
    meta.write_text('{"label_names": ["a", "b"], ')
    raises([str(meta), "not valid JSON"], load_local_task, d)
    meta.write_text('["a", "b"]')
    raises([str(meta), "JSON object"], load_local_task, d)


@pytest.mark.parametrize(
    ("meta", "needles"),
    [
        ({"label_names": ["a", "b"]}, ["'sentence_pair'", "missing"]),
        ({"label_names": ["a", "b"], "sentence_pair": "no"}, ["'sentence_pair'", "'no'"]),
        ({"task": "ranking", "label_names": ["a", "b"], "sentence_pair": False}, ["'task'", "'ranking'"]),
        ({"sentence_pair": False}, ["'label_names'", "missing"]),
        ({"label_names": ["only"], "sentence_pair": False}, ["'label_names'", "at least 2", "['only']"]),
        ({"label_names": ["a", "a", "b"], "sentence_pair": False}, ["'label_names'", "duplicate", "['a']"]),
        ({"label_names": ["a", 3], "sentence_pair": False}, ["'label_names'[1]", "3"]),
        ({"label_names": "ab", "sentence_pair": False}, ["'label_names'", "'ab'"]),
        ({"task": "regression", "label_names": ["x", "y"], "sentence_pair": False}, ["'label_names'", "regression"]),
        ({"name": "", "label_names": ["a", "b"], "sentence_pair": False}, ["'name'"]),
    ],
)
def test_bad_meta_keys(tmp_path, meta, needles):
    d = make_task(tmp_path / "t", meta, {"train": single_rows(), "test": single_rows()})
    raises([str(d / "meta.json"), *needles], load_local_task, d)


def test_split_files_policy(tmp_path):
    d = make_task(tmp_path / "a", SINGLE_META, {"validation": single_rows(), "test": single_rows()})
    raises([str(d), "no train file"], load_local_task, d)

    d = make_task(tmp_path / "b", SINGLE_META, {"train": single_rows()})
    raises([str(d), "neither a test nor a validation"], load_local_task, d)

    d = make_task(tmp_path / "c", SINGLE_META, {"train": single_rows(), "test": single_rows()})
    _csv(d / "train.csv", single_rows())
    raises([str(d), "'train'", "train.csv", "train.jsonl"], load_local_task, d)


def test_missing_columns(tmp_path):
    rows = [{"sentence": "x", "label": 0}]
    d = make_task(tmp_path / "a", SINGLE_META, {"train": rows, "test": single_rows()})
    raises([str(d / "train.jsonl"), "missing column 'text'", "'sentence'"], load_local_task, d)

    rows = [{"text": "x", "gold": 0}]
    d = make_task(tmp_path / "b", SINGLE_META, {"train": single_rows(), "test": rows}, "csv")
    raises([str(d / "test.csv"), "missing column 'label'"], load_local_task, d)

    d = make_task(tmp_path / "c", PAIR_META, {"train": single_rows(), "test": pair_rows()})
    raises([str(d / "train.jsonl"), "missing column 'text_pair'"], load_local_task, d)


def test_empty_splits(tmp_path):
    d = make_task(tmp_path / "a", SINGLE_META, {"train": single_rows()})
    (d / "test.jsonl").write_text("")
    raises([str(d / "test.jsonl"), "empty"], load_local_task, d)

    d = make_task(tmp_path / "b", SINGLE_META, {"train": single_rows()})
    (d / "validation.csv").write_text("text,label\n")
    raises([str(d / "validation.csv"), "empty"], load_local_task, d)

    d = make_task(tmp_path / "c", SINGLE_META, {"train": single_rows()})
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), d / "test.parquet")
    raises([str(d / "test.parquet"), "empty"], load_local_task, d)


@pytest.mark.parametrize(
    ("bad_label", "needles"),
    [
        (3, ["{row}: label 3", "outside [0, 3)"]),
        (-1, ["{row}: label -1", "outside [0, 3)"]),
        (0.5, ["{row}: label 0.5", "not an integer"]),
        ("maybe", ["{row}: label 'maybe'", "label names"]),
        (None, ["null at {row}"]),
    ],
)
@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_bad_classification_labels(tmp_path, fmt, bad_label, needles):
    """The 5th data row is named as the file shows it: jsonl line 5, csv line 6 (the header is line 1),
    parquet row 5 (counted from 1)."""
    row = {"jsonl": "line 5", "csv": "line 6", "parquet": "row 5"}[fmt]
    needles = [n.format(row=row) for n in needles]
    rows = single_rows(8)
    rows[4]["label"] = bad_label
    if fmt == "parquet" and isinstance(bad_label, str):
        rows = [{**r, "label": str(r["label"])} for r in rows]  # parquet columns have one type
    d = make_task(tmp_path / "t", SINGLE_META, {"train": single_rows(), "test": rows}, fmt)
    raises([str(d / f"test.{fmt}"), "column 'label'", *needles], load_local_task, d)


@pytest.mark.parametrize(
    ("bad_label", "needles"),
    [("high", ["line 3: label 'high'", "not numeric"]), (None, ["null at line 3"]),
     (True, ["line 3: label True", "not numeric"])],
)
def test_bad_regression_labels(tmp_path, bad_label, needles):
    rows = [{"text": f"a{i}", "text_pair": f"b{i}", "label": i * 0.7} for i in range(5)]
    rows[2]["label"] = bad_label
    d = make_task(tmp_path / "t", REG_META, {"train": rows, "test": pair_rows()})
    raises([str(d / "train.jsonl"), "column 'label'", *needles], load_local_task, d)


@pytest.mark.parametrize("column", ["text", "text_pair"])
def test_null_texts(tmp_path, column):
    rows = pair_rows(5)
    rows[3][column] = None
    d = make_task(tmp_path / "t", PAIR_META, {"train": pair_rows(), "validation": rows})
    raises([str(d / "validation.jsonl"), f"column '{column}'", "null at line 4"], load_local_task, d)

    rows = pair_rows(5)
    rows[1][column] = 42
    d = make_task(tmp_path / "u", PAIR_META, {"train": rows, "validation": pair_rows()})
    raises([str(d / "train.jsonl"), f"column '{column}' line 2: value 42"], load_local_task, d)


def _bytes_rows(rows: list[dict], bad_line: int, bad_text: bytes, header: str | None = None) -> bytes:
    """jsonl (or csv with ``header``) lines as bytes, with line ``bad_line`` (1-based, header counted) replaced."""
    if header is None:
        lines = [json.dumps(r).encode() for r in rows]
    else:
        lines = [header.encode()] + [f"{r['text']},{r['label']}".encode() for r in rows]
    lines[bad_line - 1] = bad_text
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize(
    ("fmt", "bad", "line"),
    [("jsonl", b'{"text": "caf\xe9 au lait", "label": 1}', 5),  # latin-1 e-acute
     ("csv", b"caf\xe9 au lait,1", 6),
     ("jsonl", b'{"text": "ok", "label": 1, "note": "\xff"}', 3)],  # even in a column the task ignores
)
def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path, fmt, bad, line):
    """pyarrow's json reader keeps invalid UTF-8 in a string column without complaint (the bytes fail only when a
    node converts the row, mid-run): the loader, which is what the start-up check and every node call, names the
    file and the 1-based line (csv: the header is line 1)."""
    d = make_task(tmp_path / "t", SINGLE_META, {"train": single_rows(), "test": single_rows()}, fmt)
    header = "text,label" if fmt == "csv" else None
    (d / f"train.{fmt}").write_bytes(_bytes_rows(single_rows(), line, bad, header))
    raises([f"{d / f'train.{fmt}'}: line {line}: not valid UTF-8"], load_local_task, d)


def test_coldfusion_sim_exits_2_on_a_file_that_is_not_utf8_before_anything_starts(tmp_path, capsys, monkeypatch):
    """The issue's case through the CLI: before, the start-up check passed, every round logged Ray tracebacks and
    the run ended finished:completed. Now: the file and line, exit 2, no SuperLink, nothing written."""
    import app.run.launch as launch
    from rich.console import Console

    def tripwire(*_args, **_kwargs):
        raise AssertionError("the launcher started a SuperLink")
    monkeypatch.setattr(launch, "simulation_superlink", tripwire)
    monkeypatch.setattr(launch, "console", Console(width=10_000))
    data = tmp_path / "data"
    make_task(data / "good", SINGLE_META, {"train": single_rows(), "test": single_rows()})
    bad = make_task(data / "bad", SINGLE_META, {"train": single_rows(), "test": single_rows()})
    (bad / "test.jsonl").write_bytes(_bytes_rows(single_rows(), 4, b'{"text": "na\xefve", "label": 0}'))
    out = tmp_path / "out"
    code = launch.main(["tasks=shared_data", f"tasks.data_root={data}", "tasks.contributing=[good,bad]",
                        "tasks.heldout=[]", "--output-dir", str(out)])
    text = capsys.readouterr().out
    assert code == 2, text
    assert f"error: {bad / 'test.jsonl'}: line 4: not valid UTF-8" in text
    assert not out.exists()


def test_a_parquet_text_that_is_not_utf8_is_refused_with_its_row(tmp_path):
    d = make_task(tmp_path / "t", SINGLE_META, {"train": single_rows(), "test": single_rows()}, "parquet")
    texts = pa.array([b"fine", b"also fine", b"caf\xe9"], pa.binary()).view(pa.string())  # no validation here
    pq.write_table(pa.table({"text": texts, "label": pa.array([0, 1, 2])}), d / "test.parquet")
    raises([f"{d / 'test.parquet'}: column 'text' row 3: not valid UTF-8"], load_local_task, d)


def test_lines_are_counted_as_the_file_shows_them(tmp_path):
    """Blank lines (which the readers skip) and a csv record spanning two lines still give the right line."""
    d = make_task(tmp_path / "a", SINGLE_META, {"train": single_rows(), "test": single_rows()})
    rows = [json.dumps(r) for r in single_rows(3)]
    # line 1: row, 2: blank, 3: row, 4: blank, 5: row, 6: the bad row
    (d / "train.jsonl").write_text("\n".join([rows[0], "", rows[1], "  ", rows[2], '{"text": "x", "label": 9}']) + "\n")
    raises([f"{d / 'train.jsonl'}: column 'label' line 6: label 9 is outside [0, 3)"], load_local_task, d)

    d = make_task(tmp_path / "b", SINGLE_META, {"train": single_rows(), "test": single_rows()}, "csv")
    # line 1: header, 2: row, 3-4: one quoted record, 5: blank, 6: the bad row
    (d / "train.csv").write_text('text,label\na,0\n"two\nlines",1\n\nb,7\n')
    raises([f"{d / 'train.csv'}: column 'label' line 6: label 7 is outside"], load_local_task, d)

    d = make_task(tmp_path / "c", SINGLE_META, {"test": single_rows()})
    # a JSON array pretty-printed over many lines: its elements are records, named from 1
    (d / "train.json").write_text(json.dumps([*single_rows(2), {"text": "x", "label": 9}], indent=2))
    raises([f"{d / 'train.json'}: column 'label' record 3: label 9 is outside"], load_local_task, d)


def test_unparseable_files(tmp_path):
    d = make_task(tmp_path / "a", SINGLE_META, {"train": single_rows(), "test": single_rows()})
    with (d / "train.jsonl").open("a") as f:
        f.write('{"text": "broken", \n')
    raises([str(d / "train.jsonl"), "could not be read"], load_local_task, d)

    d = make_task(tmp_path / "b", SINGLE_META, {"train": single_rows(), "test": single_rows()}, "csv")
    with (d / "train.csv").open("a") as f:
        f.write("one,1,surplus field\n")
    raises([str(d / "train.csv"), "could not be read"], load_local_task, d)

    d = make_task(tmp_path / "c", SINGLE_META, {"train": single_rows(), "test": single_rows()})
    (d / "train.parquet").unlink(missing_ok=True)
    (d / "train.jsonl").rename(d / "train.parquet")  # not a parquet file
    raises([str(d / "train.parquet"), "could not be read"], load_local_task, d)


# ----------------------------------------------------------------------------- hub code path


def hub_repo(root: Path, *, test_labels: bool = False) -> Path:
    """A directory laid out like a hub dataset repo: data/<split>-00000-of-00001.parquet,
    differently named columns and a ClassLabel; the test split has hidden (-1) labels."""
    feats = datasets.Features(
        {
            "idx": datasets.Value("int32"),
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "gold": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    (root / "data").mkdir(parents=True)
    for split, n in [("train", 12), ("validation", 6), ("test", 4)]:
        labels = [i % 3 for i in range(n)] if split != "test" or test_labels else [-1] * n
        ds = datasets.Dataset.from_dict(
            {"idx": list(range(n)), "sentence1": [f"{split} p{i}" for i in range(n)],
             "sentence2": [f"{split} h{i}" for i in range(n)], "gold": labels},
            features=feats,
        )
        pq.write_table(ds.data.table, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_hub_parquet_repo_with_column_mapping(tmp_path, caplog):
    repo = hub_repo(tmp_path / "nli_repo")
    with caplog.at_level(logging.WARNING, logger="tasks.hub"):
        info, dd = load_hub_task(
            str(repo), text_column="sentence1", text_pair_column="sentence2", label_column="gold",
            cache_dir=tmp_path / "hf-cache",
        )
    assert info == TaskInfo("nli_repo", 3, True, ("entailment", "neutral", "contradiction"))
    assert_schema(dd, info)
    # the test split's labels are hidden (-1): validation is evaluated on instead
    assert list(dd) == ["train", "test"] and dd["test"][0]["text"] == "validation p0"
    assert "no labels" in caplog.text
    assert dd["train"][1] == {"text": "train p1", "text_pair": "train h1", "label": 1}


def test_hub_explicit_splits_and_names(tmp_path):
    repo = hub_repo(tmp_path / "r", test_labels=True)
    kw = dict(text_column="sentence1", text_pair_column="sentence2", label_column="gold", cache_dir=tmp_path / "c")
    info, dd = load_hub_task(str(repo), **kw)
    assert list(dd) == ["train", "validation", "test"] and dd["test"].num_rows == 4

    info, dd = load_hub_task(str(repo), splits={"train": "train", "test": "validation"}, name="nli",
                             label_names=["e", "n", "c"], **kw)
    assert info.name == "nli" and info.label_names == ("e", "n", "c")
    assert list(dd) == ["train", "test"] and dd["test"].num_rows == 6

    raises(["'dev'", "available splits", "'train'", "'validation'"], load_hub_task, str(repo),
           splits={"train": "train", "test": "dev"}, **kw)
    raises(["label_names has 2 names", "ClassLabel with 3"], load_hub_task, str(repo), label_names=["a", "b"], **kw)
    raises(["missing column 'premise'", "used as 'text'", "split 'train'"], load_hub_task, str(repo),
           **{**kw, "text_column": "premise"})
    raises(["missing column 'label'", "'gold'"], load_hub_task, str(repo),
           **{**kw, "label_column": "label"})


def test_hub_csv_repo_regression_and_label_checks(tmp_path):
    repo = tmp_path / "sts_repo"
    repo.mkdir()
    rows = [{"id": i, "s1": f"a {i}", "s2": f"b {i}", "score": round(i * 0.37, 2)} for i in range(10)]
    _csv(repo / "train.csv", rows)
    _csv(repo / "test.csv", rows[:4])
    info, dd = load_hub_task(str(repo), text_column="s1", text_pair_column="s2", label_column="score",
                             regression=True, cache_dir=tmp_path / "c")
    assert info.is_regression and info.name == "sts_repo"
    assert_schema(dd, info)
    assert dd["train"]["label"] == pytest.approx([r["score"] for r in rows])

    # plain int labels (no ClassLabel): label_names is required, then validated like local files
    repo2 = tmp_path / "cls_repo"
    repo2.mkdir()
    _csv(repo2 / "train.csv", [{"sentence": f"s{i}", "y": i % 2} for i in range(6)])
    _csv(repo2 / "test.csv", [{"sentence": "t", "y": 0}, {"sentence": "u", "y": 7}])
    kw = dict(text_column="sentence", label_column="y", cache_dir=tmp_path / "c")
    raises(["column 'y'", "label_names="], load_hub_task, str(repo2), **kw)
    # a hub split's rows are counted from 1: the second row is row 2
    raises(["split 'test'", "column 'y' (used as 'label') row 2: label 7", "outside [0, 2)"], load_hub_task, str(repo2),
           label_names=["no", "yes"], **kw)


def test_hub_unreachable_gives_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    # both libraries read the variables at import time; mirror them into the loaded modules
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TaskDataError) as ei:
        load_hub_task("coldfusion-tests/no-such-dataset", "cfg", cache_dir=tmp_path / "c")
    msg = str(ei.value)
    assert "'coldfusion-tests/no-such-dataset'" in msg and "could not be fetched" in msg
    assert "load_local_task" in msg and "HF_HUB_OFFLINE" in msg
    assert ei.value.__cause__ is not None
