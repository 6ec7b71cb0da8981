"""Per-round checkpoints of a run, written atomically, and what resuming needs from them.

``<run dir>/ckpt-NNNN/`` holds ``body.safetensors`` (the base after round NNNN), ``fusion.safetensors`` (the
state of a fusion operator that keeps one: a server optimizer's momentum; absent otherwise) and ``state.json``
(the record schema version, the round, the sampler's random state, the history of round records, the
resolved configuration). It is written as ``.ckpt-NNNN.tmp`` and renamed into place, so a crash mid-write leaves
either the previous checkpoint or the new one, never a broken one. Both files and the temporary directory
are fsynced before the rename and the run directory after it, so this also holds after a power loss
(the rename is durable only once its directory is). Only the newest is kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from app.run.outputs import fsync_path, strict
from strategies.records import SCHEMA_VERSION, RecordError, RoundRecord, read_records

# Keys that may differ between a run and its resumption: how to resume, and how long to go on.
# Keys a resumed run may change freely: none changes what a round computes (where clients run, how often the log
# says how far a phase is, how many rounds to go).
RESUMABLE_KEYS = ("resume", "resume_allow_config_change", "rounds", "federation.progress_s", "simulation.client_cpus",
                  "simulation.client_gpus", "simulation.ray_cpus")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, not JSON, a key missing); the message names the file."""


# state.json's keys and the JSON type each must have
STATE_KEYS = {"round": int, "rng_state": list, "history": list, "config": dict}


@dataclass
class Checkpoint:
    round: int
    body: dict[str, torch.Tensor]
    rng_state: Any
    history: list[RoundRecord]
    config: dict[str, Any]  # the resolved configuration the checkpoint was written under
    fusion_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the fusion operator's state, if any


def save_checkpoint(run_dir: Path, server_round: int, body: Mapping[str, torch.Tensor], rng_state: Any,
                    history: list[RoundRecord], config: Mapping[str, Any],
                    fusion_state: Mapping[str, torch.Tensor] | None = None) -> Path:
    final = run_dir / f"ckpt-{server_round:04d}"
    tmp = run_dir / f".ckpt-{server_round:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in body.items()}, str(tmp / "body.safetensors"))
    fsync_path(tmp / "body.safetensors")
    if fusion_state:
        save_file({k: v.contiguous() for k, v in fusion_state.items()}, str(tmp / "fusion.safetensors"))
        fsync_path(tmp / "fusion.safetensors")
    state = {"schema": SCHEMA_VERSION, "round": server_round, "rng_state": _jsonable(rng_state),
             "history": strict([r.to_dict() for r in history]), "config": dict(config)}
    with open(tmp / "state.json", "w") as fh:
        json.dump(state, fh, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_path(tmp)
    os.rename(tmp, final)
    fsync_path(run_dir)
    for old in run_dir.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    complete = sorted(p for p in run_dir.glob("ckpt-*") if (p / "state.json").exists())
    if not complete:
        return None
    state = read_state(complete[-1] / "state.json")
    try:  # the history's records carry their own version; the state file's is checked with them
        if state.get("schema", 1) > SCHEMA_VERSION:
            raise RecordError(f"checkpoint schema {state['schema']} is newer than this version reads ({SCHEMA_VERSION})")
        history = read_records(state["history"])
    except RecordError as exc:
        raise RecordError(f"{complete[-1] / 'state.json'}: {exc}") from None
    fusion_file = complete[-1] / "fusion.safetensors"
    return Checkpoint(state["round"], read_tensors(complete[-1] / "body.safetensors"),
                      _tuples(state["rng_state"]), history, state["config"],
                      read_tensors(fusion_file) if fusion_file.exists() else {})


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked: a JSON object with every key of STATE_KEYS, of its type, and a random
    state that ``random.setstate`` accepts; CheckpointError naming the file and the problem otherwise."""
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the file is damaged (truncated?)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, found {type(state).__name__}")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise CheckpointError(f"{path}: key {key!r} is missing or not a {kind.__name__} "
                                  f"(found {type(state.get(key)).__name__})")
    try:
        random.Random().setstate(_tuples(state["rng_state"]))
    except (TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: key 'rng_state' is not a random state ({exc})") from None
    return state


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's safetensors file; CheckpointError naming it when it is missing or damaged."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError (truncation, bad header), or OSError
        raise CheckpointError(f"{path}: cannot be read as safetensors ({type(exc).__name__}: {exc}); "
                              "the file is damaged (truncated?) or missing") from None


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ (ignoring RESUMABLE_KEYS), as 'key: saved -> current'."""
    a, b = flatten(saved), flatten(current)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in RESUMABLE_KEYS and a.get(k) != b.get(k)]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value: Any) -> Any:
    """random.Random.setstate wants the nested tuples json turned into lists back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def resume_checkpoint(resume_dir: str | Path, current: Mapping[str, Any], allow_config_change: bool) -> Checkpoint:
    """The checkpoint to resume from; ConfigError if there is none or the configuration differs."""
    from app.run.config import ConfigError

    try:
        checkpoint = load_latest_checkpoint(Path(resume_dir))
    except (RecordError, CheckpointError) as exc:
        raise ConfigError(f"resume={resume_dir}: {exc}") from None
    if checkpoint is None:
        raise ConfigError(f"resume={resume_dir}: no complete checkpoint (ckpt-NNNN/) in that directory")
    differences = config_differences(checkpoint.config, current)
    if differences and not allow_config_change:
        raise ConfigError(f"resume={resume_dir}: the configuration differs from the checkpoint's in "
                          f"{len(differences)} key(s): {'; '.join(differences)}. "
                          "Set resume_allow_config_change=true to resume anyway.")
    return checkpoint
