"""What a node does with each message, apart from Flower's entry points: which task it holds (``answer_query``),
a contribution (``contribute``: the received body with this task's own head, finetuned) and the scores of a
received body in the evaluation views (``score_body``).

Which task? In deployment the node config names it (``task=...`` and, for a local directory,
``data-dir=...``); in simulation ``partition-id`` i takes the i-th entry of the pool the server sends.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from logging import WARNING
from typing import Any, Mapping, MutableMapping

import torch
from flwr.app import ArrayRecord
from flwr.common import log

from app.learning.model import (
    body_state,
    build_classifier,
    derive_seed,
    head_state,
    load_head,
    load_tokenizer,
    model_body_dtypes,
    model_body_signature,
    pick_device,
    resolve_model,
)
from app.learning.recipe import finetune
from app.learning.views import VIEW_FUNCTIONS
from app.site.faults import before_training, corrupt_body, fault_for, straggle
from app.site.state import SiteState
from strategies.transport import decode, encode, sends_updates
from tasks.registry import entry_key, load_task_cached
from tasks.spec import TaskDataError
from tasks.splits import train_dev
from tasks.tokenize import tokenize_task


def node_task_entry(node_config: Mapping[str, Any], pool: list[dict[str, Any]]) -> dict[str, Any]:
    """The pool entry this node serves, from its node config (deployment) or partition id (simulation)."""
    if "data-dir" in node_config:
        entry = {"source": "local", "path": str(node_config["data-dir"])}
        if "task" in node_config:
            entry["name"] = str(node_config["task"])
    elif "task" in node_config:
        matches = [e for e in pool if e["name"] == node_config["task"]]
        if not matches:
            raise TaskDataError(f"node config task '{node_config['task']}' is not in the server's task pool "
                                f"and no data-dir was given")
        entry = dict(matches[0])
    else:
        partition = int(node_config["partition-id"])
        if partition >= len(pool):
            raise TaskDataError(f"partition-id {partition} has no task: the pool has {len(pool)} tasks "
                                f"(run with num-supernodes={len(pool)})")
        entry = dict(pool[partition])
    return entry


def site_name(node_config: Mapping[str, Any]) -> str:
    """How this node names itself, so that two nodes holding the same task are told apart in a stable order:
    node config ``site``, else its state or data directory, else its simulation partition."""
    for key in ("site", "state-dir", "data-dir", "partition-id"):
        if key in node_config:
            return f"{key}={node_config[key]}"
    return ""


def answer_query(node_config: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, str]:
    """This node's task (its definition, pool entry, role if the node config says, site name) and, when the
    server sends its model settings, the layout digest of this node's model body for the server to check."""
    entry = node_task_entry(node_config, json.loads(str(config["pool"])))
    info, _ = load_task_cached(entry_key(entry))
    answer = {"info": info.to_json(), "entry": entry_key(entry), "role": str(node_config.get("role", "")),
              "site": site_name(node_config)}  # an empty role: the server's pool decides
    if "model" in config:
        answer["body-signature"] = model_body_signature(_model_path(str(config["model"])), info.num_labels)
    return answer


class HeadStore:
    """Where this task's head lives: the site's ``state-dir`` when configured, else ``run_state`` (Flower's
    ``context.state``, which lasts one run)."""

    def __init__(self, run_state: MutableMapping[str, Any], node_config: Mapping[str, Any], run_id: int,
                 task: str, scope: str) -> None:
        self.run_state, self.run_id, self.task, self.scope = run_state, run_id, task, scope
        state_dir = node_config.get("state-dir")
        self.site = SiteState(str(state_dir)) if state_dir else None
        if self.site is not None:
            self.site.head_path(task, run_id, scope)  # a bad scope fails here, before training

    def load_into(self, model) -> str:
        """Attach the stored head if there is one; returns 'loaded' or 'fresh'."""
        if self.site is None:
            stored = self.run_state.get(f"head:{self.task}")
            head = stored.to_torch_state_dict() if stored is not None else None
        else:
            head = self.site.load_head(self.task, self.run_id, self.scope)
        if head is None:
            return "fresh"
        try:
            load_head(model, head)
        except (ValueError, RuntimeError) as exc:  # e.g. a site-scoped head from another model
            log(WARNING, "stored head of task '%s' does not fit this model (%s): starting a fresh one",
                self.task, str(exc).splitlines()[0])
            return "fresh (stored head did not fit)"
        return "loaded"

    def save(self, head) -> None:
        if self.site is None:
            self.run_state[f"head:{self.task}"] = ArrayRecord(head)
        else:
            self.site.save_head(self.task, self.run_id, self.scope, head)


