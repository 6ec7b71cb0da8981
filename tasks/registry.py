"""The task pool: which tasks take part, with which role, and how each one is loaded.

A pool entry is a small JSON-able dict, so the ServerApp can send it to the node that holds the task:

* ``{"source": "synthetic", "name": "syn03_...", "seed": 0, "num_tasks": 35, "train_size": .., "test_size": ..}``
* ``{"source": "local", "name": "rte", "path": "/abs/data/rte"}``: a directory in the local format
* ``{"source": "hub", "name": "sst2", "path": "glue", "config": "sst2", "text_column": "sentence", ...}``

plus ``"role"``: ``contributing`` (trains and is evaluated) or ``heldout`` (evaluated only, never trained on).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from datasets import DatasetDict

from tasks.spec import TaskDataError, TaskInfo

ROLES = ("contributing", "heldout")


def build_pool(tasks_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Expand the ``tasks`` config group into the ordered list of pool entries (no data is loaded)."""
    kind = tasks_cfg.get("kind")
    if kind == "synthetic":
        return _synthetic_pool(tasks_cfg)
    if kind == "catalog":
        return _catalog_pool(tasks_cfg)
    raise TaskDataError(f"tasks.kind must be 'synthetic' or 'catalog', got '{kind}'")


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


def _catalog_pool(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Named datasets: each resolves to a definition in ``tasks.catalog`` or a directory under ``data_root``."""
    catalog = dict(cfg.get("catalog") or {})
    data_root = Path(str(cfg.get("data_root") or ".")).expanduser().resolve()
    entries, missing = [], []
    for role in ROLES:
        for name in list(cfg.get(role) or []):
            definition = dict(catalog.get(name) or {})
            if definition.get("source", "local") == "local":
                path = Path(str(definition.get("path", data_root / name))).expanduser().resolve()
                if not path.is_dir():
                    missing.append(f"{name} (looked in {path})")
                    continue
                definition.update(source="local", path=str(path))
            entries.append({**definition, "name": name, "role": role})
    if missing:
        raise TaskDataError(
            f"{len(missing)} dataset(s) of the pool are not available locally: " + "; ".join(missing)
            + ". Set tasks.data_root, or remove them from tasks.contributing / tasks.heldout."
        )
    if not entries:
        raise TaskDataError("the task pool is empty: list datasets in tasks.contributing")
    return entries


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
