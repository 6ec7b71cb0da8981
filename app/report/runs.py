"""Loading a run directory (``config.yaml``, ``metrics.jsonl`` through the record schema, ``pool.json``) for a report."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from app.run.outputs import METRICS_FILE, read_round_records
from strategies.records import RecordError, RoundRecord


class ReportError(ValueError):
    """A run directory or an argument that cannot be reported on; the message names the file or argument."""


@dataclass(frozen=True)
class Run:
    """What a run directory holds, read once: the resolved config, the per-round records, the missing datasets."""

    dir: Path
    config: dict[str, Any]
    records: list[RoundRecord]
    missing: list[dict[str, Any]]


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; a missing, corrupt or unreadable metrics file is a ReportError naming the file."""
    path = Path(run_dir).expanduser()
    metrics = path / METRICS_FILE
    try:
        records = read_round_records(path)
    except FileNotFoundError:
        raise ReportError(f"{metrics}: not found (is {path} a run directory?)") from None
    except RecordError as exc:
        raise ReportError(f"{metrics}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ReportError(f"{metrics}: cannot be read: {exc}") from None
    if not records:
        raise ReportError(f"{metrics}: expected one JSON object with an integer 'round' per line")
    return Run(path, _load_config(path / "config.yaml"), records, _load_missing(path / "pool.json"))


def _load_config(path: Path) -> dict[str, Any]:
    """The resolved config; a run without one still gets a report (its facts then read 'unknown')."""
    if not path.exists():
        return {}
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, ValueError, yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ReportError(f"{path}: cannot be read: {exc}") from None
    return config if isinstance(config, dict) else {}


def _load_missing(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        missing = json.loads(path.read_text()).get("missing") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise ReportError(f"{path}: cannot be read: {exc}") from None
    return [m for m in missing if isinstance(m, dict)]


def cfg_get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``config[a][b]...`` for ``dotted`` = ``"a.b..."``, or ``default`` where any key is absent."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node