@dataclass
class Contribution:
    body: dict[str, torch.Tensor]  # what leaves the node: the body only, never the head
    metrics: dict[str, int | float]
    fault: str | None  # the testing aid's fault this node acted out (None on a real site)


def contribute(config: Mapping[str, Any], received: dict[str, torch.Tensor], node_config: Mapping[str, Any],
               run_state: MutableMapping[str, Any], run_id: int) -> Contribution:
    """Load the received body, attach this task's own head, finetune both, and return the body."""
    arrived = time.time()  # the handler's start; in a deployment the process is new, so see process_age()
    recipe = json.loads(str(config["recipe"]))
    device = site_device(node_config, str(recipe["device"]))  # before any work: a device this site lacks
    info, path, tokenizer, data = _prepare(config, int(recipe["max_length"]))
    server_round, seed = int(config["server-round"]), int(config["seed"])
    keep_head = recipe["head_policy"] == "keep"
    # A fresh head is drawn from a seed that depends on the task (and on the round when heads are
    # re-initialised), so runs are reproducible and no head is ever reused by accident.
    transport = str(config.get("transport", "float32"))
    received = decode(received, transport, model_body_dtypes(path))  # the base exactly as this node received it
    head_seed = derive_seed(seed, info.name, "head", 0 if keep_head else server_round)
    model = build_classifier(path, info.num_labels, head_seed, body=received)
    faults = json.loads(str(config.get("faults", "{}")))
    fault = fault_for(faults, info.name, node_config)  # testing aid: off unless enabled and opted in
    before_training(fault, faults)
    heads = HeadStore(run_state, node_config, run_id, info.name, str(recipe.get("head_scope", "run")))
    head_origin = heads.load_into(model) if keep_head else "reinit"
    train_set, dev_set = data["train"], None
    stopping = recipe.get("early_stopping")
    if stopping:
        train_set, dev_set = train_dev(data, float(stopping["dev_fraction"]), int(stopping["dev_max_examples"]),
                                       split_seed(seed, info.name))
    stats = finetune(model, train_set, tokenizer, recipe, derive_seed(seed, info.name, "train", server_round),
                     device, dev_set, info.is_regression)
    if keep_head:
        heads.save(head_state(model))
    # A message's fixed cost: the process's age when the handler started (imports; in a deployment every message
    # is a new process) and the handler's own set-up (model, head, data) until the first batch was ready.
    age, setup = round(process_age(arrived), 3), round((stats.first_batch_at or time.time()) - arrived, 3)
    if heads.site is not None:
        heads.site.log_contribution(run_id=run_id, round=server_round, task=info.name, train_loss=stats.loss,
                                    examples=stats.examples, steps=stats.steps, seconds=round(stats.seconds, 3),
                                    head=head_origin, device=str(device), process_age_s=age, setup_s=setup)
    metrics = {"train-loss": stats.loss, "num-examples": stats.examples, "steps": stats.steps,
               "stopped-early": int(stats.stopped_early), "seconds": stats.seconds, "server-round": server_round,
               "process-age-s": age, "setup-s": setup}
    if keep_head:  # 1: the head of an earlier round was found; 0: a fresh one (first contribution, or lost)
        metrics["head-kept"] = int(head_origin == "loaded")
    body = corrupt_body(fault, body_state(model), received, faults, server_round) if fault else body_state(model)
    # The update against the base as received, not the body: at half-precision transport (smaller numbers lose
    # less), and in mode=async, where the server applies it to a newer base.
    if sends_updates(transport) or config.get("send-update"):
        body = encode({k: v - received[k] if v.is_floating_point() else v for k, v in body.items()}, transport)
    straggle(faults, info.name, node_config, time.time() - arrived)  # testing aid: a slow site, by waiting
    return Contribution(body, metrics, fault)


