"""Checks and normalisation shared by every task source (:mod:`tasks.local`, :mod:`tasks.hub`).

A source reads raw tables however it likes, then hands each split to :func:`normalise_split`,
which checks it and returns it in the task schema of :mod:`tasks.spec`: the columns ``text``
(str), ``text_pair`` (str, sentence-pair tasks only) and ``label`` (int64 in ``[0, num_labels)``
or float32 for regression), nothing else. :func:`assemble` then applies the split policy. Every
problem raises :class:`~tasks.spec.TaskDataError` whose message starts with *where* (a file path,
or a hub dataset and split) and names the column, the row and the value. Rows are named by the
source's ``rows`` function: a local file's 1-based line (header counted) for jsonl and csv, else
``row N`` counting data rows from 1 (:func:`data_row`). Text that is not valid UTF-8 (pyarrow's
readers accept it; it fails only when a node reads the row) is an error here.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from tasks.spec import TaskDataError, TaskInfo

SPLITS = ("train", "validation", "test")

_INT_LITERAL = re.compile(r"[+-]?[0-9]{1,18}")

__all__ = ["SPLITS", "make_info", "normalise_split", "assemble", "quiet_progress", "is_unlabelled", "data_row"]

# How an error names the data row at 0-based index i: "line 6", "row 5", ...
RowName = Callable[[int], str]


def data_row(i: int) -> str:
    """The default row name: data rows counted from 1 (a parquet file's or a hub split's row)."""
    return f"row {i + 1}"


def _check_utf8(col: pa.ChunkedArray, what: str, where: str, rows: RowName) -> None:
    """TaskDataError naming the first value that is not valid UTF-8 (pyarrow's json and parquet readers
    accept such bytes in a string column; only converting the row to Python fails, on a node, mid-run)."""
    try:
        col.validate(full=True)
        return
    except pa.ArrowInvalid:
        pass
    for i, value in enumerate(col.cast(pa.binary()).to_pylist()):
        try:
            (value or b"").decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaskDataError(f"{where}: {what} {rows(i)}: not valid UTF-8 ({e.reason} at byte {e.start}: "
                                f"{value[max(e.start - 20, 0):e.start + 1]!r}); re-save the file as UTF-8") from None


def make_info(
    name: object,
    *,
    regression: bool,
    sentence_pair: bool,
    label_names: Sequence[object] | None,
    where: str,
    label_names_key: str = "label_names",
) -> TaskInfo:
    """Build a checked :class:`TaskInfo`; ``label_names_key`` is how the caller names that input."""
    if not isinstance(name, str) or not name.strip():
        raise TaskDataError(f"{where}: task name must be a non-empty string, got {name!r}")
    if label_names is not None and (
        isinstance(label_names, (str, bytes)) or not isinstance(label_names, Sequence)
    ):
        raise TaskDataError(f"{where}: {label_names_key!r} must be a list of strings, got {label_names!r}")
    names = tuple(label_names or ())
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n:
            raise TaskDataError(f"{where}: {label_names_key!r}[{i}] must be a non-empty string, got {n!r}")
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise TaskDataError(f"{where}: {label_names_key!r} has duplicate names {dupes}")
    if regression:
        if len(names) > 1:
            raise TaskDataError(
                f"{where}: a regression task has one output; {label_names_key!r} must be empty, null or "
                f"a single name, got {list(names)}"
            )
        return TaskInfo(name=name, num_labels=1, sentence_pair=bool(sentence_pair), label_names=names)
    if len(names) < 2:
        raise TaskDataError(
            f"{where}: a classification task needs {label_names_key!r} with at least 2 names, got "
            f"{list(names) if label_names is not None else None!r} (for a regression task say so explicitly)"
        )
    return TaskInfo(name=name, num_labels=len(names), sentence_pair=bool(sentence_pair), label_names=names)


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first True in a boolean mask (nulls count as False), -1 if none."""
    mask = pc.fill_null(mask, False)
    return pc.index(mask, True).as_py()


