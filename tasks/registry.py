"""The task pool: which tasks take part, with which role, and how each one is loaded.

A pool entry is a small JSON-able dict, so the ServerApp can send it to the node that holds the task:

* ``{"source": "synthetic", "name": "syn03_...", "seed": 0, "num_tasks": 35, "train_size": .., "test_size": ..}``
* ``{"source": "local", "name": "rte", "path": "/abs/data/rte"}``: a directory in the local format
* ``{"source": "hub", "name": "sst2", "path": "glue", "config": "sst2", "text_column": "sentence", ...}``

plus ``"role"``: ``contributing`` (trains and is evaluated) or ``heldout`` (evaluated only, never trained on).

A ``catalog`` pool (``conf/tasks/shared_data.yaml``, ``conf/tasks/paper.yaml``) names datasets; each
name resolves through ``tasks.catalog``:

* ``{local: <dir under data_root, or null>, hub: {path, config, ...load_hub_task options}}``: the
  dataset can come from either place, and ``tasks.resolve`` chooses: ``local`` (the directory, when
  it exists), ``hub`` (the hub definition) or ``auto`` (local where present, else hub). ``local``
  defaults to the dataset's name; ``split_policy`` is a note on how its splits are used.
* ``{source: local, path: ...}`` or ``{source: hub, path: ..., ...}``: pinned to that source.
* no catalog entry: the directory ``data_root/<name>``.

Nothing is fetched while resolving (a hub entry is not checked for reachability), so a pool resolves
offline. A dataset that resolves nowhere is *missing*; ``tasks.on_missing`` says what then happens:
``error`` (a :class:`TaskDataError` listing every one and where it was looked for) or ``skip``
(a WARNING naming each one and its role; the run goes on with the rest). Missing datasets are found
after the roles are assigned, so they are reported with the role they would have had.

Roles come from ``tasks.contributing`` / ``tasks.heldout``, or, with ``tasks.folds: k``, from a
k-fold split of those datasets taken together (:func:`assign_folds`, the paper's seen/unseen
protocol: 36 datasets, 3 folds -> 24 contributing, 12 held out): fold ``tasks.fold`` is held out.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from tasks.spec import TaskDataError, TaskInfo

ROLES = ("contributing", "heldout")
RESOLVE_MODES = ("local", "hub", "auto")
ON_MISSING = ("error", "skip")
CATALOG_KEYS = ("local", "hub", "split_policy")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MissingDataset:
    """A dataset of the pool that resolved nowhere: its name, the role it would have had, and why."""

    name: str
    role: str
    reason: str


@dataclass
class PoolResolution:
    """The resolved pool: ``entries`` (as :func:`build_pool` returns them) and the ``missing`` datasets."""

    entries: list[dict[str, Any]]
    missing: list[MissingDataset] = field(default_factory=list)
    on_missing: str = "error"
    resolve: str | None = None  # None for a synthetic pool

    def check(self) -> list[dict[str, Any]]:
        """Apply ``on_missing`` (raise, or warn naming every missing dataset) and return the entries."""
        if self.missing:
            listing = "; ".join(f"{m.name} ({m.role}): {m.reason}" for m in self.missing)
            if self.on_missing == "error":
                raise TaskDataError(
                    f"{len(self.missing)} dataset(s) of the pool are not available (tasks.resolve="
                    f"{self.resolve}): {listing}. Set tasks.data_root, tasks.resolve=auto or hub (with hub "
                    "access), tasks.on_missing=skip to leave them out, or remove them from tasks.contributing / "
                    "tasks.heldout."
                )
            log.warning(
                "tasks.on_missing=skip: %d dataset(s) of the pool are not available and are left out: %s",
                len(self.missing), listing,
            )
        if not self.entries:
            raise TaskDataError("the task pool is empty: list datasets in tasks.contributing")
        if not any(e["role"] == "contributing" for e in self.entries):
            raise TaskDataError("the task pool has no contributing dataset: list available datasets in tasks.contributing")
        return self.entries


def build_pool(tasks_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Expand the ``tasks`` config group into the ordered list of pool entries (no data is loaded)."""
    return resolve_pool(tasks_cfg).entries


