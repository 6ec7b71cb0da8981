"""A run's output directory: resolved config, per-round metrics (written and read back), the fused model."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from strategies.records import RoundRecord, read_records

METRICS_FILE = "metrics.jsonl"


class OutputDirError(ValueError):
    """An output directory that cannot be created or written to; the message names it and why (exit 2)."""


def writable_dir(directory: str | Path, what: str = "output directory") -> Path:
    """``directory`` (resolved), created if need be and proven writable with a probe file; else OutputDirError.

    Proving it by writing is the only check that holds for root (who ignores permission bits), /proc or a
    read-only mount: ``os.access`` answers yes to root on a read-only file system."""
    path = Path(directory).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"{what} {path} cannot be created or written: {_why(path, exc)}") from None
    try:
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as exc:
        raise OutputDirError(f"{what} {path} cannot be created or written: no file can be created in it "
                             f"({exc.strerror or exc}: read-only or a virtual file system?)") from None
    return path


def _why(path: Path, exc: OSError) -> str:
    """The reason in words: the part of the path that is a file, or the system's message."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                return f"{part} is a file, not a directory"
            break
    return exc.strerror or str(exc)


class RunOutputs:
    """Writes into one directory that belongs to one run; refuses to reuse a directory with results."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @classmethod
    def create(cls, directory: str | Path, cfg: DictConfig) -> "RunOutputs":
        path = Path(directory).expanduser().resolve()
        if (path / METRICS_FILE).exists():
            raise FileExistsError(f"output directory {path} already holds a run's results; choose another")
        writable_dir(path, "run directory")
        (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        return cls(path)

    @classmethod
    def reopen(cls, directory: str | Path, history: list[RoundRecord]) -> "RunOutputs":
        """Continue a run's directory: its metrics file becomes exactly the checkpoint's history."""
        outputs = cls(Path(directory).expanduser().resolve())
        tmp = outputs.dir / f".{METRICS_FILE}.tmp"
        tmp.write_text("".join(json_line(record.to_dict()) for record in history))
        os.replace(tmp, outputs.dir / METRICS_FILE)
        return outputs

    def append_round(self, record: RoundRecord) -> None:
        """One JSON line per round, flushed and fsynced so a crash never loses a finished round."""
        with open(self.dir / METRICS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json_line(record.to_dict()))
            fh.flush()
            os.fsync(fh.fileno())

    def write_json(self, name: str, value: Any) -> None:
        """A small JSON side file, written atomically."""
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(value, indent=1))
        os.replace(tmp, self.dir / name)

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: JSON has no NaN or Infinity. The strategy
    never records one (a NaN loss is a rejected reply, with its reason); this is the last line of defence."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (after a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_line(record: dict[str, Any]) -> str:
    """One record as a line of strict JSON (``allow_nan=False``: a stray NaN is an error, not bare ``NaN``)."""
    return json.dumps(strict(record), allow_nan=False) + "\n"


def read_metrics(directory: str | Path) -> list[dict[str, Any]]:
    """The lines of a run's ``metrics.jsonl`` as written (plain JSON objects)."""
    path = Path(directory) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_round_records(directory: str | Path) -> list[RoundRecord]:
    """A run's round records, typed (``strategies.records``; older versions upgraded)."""
    return read_records(read_metrics(directory))