def _is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _decode(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(col.type):
        return col.cast(col.type.value_type)
    return col


def _mixed(col: pa.ChunkedArray) -> list | None:
    """Python values of a column of mixed JSON types, None for an ordinary column.

    The ``datasets`` json builder stores a field whose rows have different JSON types (``1`` in one
    row, ``"x"`` in another) as an ``arrow.json`` extension column of JSON-encoded strings.
    """
    if not isinstance(col.type, pa.BaseExtensionType):
        return None
    values = pa.chunked_array([c.storage for c in col.chunks], type=col.type.storage_type).to_pylist()
    if getattr(col.type, "extension_name", "") == "arrow.json":
        values = [None if v is None else json.loads(v) for v in values]
    return values


def _py_class_labels(values: list, info: TaskInfo, what: str, where: str, rows: RowName) -> pa.Array:
    n, names = info.num_labels, info.label_names
    out = []
    for i, v in enumerate(values):
        if v is None:
            raise TaskDataError(f"{where}: {what} is null at {rows(i)}")
        if isinstance(v, str) and v in names:
            v = names.index(v)
        elif isinstance(v, str) and _INT_LITERAL.fullmatch(v.strip()):
            v = int(v)
        elif isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        elif isinstance(v, bool) or not isinstance(v, int):
            raise TaskDataError(
                f"{where}: {what} {rows(i)}: label {v!r} is neither an integer class index nor one of the "
                f"label names {list(names)}"
            )
        if not 0 <= v < n:
            raise TaskDataError(
                f"{where}: {what} {rows(i)}: label {values[i]!r} is outside [0, {n}) (label names {list(names)})"
            )
        out.append(v)
    return pa.array(out, pa.int64())


def _py_regression_labels(values: list, what: str, where: str, rows: RowName) -> pa.Array:
    for i, v in enumerate(values):
        if v is None:
            raise TaskDataError(f"{where}: {what} is null at {rows(i)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TaskDataError(
                f"{where}: {what} {rows(i)}: label {v!r} is not numeric; a regression task needs numeric labels"
            )
        if not math.isfinite(v):
            raise TaskDataError(f"{where}: {what} {rows(i)}: label {v!r} is not a finite number")
    return pa.array([float(v) for v in values], pa.float32())


def _text_column(table: pa.Table, column: str, role: str, where: str, rows: RowName) -> pa.ChunkedArray:
    col = _decode(table.column(column))
    what = f"column {column!r}" + ("" if column == role else f" (used as {role!r})")
    values = _mixed(col)
    if values is not None:
        for i, v in enumerate(values):
            if v is None:
                raise TaskDataError(f"{where}: {what} is null at {rows(i)}")
            if not isinstance(v, str):
                raise TaskDataError(f"{where}: {what} {rows(i)}: value {v!r} is not a string")
    if pa.types.is_null(col.type):
        raise TaskDataError(f"{where}: {what} is null in every row (first: {rows(0)})")
    if not _is_text_type(col.type):
        raise TaskDataError(
            f"{where}: {what} must hold strings, found type {col.type} ({rows(0)} value {col[0].as_py()!r})"
        )
    i = _first(pc.is_null(col))
    if i >= 0:
        raise TaskDataError(f"{where}: {what} is null at {rows(i)}")
    return col.cast(pa.string())


def _class_labels(col: pa.ChunkedArray, info: TaskInfo, what: str, where: str, rows: RowName) -> pa.ChunkedArray:
    n = info.num_labels
    t = col.type
    if pa.types.is_null(t):
        raise TaskDataError(f"{where}: {what} is null in every row (first: {rows(0)})")
    i = _first(pc.is_null(col))
    if i >= 0:
        raise TaskDataError(f"{where}: {what} is null at {rows(i)}")
    if pa.types.is_boolean(t):
        if n != 2:
            raise TaskDataError(f"{where}: {what} holds booleans but the task has {n} labels")
        return col.cast(pa.int64())
    if _is_text_type(t):
        # a label name, else an integer literal (a csv column with one stray value is all strings)
        idx = pc.index_in(col, value_set=pa.array(info.label_names, pa.string())).cast(pa.int64())
        stripped = pc.utf8_trim_whitespace(col)
        is_int = pc.match_substring_regex(stripped, f"^{_INT_LITERAL.pattern}$")
        as_int = pc.if_else(is_int, stripped, pa.scalar(None, pa.string())).cast(pa.int64())
        idx = pc.coalesce(idx, as_int)
        i = _first(pc.is_null(idx))
        if i >= 0:
            raise TaskDataError(
                f"{where}: {what} {rows(i)}: label {col[i].as_py()!r} is neither an integer nor one of "
                f"the label names {list(info.label_names)}"
            )
        _check_range(idx, col, info, where, what, rows)
        return idx
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        f = col.cast(pa.float64())
        i = _first(pc.invert(pc.is_finite(f)))
        if i < 0:
            i = _first(pc.not_equal(f, pc.floor(f)))
        if i >= 0:
            raise TaskDataError(
                f"{where}: {what} {rows(i)}: label {col[i].as_py()!r} is not an integer class index "
                f"(classification task with {n} labels)"
            )
        _check_range(f, col, info, where, what, rows)
        return f.cast(pa.int64())
    if pa.types.is_integer(t):
        _check_range(col, col, info, where, what, rows)
        return col.cast(pa.int64())
    raise TaskDataError(
        f"{where}: {what} must hold integer class indices, found type {t} ({rows(0)} value {col[0].as_py()!r})"
    )


def _regression_labels(col: pa.ChunkedArray, what: str, where: str, rows: RowName) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_null(t):
        raise TaskDataError(f"{where}: {what} is null in every row (first: {rows(0)})")
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)):
        i = _first(pc.is_valid(col))
        i = max(i, 0)
        raise TaskDataError(
            f"{where}: {what} {rows(i)}: label {col[i].as_py()!r} is not numeric (type {t}); "
            f"a regression task needs numeric labels"
        )
    f = col.cast(pa.float64())
    i = _first(pc.is_null(f))
    if i >= 0:
        raise TaskDataError(f"{where}: {what} is null at {rows(i)}")
    i = _first(pc.invert(pc.is_finite(f)))
    if i >= 0:
        raise TaskDataError(f"{where}: {what} {rows(i)}: label {col[i].as_py()!r} is not a finite number")
    return f.cast(pa.float32())