def resolve_pool(tasks_cfg: Mapping[str, Any], *, check: bool = True) -> PoolResolution:
    """Resolve the ``tasks`` config group: the pool entries and the datasets found nowhere.

    With ``check`` (the default) ``tasks.on_missing`` is applied (:meth:`PoolResolution.check`);
    ``check=False`` only reports, for a caller that shows the resolution before judging it.
    Configuration errors (an unknown ``tasks.resolve``, a bad fold index, ...) always raise.
    """
    kind = tasks_cfg.get("kind")
    if kind == "synthetic":
        resolution = PoolResolution(_synthetic_pool(tasks_cfg))
    elif kind == "catalog":
        resolution = _catalog_pool(tasks_cfg)
    else:
        raise TaskDataError(f"tasks.kind must be 'synthetic' or 'catalog', got '{kind}'")
    if check:
        resolution.check()
    return resolution


def _synthetic_pool(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    from tasks.synthetic import default_heldout, synthetic_task_infos

    seed, num_tasks = int(cfg["seed"]), int(cfg["num_tasks"])
    names = [info.name for info in synthetic_task_infos(seed, num_tasks)]
    heldout = cfg.get("heldout")
    if heldout is None:
        heldout = default_heldout(seed, num_tasks, int(cfg["num_heldout"]))
    _check_known(heldout, names, "tasks.heldout")
    common = {"source": "synthetic", "seed": seed, "num_tasks": num_tasks,
              "train_size": int(cfg["train_size"]), "test_size": int(cfg["test_size"])}
    return [
        {**common, "name": name, "role": "heldout" if name in set(heldout) else "contributing"}
        for name in names
    ]


def assign_folds(names: list[str], folds: int, seed: int = 0) -> list[list[str]]:
    """Split ``names`` into ``folds`` folds: a seeded shuffle of the sorted names, dealt round-robin.

    Depends only on the set of names, ``folds`` and ``seed`` (not on the order they are listed in),
    so every node and every run agree; fold sizes differ by at most one. Each fold is sorted.
    """
    order = sorted(set(names))
    random.Random(seed).shuffle(order)
    return [sorted(order[i::folds]) for i in range(folds)]


def _int_key(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TaskDataError(f"tasks.{key} must be an integer, got {value!r}")
    return value


def _roles(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, role) for every dataset of the pool, in the order listed, folds applied."""
    listed = {role: [str(n) for n in (cfg.get(role) or [])] for role in ROLES}
    names = listed["contributing"] + listed["heldout"]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TaskDataError(f"tasks.contributing / tasks.heldout: dataset(s) listed more than once: {twice}")
    folds = _int_key(cfg, "folds", None)
    if folds is None:
        return [(n, role) for role in ROLES for n in listed[role]]
    if not 2 <= folds <= len(names):
        raise TaskDataError(
            f"tasks.folds must be null or an integer from 2 to the number of datasets in tasks.contributing + "
            f"tasks.heldout ({len(names)}), got {folds}"
        )
    fold = _int_key(cfg, "fold", 0)
    if fold is None or not 0 <= fold < folds:
        raise TaskDataError(f"tasks.fold must be an integer in [0, {folds}) (the held-out fold of tasks.folds={folds}), got {fold!r}")
    heldout = set(assign_folds(names, folds, _int_key(cfg, "fold_seed", 0) or 0)[fold])
    return [(n, "heldout" if n in heldout else "contributing") for n in names]


def _choice(cfg: Mapping[str, Any], key: str, allowed: tuple[str, ...], default: str) -> str:
    value = cfg.get(key)
    value = default if value is None else value
    if value not in allowed:
        raise TaskDataError(f"tasks.{key} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def _hub_options(name: str, hub: Any) -> dict[str, Any]:
    """A catalog ``hub:`` definition checked against :func:`tasks.hub.load_hub_task`'s arguments."""
    from tasks.formatting import get_formatter
    from tasks.hub import load_hub_task

    where = f"tasks.catalog.{name}.hub"
    if not isinstance(hub, Mapping) or not isinstance(hub.get("path"), str) or not hub["path"]:
        raise TaskDataError(f"{where} must be a mapping with a 'path' (the hub dataset id), got {hub!r}")
    accepted = set(inspect.signature(load_hub_task).parameters) - {"name"}
    unknown = sorted(set(hub) - accepted)
    if unknown:
        raise TaskDataError(f"{where}: unknown key(s) {unknown}; load_hub_task accepts {sorted(accepted)}")
    if hub.get("format") is not None:
        try:
            get_formatter(hub["format"])
        except TaskDataError as e:
            raise TaskDataError(f"{where}.format: {e}") from None
    return dict(hub)


def _resolve_one(name: str, definition: Any, data_root: Path, resolve: str) -> tuple[dict[str, Any] | None, str]:
    """(entry without name and role, "") or (None, why it resolved nowhere)."""
    if definition is not None and not isinstance(definition, Mapping):
        raise TaskDataError(f"tasks.catalog.{name} must be a mapping, got {definition!r}")
    d = dict(definition or {})
    if "source" in d:  # pinned: the older catalog form, kept as it was
        if d["source"] != "local":
            return d, ""
        path = Path(str(d.get("path", data_root / name))).expanduser().resolve()
        return ({**d, "path": str(path)}, "") if path.is_dir() else (None, f"no directory {path}")
    unknown = sorted(set(d) - set(CATALOG_KEYS))
    if unknown:
        raise TaskDataError(
            f"tasks.catalog.{name}: unknown key(s) {unknown}; use {list(CATALOG_KEYS)} "
            "(or source: local | hub with that source's options)"
        )
    local_name = d.get("local", name)
    reasons = []
    if resolve in ("local", "auto"):
        if local_name is None:
            reasons.append("no local copy (catalog local: null)")
        else:
            path = (data_root / str(local_name)).expanduser().resolve()
            if path.is_dir():
                return {"source": "local", "path": str(path)}, ""
            reasons.append(f"no directory {path}")
    if resolve in ("hub", "auto"):
        if d.get("hub") is None:
            reasons.append("no hub definition in tasks.catalog")
        else:
            return {"source": "hub", **_hub_options(name, d["hub"])}, ""
    return None, "; ".join(reasons)


def _catalog_pool(cfg: Mapping[str, Any]) -> PoolResolution:
    """Named datasets, each resolved through ``tasks.catalog`` (see the module docstring)."""
    resolve = _choice(cfg, "resolve", RESOLVE_MODES, "local")
    on_missing = _choice(cfg, "on_missing", ON_MISSING, "error")
    catalog = cfg.get("catalog") or {}
    if not isinstance(catalog, Mapping):
        raise TaskDataError(f"tasks.catalog must be a mapping of dataset name -> definition, got {catalog!r}")
    data_root = Path(str(cfg.get("data_root") or ".")).expanduser().resolve()
    entries, missing = [], []
    for name, role in _roles(cfg):
        entry, reason = _resolve_one(name, catalog.get(name), data_root, resolve)
        if entry is None:
            missing.append(MissingDataset(name, role, reason))
        else:
            entries.append({**entry, "name": name, "role": role})
    return PoolResolution(entries, missing, on_missing, resolve)


def _check_known(names, known, where: str) -> None:
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        raise TaskDataError(f"{where}: unknown task(s) {unknown}; known tasks include {list(known)[:5]}")


def load_task(entry: Mapping[str, Any]) -> tuple[TaskInfo, DatasetDict]:
    """Load one pool entry's data (train/test[/validation] with text, [text_pair], label)."""
    source = entry.get("source")
    if source == "synthetic":
        from tasks.synthetic import load_synthetic, synthetic_task_infos

        infos = {i.name: i for i in synthetic_task_infos(int(entry["seed"]), int(entry["num_tasks"]))}
        if entry["name"] not in infos:
            _check_known([entry["name"]], infos, "synthetic task")
        data = load_synthetic(entry["name"], int(entry["seed"]), int(entry["num_tasks"]),
                              int(entry["train_size"]), int(entry["test_size"]))
        return infos[entry["name"]], data
    if source == "local":
        from tasks.local import load_local_task

        return load_local_task(entry["path"], entry.get("name"))
    if source == "hub":
        from tasks.hub import load_hub_task

        options = {k: v for k, v in entry.items() if k not in ("source", "path", "config", "role")}
        return load_hub_task(entry["path"], entry.get("config"), **options)
    raise TaskDataError(f"task '{entry.get('name')}': unknown source '{source}' (synthetic, local or hub)")


@lru_cache(maxsize=64)
def load_task_cached(entry_json: str) -> tuple[TaskInfo, DatasetDict]:
    """``load_task`` memoised per process: a simulation actor serves many rounds and many tasks."""
    return load_task(json.loads(entry_json))


def entry_key(entry: Mapping[str, Any]) -> str:
    """Canonical JSON of an entry without its role (the role does not change the data)."""
    return json.dumps({k: v for k, v in entry.items() if k != "role"}, sort_keys=True)