def score_body(config: Mapping[str, Any], body: dict[str, torch.Tensor],
               node_config: Mapping[str, Any]) -> dict[str, float]:
    """The received body's scores on this task in each view asked for (``view.metric`` -> value)."""
    settings, recipe = json.loads(str(config["eval"])), json.loads(str(config["recipe"]))
    device = site_device(node_config, str(recipe["device"]))
    info, path, tokenizer, data = _prepare(config, int(recipe["max_length"]))
    seed = split_seed(int(config["seed"]), info.name)  # the same splits and fresh heads in every round
    few_shot = settings.get("few_shot") if str(config["role"]) == "heldout" else None
    metrics: dict[str, float] = {"num-examples": len(data["test"])}
    body = decode(body, str(config.get("transport", "float32")), model_body_dtypes(path))
    for view in str(config["views"]).split(","):
        model = build_classifier(path, info.num_labels, seed, body=body)
        scores = VIEW_FUNCTIONS[view](model, info, tokenizer, data, settings, recipe, seed, device, few_shot)
        metrics.update({f"{view}.{name}": float(value) for name, value in scores.items()})
    return metrics


def process_age(now: float) -> float:
    """Seconds this process had been running at ``now`` (Linux ``/proc``; 0 where that cannot be read)."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # field 22: start, clock ticks
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK") - (time.time() - now))
    except (OSError, ValueError, IndexError):
        return 0.0


def split_seed(seed: int, task: str) -> int:
    """Seed of a task's data draws (dev carve, caps, few-shot): contributor and evaluator agree on it."""
    return derive_seed(seed, task, "splits", 0)


class DeviceError(RuntimeError):
    """The device this site is asked to train on does not exist here; the message says which setting to change."""


def site_device(node_config: Mapping[str, Any], server_choice: str) -> torch.device:
    """The site's own ``device`` node config wins over the server's ``client.device``; a device this machine
    does not have is refused, naming the setting that asked for it (the site decides where it trains)."""
    name = str(node_config.get("device") or server_choice)
    source = (f"this site's node config device={name!r}" if node_config.get("device")
              else f"the server's client.device={name!r}")
    fix = "set the site's device (node config device=cpu, `python -m deploy supernode ... --device cpu`)"
    try:
        device = pick_device(name)
    except RuntimeError:  # torch's own refusal of a string that names no device
        raise DeviceError(f"{source} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise DeviceError(f"{source} is not available on this site: torch sees {count} CUDA device(s) here; {fix}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{source} is not available on this site: torch sees no MPS device here; {fix}")
    return device


def _prepare(config: Mapping[str, Any], max_length: int):
    """Task info, model path, tokenizer and tokenised data for this message (memoised per process)."""
    model_path = _model_path(str(config["model"]))
    info, data = _tokenized(str(config["task-entry"]), model_path, max_length)
    return info, model_path, load_tokenizer(model_path), data


@lru_cache(maxsize=4)
def _model_path(model_json: str) -> str:
    return resolve_model(json.loads(model_json))


@lru_cache(maxsize=64)
def _tokenized(entry_json: str, model_path: str, max_length: int):
    info, data = load_task_cached(entry_json)
    return info, tokenize_task(data, load_tokenizer(model_path), max_length)
