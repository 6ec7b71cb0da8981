"""A site's own state on disk: its task heads and the log of its contributions.

In a deployment every message runs the ClientApp in a fresh process and ``context.state`` does not
outlive a run, so a site that wants its head to persist keeps it here, under the directory named by
its node config (``state-dir=/path``)::

    <state-dir>/
      heads/<task>.safetensors                 client.head_scope=site: one head per task, across runs
      heads/run-<run id>/<task>.safetensors    client.head_scope=run:  one head per task and run
      contributions.jsonl                      one line per finished local training (run, round, task, ...)

Files are written atomically (a temporary file in the same directory, then ``os.replace``), so a
crashed or killed process never leaves a half-written head. Every path is checked to lie inside the
state directory: a site never writes outside its own directories, whatever a task is called.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from app.run.outputs import fsync_path, strict

HEAD_SCOPES = ("run", "site")
CONTRIBUTIONS_FILE = "contributions.jsonl"


class SiteStateError(ValueError):
    """The site state directory or a setting for it is unusable; the message says why."""


def safe_name(task: str) -> str:
    """A file name for a task: its own name when harmless, else a sanitised name plus a short digest."""
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", task).strip(".") or "task"
    if clean == task:
        return task
    return f"{clean[:80]}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"


class SiteState:
    """Heads and contribution log of one site, under ``root`` (created on first write)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        if not root.is_absolute():
            raise SiteStateError(f"state-dir must be an absolute path, got '{root}'")
        self.root = root.resolve()

    # ------------------------------------------------------------------ heads
    def head_path(self, task: str, run_id: int, scope: str) -> Path:
        if scope not in HEAD_SCOPES:
            raise SiteStateError(f"client.head_scope must be one of {list(HEAD_SCOPES)}, got '{scope}'")
        folder = self.root / "heads" if scope == "site" else self.root / "heads" / f"run-{int(run_id)}"
        return self._inside(folder / f"{safe_name(task)}.safetensors")

    def load_head(self, task: str, run_id: int, scope: str) -> dict[str, torch.Tensor] | None:
        """The stored head of ``task`` (None when there is none yet)."""
        path = self.head_path(task, run_id, scope)
        if not path.is_file():
            return None
        return load_file(str(path))

    def save_head(self, task: str, run_id: int, scope: str, head: Mapping[str, torch.Tensor],
                  metadata: Mapping[str, str] | None = None) -> Path:
        path = self.head_path(task, run_id, scope)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in head.items()}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"task": task, **dict(metadata or {})})
            fsync_path(Path(tmp))
            os.replace(tmp, path)
            fsync_path(path.parent)  # the replace is durable once its directory is
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    # ------------------------------------------------------------------ contributions
    @property
    def contributions_path(self) -> Path:
        return self._inside(self.root / CONTRIBUTIONS_FILE)

    def log_contribution(self, **record: Any) -> None:
        """Append one JSON line (with the time) to ``contributions.jsonl``, flushed and fsynced."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps(strict({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **record}), sort_keys=True,
                          allow_nan=False) + "\n"  # strict JSON: a NaN loss is written as null
        # one write() of one line on an O_APPEND descriptor: concurrent appenders never interleave lines
        fd = os.open(self.contributions_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def contributions(self) -> list[dict[str, Any]]:
        path = self.contributions_path
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise SiteStateError(f"refusing to write {resolved}: outside the site's state directory {self.root}")
        return resolved
