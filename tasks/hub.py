"""Load a task from the Hugging Face Hub (or anything else ``datasets.load_dataset`` accepts).

The dataset is fetched with ``datasets.load_dataset(path, config)`` (and cached where ``datasets``
caches, ``HF_DATASETS_CACHE`` unless ``cache_dir`` is given); its columns are mapped onto the task
schema and checked by the same code as local task directories (:mod:`tasks.validate`).

Split policy (as for local directories): ``train`` is required; without ``test``, ``validation``
becomes ``test``. With the default split mapping, a hub split whose labels are all ``-1`` (the
hidden test labels of GLUE-style sets) counts as absent, so e.g. ``glue/sst2`` is evaluated on
its validation split. An explicit ``splits`` mapping is taken literally.

Multi-field datasets (COPA, WiC, WSC, MultiRC, ...) take ``format=<name>``: the named formatter of
:mod:`tasks.formatting` builds ``text`` (and ``text_pair``) from the raw fields of each example
(``Dataset.map``) before the column mapping, so the hub copy gives the same inputs as the local one.

Label names come from the label column's ``ClassLabel`` feature, or from ``label_names``.
Without network access (or with ``HF_HUB_OFFLINE=1`` and nothing cached) loading fails with a
:class:`TaskDataError` that suggests a local task directory (:mod:`tasks.local`) instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import datasets

from tasks.formatting import Formatter, get_formatter
from tasks.spec import TaskDataError, TaskInfo
from tasks.validate import SPLITS, assemble, is_unlabelled, make_info, normalise_split

__all__ = ["DEFAULT_SPLITS", "load_hub_task"]

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {"train": "train", "validation": "validation", "test": "test"}


def _default_name(path: str, config: str | None) -> str:
    base = Path(path.rstrip("/")).name or path
    return f"{base}_{config}" if config else base


def _apply_format(ds: datasets.Dataset, formatter: Formatter, where: str) -> datasets.Dataset:
    """``ds`` with the formatter's ``text`` / ``text_pair`` columns (overwriting raw ones of that name)."""
    absent = [f for f in formatter.fields if f not in ds.column_names]
    if absent:
        raise TaskDataError(
            f"{where}: format {formatter.name!r} needs the raw field(s) {absent}; the split has columns {ds.column_names}"
        )
    try:
        return ds.map(formatter.fn, desc=f"format {formatter.name}")
    except TaskDataError as e:
        raise TaskDataError(f"{where}: {e}") from None


def load_hub_task(
    path: str,
    config: str | None = None,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    splits: Mapping[str, str] | None = None,
    name: str | None = None,
    label_names: Sequence[str] | None = None,
    regression: bool = False,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    format: str | None = None,
) -> tuple[TaskInfo, datasets.DatasetDict]:
    """Load ``datasets.load_dataset(path, config)`` as a task.

    ``splits`` maps our split names (``train``/``validation``/``test``) to the dataset's; by
    default those of ``train``/``validation``/``test`` that exist. The task is sentence-pair iff
    ``text_pair_column`` is given. ``name`` defaults to the last part of ``path``, plus
    ``_<config>``. ``revision`` pins the hub revision (advisable when several nodes must see the
    same data). ``format`` names a formatter of :mod:`tasks.formatting`; it writes ``text`` (and,
    for a pair formatter, ``text_pair``) from the raw fields of the chosen splits, and those
    columns are used (``text_column`` / ``text_pair_column`` are then ignored). Raises
    :class:`TaskDataError` on any problem.
    """
    source = f"hub dataset {path!r}" + (f" (config {config!r})" if config else "")
    formatter = get_formatter(format) if format is not None else None
    if formatter is not None:
        text_column = "text"
        text_pair_column = "text_pair" if formatter.pair else None
    explicit = splits is not None
    mapping = dict(splits) if explicit else dict(DEFAULT_SPLITS)
    bad = sorted(set(mapping) - set(SPLITS))
    if bad:
        raise TaskDataError(f"{source}: unknown split names {bad} in splits=; use {list(SPLITS)}")
    if "train" not in mapping:
        raise TaskDataError(f"{source}: splits= must map 'train' to a split of the dataset")

    try:
        raw = datasets.load_dataset(
            path, config, revision=revision, cache_dir=str(cache_dir) if cache_dir is not None else None
        )
    except Exception as e:
        raise TaskDataError(
            f"{source}: could not be fetched with datasets.load_dataset ({type(e).__name__}: {e}). "
            "Without network access to the Hugging Face Hub (or with HF_HUB_OFFLINE=1 and nothing "
            "cached), download the data once elsewhere and load it from a local task directory "
            "with tasks.local.load_local_task(<dir>) (format: see tasks/local.py)."
        ) from e
    if not isinstance(raw, datasets.DatasetDict):
        raise TaskDataError(f"{source}: datasets.load_dataset returned {type(raw).__name__}, not a DatasetDict")

    available = list(raw.keys())
    chosen: dict[str, str] = {}
    for ours, theirs in mapping.items():
        if theirs in raw:
            chosen[ours] = theirs
        elif explicit or ours == "train":
            raise TaskDataError(
                f"{source}: has no split {theirs!r} (for our {ours!r}); available splits: {available}"
                + ("" if explicit else "; pass splits={'train': ..., 'test': ...}")
            )
    if not explicit:
        for ours in [s for s in ("test", "validation") if s in chosen]:
            if is_unlabelled(raw[chosen[ours]], label_column):
                log.warning("%s: split %r has no labels (all -1); not used", source, chosen[ours])
                del chosen[ours]

    if formatter is not None:
        raw = datasets.DatasetDict(
            {theirs: _apply_format(raw[theirs], formatter, f"{source} split {theirs!r}") for theirs in chosen.values()}
        )

    train = raw[chosen["train"]]
    if label_column not in train.column_names:
        raise TaskDataError(
            f"{source} split {chosen['train']!r}: missing column {label_column!r} (used as 'label'); "
            f"the split has columns {train.column_names}"
        )
    feature = train.features[label_column]
    names_key = "label_names"
    names: Sequence[str] | None = label_names
    if isinstance(feature, datasets.ClassLabel):
        if regression:
            raise TaskDataError(
                f"{source}: column {label_column!r} is a ClassLabel {feature.names} but regression=True"
            )
        if label_names is None:
            names, names_key = feature.names, f"ClassLabel names of column {label_column!r}"
        elif len(label_names) != feature.num_classes:
            raise TaskDataError(
                f"{source}: label_names has {len(label_names)} names but column {label_column!r} is a "
                f"ClassLabel with {feature.num_classes}: {feature.names}"
            )
    elif not regression and label_names is None:
        raise TaskDataError(
            f"{source}: column {label_column!r} has no class names (feature {feature}); pass "
            "label_names=[...] (class index order), or regression=True for a numeric target"
        )

    info = make_info(
        name if name is not None else _default_name(path, config),
        regression=regression,
        sentence_pair=text_pair_column is not None,
        label_names=names,
        where=source,
        label_names_key=names_key,
    )
    parts = {
        ours: normalise_split(
            raw[theirs],
            info,
            where=f"{source} split {theirs!r}",
            text_column=text_column,
            text_pair_column=text_pair_column,
            label_column=label_column,
        )
        for ours, theirs in chosen.items()
    }
    if "test" not in parts and "validation" not in parts:
        raise TaskDataError(
            f"{source}: no labelled 'test' or 'validation' split (available: {available}); "
            "pass splits={'train': ..., 'test': ...}"
        )
    return info, assemble(parts, where=source)
