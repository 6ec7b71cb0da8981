"""Load a task from a local directory.

Directory format (the one of ``shared/data/<name>/``)::

    <dir>/
      meta.json            required
      train.<ext>          required
      validation.<ext>     optional
      test.<ext>           optional (without it, validation is used as test)

``<ext>`` is one of ``jsonl`` / ``json`` (JSON lines, or a JSON array of objects), ``csv`` (with a
header row) or ``parquet``; each split may use its own format, but one split must not have two
files (``train.jsonl`` next to ``train.csv`` is an error). Other files are ignored.

Each row has ``text`` (str), ``label`` and, for sentence-pair tasks, ``text_pair`` (str). Other
columns are dropped. ``label`` is a class index in ``[0, len(label_names))`` (also accepted: an
integral float like ``1.0``, a boolean for 2 classes, one of the label names, or an integer written
as a string; a name wins over an integer) or, for regression, any finite number. Texts may be empty
strings but not null; in csv files ``NA``/``null``/empty texts stay the literal strings, and only
an empty ``label`` field counts as missing.

``meta.json`` is an object with:

* ``task``: ``"classification"`` (default when absent) or ``"regression"``;
* ``label_names``: list of class names (at least 2) for classification; ``null``, ``[]`` or one
  name for regression;
* ``sentence_pair``: ``true`` or ``false`` (required);
* ``name``: optional; the task name defaults to it, then to the directory name.

Other keys (``counts``, ``source``, ``license``, ...) are ignored. Example::

    {"name": "sst2", "task": "classification", "label_names": ["negative", "positive"],
     "sentence_pair": false}

Files must be UTF-8. Errors name a jsonl or csv row by its 1-based line in the file (a csv header is
line 1), a JSON array's by its 1-based record, a parquet file's as ``row N`` (counted from 1).

Files are read with the ``datasets`` packaged builders into memory, through a throw-away cache
directory: nothing is left in ``~/.cache/huggingface`` and no network is used.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import warnings
from pathlib import Path

import datasets

from tasks.spec import TaskDataError, TaskInfo
from tasks.validate import SPLITS, RowName, assemble, data_row, make_info, normalise_split, quiet_progress

__all__ = ["load_local_task", "read_meta", "FORMATS"]

# file extension -> datasets packaged builder
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

_TASK_KINDS = ("classification", "regression")


def read_meta(path: Path) -> dict:
    """Read and check ``meta.json``; returns it with ``task`` filled in."""
    if not path.is_file():
        raise TaskDataError(f"{path}: meta.json not found (every task directory needs one)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskDataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise TaskDataError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    task = meta.get("task", "classification")
    if task not in _TASK_KINDS:
        raise TaskDataError(f"{path}: key 'task' must be one of {list(_TASK_KINDS)}, got {task!r}")
    meta = {**meta, "task": task}
    if "sentence_pair" not in meta:
        raise TaskDataError(f"{path}: missing key 'sentence_pair' (true or false)")
    if not isinstance(meta["sentence_pair"], bool):
        raise TaskDataError(f"{path}: key 'sentence_pair' must be true or false, got {meta['sentence_pair']!r}")
    if task == "classification" and meta.get("label_names") is None:
        raise TaskDataError(
            f"{path}: missing key 'label_names' (list of class names) for a classification task"
            " (set \"task\": \"regression\" for a regression task)"
        )
    if "name" in meta and (not isinstance(meta["name"], str) or not meta["name"].strip()):
        raise TaskDataError(f"{path}: key 'name' must be a non-empty string, got {meta['name']!r}")
    return meta


def _split_files(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for split in SPLITS:
        candidates = sorted(p for p in root.iterdir() if p.stem == split and p.suffix.lower() in FORMATS)
        candidates = [p for p in candidates if p.is_file()]
        if len(candidates) > 1:
            raise TaskDataError(
                f"{root}: split {split!r} has several files {[p.name for p in candidates]}; keep exactly one"
            )
        if candidates:
            found[split] = candidates[0]
    return found


def _check_utf8(path: Path) -> bytes:
    """The bytes of a text-format file; TaskDataError naming the first line that is not valid UTF-8."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise TaskDataError(f"{path}: line {line}: not valid UTF-8 ({e.reason}, byte {raw[e.start]:#04x} at column "
                            f"{column}); re-save the file as UTF-8") from None
    return raw


def _row_names(path: Path, raw: bytes | None) -> RowName:
    """How errors name a data row of ``path``: its line (a row of a text file starts on one), else ``row N``.
    The reader skips blank lines, so they are skipped here too; csv records may span lines (quoted newlines)."""
    if raw is None:
        return data_row
    text = raw.decode("utf-8")
    if FORMATS[path.suffix.lower()] == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        next(reader, None)  # the header, line 1
        starts, end = [], reader.line_num  # end: the last line read so far
        for record in reader:
            if record:
                starts.append(end + 1)
            end = reader.line_num
    elif text.lstrip().startswith("["):  # a JSON array: one record per element, wherever its lines are
        return lambda i: f"record {i + 1}"
    else:
        starts = [n for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return lambda i: f"line {starts[i]}" if i < len(starts) else data_row(i)


def _read_file(path: Path) -> tuple[datasets.Dataset, RowName]:
    """The file as a Dataset, and how to name its rows in error messages."""
    builder = FORMATS[path.suffix.lower()]
    if path.stat().st_size == 0:
        raise TaskDataError(f"{path}: split is empty (the file has 0 bytes)")
    raw = None if builder == "parquet" else _check_utf8(path)
    rows = (lambda i: _row_names(path, raw)(i))  # the line table is built only when an error names a row
    kwargs: dict = {}
    if builder == "csv":
        # Texts "NA", "null", "" stay the strings they are (pandas would make them NaN); only an
        # empty label is missing. index_col=False: a row with too many fields must not silently
        # turn the first column into an index.
        # Texts are read as strings even when they look like numbers.
        kwargs = {
            "keep_default_na": False,
            "na_values": {"label": [""]},
            "index_col": False,
            "converters": {"text": str, "text_pair": str},
        }
    with (
        tempfile.TemporaryDirectory(prefix="coldfusion-task-") as cache,
        quiet_progress(),
        warnings.catch_warnings(),
    ):
        if builder == "csv":
            import pandas as pd

            # pandas only warns (and drops data) when a row has more fields than the header
            warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            ds = datasets.load_dataset(
                builder,
                data_files={"train": str(path)},
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
                **kwargs,
            )
        except Exception as e:  # pyarrow / pandas / datasets parse errors: name the file
            if isinstance(e, ValueError) and "corresponds to no data" in str(e):
                raise TaskDataError(f"{path}: split is empty (0 rows)") from e
            cause = e.__cause__ or e.__context__
            detail = f"{type(e).__name__}: {e}"
            if cause is not None and str(cause) not in detail:
                detail += f" ({type(cause).__name__}: {cause})"
            raise TaskDataError(f"{path}: could not be read as {builder}: {detail}") from e
    return ds, rows


def load_local_task(data_dir: str | Path, name: str | None = None) -> tuple[TaskInfo, datasets.DatasetDict]:
    """Load and check the task stored in ``data_dir`` (format: see the module docstring).

    Returns the task's :class:`TaskInfo` and a ``DatasetDict`` with ``train``, ``test`` and, when
    both a validation and a test file exist, ``validation``. Raises :class:`TaskDataError` naming
    the file, key, column, row and value at fault.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise TaskDataError(f"{root}: task directory does not exist")
    if not root.is_dir():
        raise TaskDataError(f"{root}: not a directory (expected a task directory with meta.json)")
    meta_path = root / "meta.json"
    meta = read_meta(meta_path)
    info = make_info(
        name if name is not None else meta.get("name") or root.resolve().name,
        regression=meta["task"] == "regression",
        sentence_pair=meta["sentence_pair"],
        label_names=meta.get("label_names"),
        where=str(meta_path),
    )
    files = _split_files(root)
    if "train" not in files:
        raise TaskDataError(
            f"{root}: no train file (expected train.jsonl, train.json, train.csv or train.parquet)"
        )
    if "test" not in files and "validation" not in files:
        raise TaskDataError(
            f"{root}: neither a test nor a validation file (expected test.<ext> or validation.<ext>)"
        )
    splits = {}
    for split, path in files.items():
        ds, rows = _read_file(path)
        splits[split] = normalise_split(ds, info, where=str(path), rows=rows)
    return info, assemble(splits, where=str(root))
