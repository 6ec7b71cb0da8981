"""ClientApp: one contributor (or held-out evaluator) holding one task.

* ``query``: tell the server which task this node holds (and its role, if the node config says).
* ``train``: load the received body, attach this task's own head, finetune, reply with the body only.
* ``evaluate``: the scores of the received body on this task in the views the server asks for
  (linear probe and/or full finetuning, ``app.learning.views``).

Which task? In deployment the node config names it (``task=...`` and, for a local directory,
``data-dir=...``); in simulation ``partition-id`` i takes the i-th entry of the pool the server sends.

Site settings in the node config (deployment): ``state-dir=/abs/path`` keeps this site's heads and its
log of contributions on disk (``app.site.state``; otherwise heads live in ``context.state``, which
lasts one run), ``device=cpu|cuda|cuda:N`` overrides the server's ``client.device``, ``site=NAME`` names
the site (two sites holding the same task are ordered by it), ``allow-faults=true`` lets the testing aid
``app.site.faults`` act on this node (never on a real site).
"""

from __future__ import annotations

import json
from functools import lru_cache
from logging import WARNING
from typing import Any, Mapping

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import log

from app.learning.views import VIEW_FUNCTIONS
from app.site.faults import before_training, corrupt_body, fault_for, malformed_content
from app.learning.model import (
    body_signature,
    body_state,
    build_classifier,
    derive_seed,
    head_state,
    load_body,
    load_head,
    load_tokenizer,
    pick_device,
    resolve_model,
)
from app.site.state import SiteState
from app.learning.recipe import finetune
from tasks.registry import entry_key, load_task_cached
from tasks.spec import TaskDataError
from tasks.splits import train_dev
from tasks.tokenize import tokenize_task

app = ClientApp()


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


@app.query()
def query(msg: Message, context: Context) -> Message:
    entry = node_task_entry(context.node_config, json.loads(str(msg.content["config"]["pool"])))
    info, _ = load_task_cached(entry_key(entry))
    role = str(context.node_config.get("role", ""))  # empty: the server's pool decides
    answer = ConfigRecord({"info": info.to_json(), "entry": entry_key(entry), "role": role,
                           "site": site_name(context.node_config)})
    if "model" in msg.content["config"]:  # let the server check that our model fits its body
        model = build_classifier(_model_path(str(msg.content["config"]["model"])), info.num_labels, 0)
        answer["body-signature"] = body_signature(body_state(model))
    return Message(content=RecordDict({"task": answer}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    recipe = json.loads(str(config["recipe"]))
    info, path, tokenizer, data = _prepare(config, int(recipe["max_length"]))
    server_round, seed = int(config["server-round"]), int(config["seed"])
    keep_head = recipe["head_policy"] == "keep"
    # A fresh head is drawn from a seed that depends on the task (and on the round when heads are
    # re-initialised), so runs are reproducible and no head is ever reused by accident.
    model = build_classifier(path, info.num_labels, derive_seed(seed, info.name, "head", 0 if keep_head else server_round))
    received = msg.content["arrays"].to_torch_state_dict()
    load_body(model, received)
    faults = json.loads(str(config.get("faults", "{}")))
    fault = fault_for(faults, info.name, context.node_config)  # testing aid: off unless enabled and opted in
    before_training(fault, faults)
    heads = _HeadStore(context, info.name, str(recipe.get("head_scope", "run")))
    head_origin = "reinit"
    if keep_head:
        head_origin = heads.load_into(model)
    device = pick_device(_device(context, recipe["device"]))
    train_set, dev_set = data["train"], None
    stopping = recipe.get("early_stopping")
    if stopping:
        train_set, dev_set = train_dev(data, float(stopping["dev_fraction"]), int(stopping["dev_max_examples"]),
                                       split_seed(seed, info.name))
    stats = finetune(model, train_set, tokenizer, recipe, derive_seed(seed, info.name, "train", server_round),
                     device, dev_set, info.is_regression)
    if keep_head:
        heads.save(head_state(model))
    if heads.site is not None:
        heads.site.log_contribution(run_id=int(context.run_id), round=server_round, task=info.name,
                                    train_loss=stats.loss, examples=stats.examples, steps=stats.steps,
                                    seconds=round(stats.seconds, 3), head=head_origin, device=str(device))
    metrics = MetricRecord({"train-loss": stats.loss, "num-examples": stats.examples, "steps": stats.steps,
                            "stopped-early": int(stats.stopped_early), "seconds": stats.seconds,
                            "server-round": server_round})
    if keep_head:  # 1: the head of an earlier round was found; 0: a fresh one (first contribution, or lost)
        metrics["head-kept"] = int(head_origin == "loaded")
    body = corrupt_body(fault, body_state(model), received, faults) if fault else body_state(model)
    # Only the body leaves the node: the head stays here (context.state or the site's state-dir).
    content = (malformed_content(server_round, body, metrics) if fault == "malformed"
               else RecordDict({"arrays": ArrayRecord(body), "metrics": metrics}))
    return Message(content=content, reply_to=msg)


class _HeadStore:
    """Where this task's head lives: the site's ``state-dir`` when configured, else ``context.state``."""

    def __init__(self, context: Context, task: str, scope: str) -> None:
        self.context, self.task, self.scope = context, task, scope
        state_dir = context.node_config.get("state-dir")
        self.site = SiteState(str(state_dir)) if state_dir else None
        if self.site is not None:
            self.site.head_path(task, context.run_id, scope)  # a bad scope fails here, before training

    def load_into(self, model) -> str:
        """Attach the stored head if there is one; returns 'loaded' or 'fresh'."""
        if self.site is None:
            stored = self.context.state.get(f"head:{self.task}")
            head = stored.to_torch_state_dict() if stored is not None else None
        else:
            head = self.site.load_head(self.task, self.context.run_id, self.scope)
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
            self.context.state[f"head:{self.task}"] = ArrayRecord(head)
        else:
            self.site.save_head(self.task, self.context.run_id, self.scope, head)


def _device(context: Context, server_choice: str) -> str:
    """The site's own ``device`` node config wins over the server's ``client.device``."""
    return str(context.node_config.get("device") or server_choice)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    settings, recipe = json.loads(str(config["eval"])), json.loads(str(config["recipe"]))
    info, path, tokenizer, data = _prepare(config, int(recipe["max_length"]))
    seed = split_seed(int(config["seed"]), info.name)  # the same splits and fresh heads in every round
    few_shot = settings.get("few_shot") if str(config["role"]) == "heldout" else None
    body = msg.content["arrays"].to_torch_state_dict()
    device = pick_device(_device(context, str(recipe["device"])))
    metrics = MetricRecord({"num-examples": len(data["test"])})
    for view in str(config["views"]).split(","):
        model = build_classifier(path, info.num_labels, seed)
        load_body(model, body)
        scores = VIEW_FUNCTIONS[view](model, info, tokenizer, data, settings, recipe, seed, device, few_shot)
        metrics.update({f"{view}.{name}": float(value) for name, value in scores.items()})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def split_seed(seed: int, task: str) -> int:
    """Seed of a task's data draws (dev carve, caps, few-shot): contributor and evaluator agree on it."""
    return derive_seed(seed, task, "splits", 0)


def _prepare(config: ConfigRecord, max_length: int):
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
