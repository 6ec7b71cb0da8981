"""ClientApp: one contributor (or held-out evaluator) holding one task.

* ``query``: tell the server which task this node holds (and its role, if the node config says).
* ``train``: load the received body, attach this task's own head, finetune, reply with the body only.
* ``evaluate``: linear-probe score of the received body on this task.

Which task? In deployment the node config names it (``task=...`` and, for a local directory,
``data-dir=...``); in simulation ``partition-id`` i takes the i-th entry of the pool the server sends.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app.model import (
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
from app.probe import extract_features, probe_score
from app.train import finetune
from tasks.registry import entry_key, load_task_cached
from tasks.spec import TaskDataError
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


@app.query()
def query(msg: Message, context: Context) -> Message:
    entry = node_task_entry(context.node_config, json.loads(str(msg.content["config"]["pool"])))
    info, _ = load_task_cached(entry_key(entry))
    role = str(context.node_config.get("role", ""))  # empty: the server's pool decides
    answer = ConfigRecord({"info": info.to_json(), "entry": entry_key(entry), "role": role})
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
    load_body(model, msg.content["arrays"].to_torch_state_dict())
    head_key = f"head:{info.name}"
    if keep_head and head_key in context.state:
        load_head(model, context.state[head_key].to_torch_state_dict())
    stats = finetune(model, data["train"], tokenizer, recipe, derive_seed(seed, info.name, "train", server_round),
                     pick_device(str(recipe["device"])))
    if keep_head:
        context.state[head_key] = ArrayRecord(head_state(model))
    metrics = MetricRecord({"train-loss": stats.loss, "num-examples": stats.examples, "steps": stats.steps,
                            "seconds": stats.seconds})
    # Only the body leaves the node: the head stays here, in context.state.
    return Message(content=RecordDict({"arrays": ArrayRecord(body_state(model)), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    probe = json.loads(str(config["probe"]))
    info, path, tokenizer, data = _prepare(config, int(config["max-length"]))
    model = build_classifier(path, info.num_labels, 0)
    load_body(model, msg.content["arrays"].to_torch_state_dict())
    device = pick_device(str(config["device"]))
    splits = {
        name: data[name].select(range(min(len(data[name]), int(probe[f"max_{name}_examples"]))))
        for name in ("train", "test")
    }
    feats = {name: extract_features(model.base_model, split, tokenizer, probe["pooling"], int(probe["batch_size"]),
                                    device) for name, split in splits.items()}
    score = probe_score(feats["train"], feats["test"], info.is_regression, probe)
    metrics = MetricRecord({"score": score, "num-examples": len(splits["test"])})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


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