def _table(ds: datasets.Dataset | pa.Table) -> pa.Table:
    if isinstance(ds, pa.Table):
        return ds
    return ds.with_format("arrow")[:]  # honours an indices mapping; zero-copy otherwise


def normalise_split(
    ds: datasets.Dataset | pa.Table,
    info: TaskInfo,
    *,
    where: str,
    text_column: str = "text",
    text_pair_column: str | None = "text_pair",
    label_column: str = "label",
    rows: RowName = data_row,
) -> datasets.Dataset:
    """Check one split against ``info`` and return it with exactly the schema columns.

    Extra columns are dropped. ``text_pair_column`` is only read when ``info.sentence_pair``.
    Classification labels may be integers, integral floats, booleans (2 labels) or label names;
    regression labels any finite number. ``rows`` names a row in error messages (default :func:`data_row`).
    """
    table = _table(ds)
    wanted = [("text", text_column)]
    if info.sentence_pair:
        if not text_pair_column:
            raise TaskDataError(f"{where}: the task is sentence-pair but no text-pair column was given")
        wanted.append(("text_pair", text_pair_column))
    wanted.append(("label", label_column))
    for role, column in wanted:
        if column not in table.column_names:
            hint = "" if column == role else f" (used as {role!r})"
            raise TaskDataError(
                f"{where}: missing column {column!r}{hint}; the file has columns {table.column_names}"
            )
    if table.num_rows == 0:
        raise TaskDataError(f"{where}: split is empty (0 rows)")

    for role, column in wanted:
        col = _decode(table.column(column))
        if _is_text_type(col.type):
            _check_utf8(col, f"column {column!r}", where, rows)
    arrays: dict[str, pa.ChunkedArray] = {}
    for role, column in wanted[:-1]:
        arrays[role] = _text_column(table, column, role, where, rows)
    label = _decode(table.column(label_column))
    what = f"column {label_column!r}" + ("" if label_column == "label" else " (used as 'label')")
    values = _mixed(label)
    if info.is_regression:
        arrays["label"] = (
            _regression_labels(label, what, where, rows)
            if values is None
            else _py_regression_labels(values, what, where, rows)
        )
        label_feature = datasets.Value("float32")
    else:
        arrays["label"] = (
            _class_labels(label, info, what, where, rows)
            if values is None
            else _py_class_labels(values, info, what, where, rows)
        )
        label_feature = datasets.Value("int64")

    features = datasets.Features({role: datasets.Value("string") for role in arrays if role != "label"})
    features["label"] = label_feature
    out = pa.Table.from_arrays([arrays[k] for k in features], names=list(features))
    return datasets.Dataset(out, info=datasets.DatasetInfo(features=features))


def assemble(splits: Mapping[str, datasets.Dataset], *, where: str) -> datasets.DatasetDict:
    """Apply the split policy: ``train`` required; without ``test``, ``validation`` becomes ``test``.

    When validation stands in for test it is *moved* (there is then no separate validation
    split), so nothing is ever selected on the data it is scored on.
    """
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise TaskDataError(f"{where}: unknown split names {unknown}; use {list(SPLITS)}")
    if "train" not in splits:
        raise TaskDataError(f"{where}: no 'train' split")
    parts = dict(splits)
    if "test" not in parts:
        if "validation" not in parts:
            raise TaskDataError(f"{where}: neither a 'test' nor a 'validation' split to evaluate on")
        parts["test"] = parts.pop("validation")
    return datasets.DatasetDict({s: parts[s] for s in SPLITS if s in parts})


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide datasets' progress bars and log lines while reading local files (milliseconds each)."""
    was = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    if was:
        datasets.disable_progress_bars()
    # parse failures are re-raised as TaskDataError naming the file; don't log them twice
    datasets.logging.set_verbosity(max(verbosity, datasets.logging.CRITICAL))
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was:
            datasets.enable_progress_bars()


def is_unlabelled(ds: datasets.Dataset, label_column: str) -> bool:
    """True when every label is -1 or null: the hidden-label test splits of GLUE-style hub sets."""
    if label_column not in ds.column_names or ds.num_rows == 0:
        return False
    col = _decode(_table(ds).column(label_column))
    if pa.types.is_null(col.type):
        return True
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        return False
    unl = pc.or_kleene(pc.is_null(col), pc.equal(col, -1))
    return bool(pc.all(pc.fill_null(unl, True)).as_py())



def _check_range(values, col, info: TaskInfo, where: str, what: str, rows: RowName) -> None:
    """TaskDataError naming the first row whose class index is outside [0, num_labels)."""
    n = info.num_labels
    i = _first(pc.or_(pc.less(values, 0), pc.greater_equal(values, n)))
    if i >= 0:
        raise TaskDataError(
            f"{where}: {what} {rows(i)}: label {col[i].as_py()!r} is outside [0, {n}) "
            f"(label names {list(info.label_names)})"
        )
