"""Fault injection: a TESTING AID that makes chosen contributors misbehave on purpose.

Enabled only through ``faults.enabled=true`` in ``conf/`` (off by default), and obeyed only by a node that
opts in itself: node config ``allow-faults=true`` (deployment) or ``COLDFUSION_ALLOW_FAULTS=1`` in its
environment (``coldfusion-sim`` sets it for its own simulation when faults are enabled). A node that has not
opted in refuses a message that asks for a fault, so a server cannot make a real site crash or misbehave.
``faults.tasks`` maps a task name to one fault; the node holding that task then, every round it is asked
to train:

* ``raise``: fails the message (Flower returns an error reply);
* ``crash``: kills its ClientApp process (``os._exit``) without replying. In a deployment that is one
  message's process; in a Ray simulation it is a shared actor, and Flower fails every message queued
  on it (measured: the other contributors of that actor fail too), so prefer ``raise`` there;
* ``hang``: sleeps ``faults.hang_s`` seconds before answering (past the round timeout);
* ``non_finite``: replies with NaN in one tensor; ``wrong_shape``: one tensor of another shape;
  ``drop_key``: one key missing; ``scale``: an update ``faults.scale`` times larger than trained;
* attacks that pass the norm rule: ``sign_flip`` sends the trained update negated (the honest norm); ``noise``
  sends a Gaussian direction at the norm of the trained update, the direction drawn from a generator seeded by
  (``faults.seed``, round), so every node with this fault in a round sends the same crafted direction (colluders);
* ``malformed``: a reply whose records are wrong, in turn by round: no ``metrics`` record; ``arrays`` that
  is not an ArrayRecord; ``train-loss`` missing and ``num-examples`` of the wrong type.

Separately, ``faults.slow`` ({task: factor}) makes a site a **straggler**: it answers every training message
``factor`` times later than it could, by waiting after its work (not by computing), so slow sites can be shown
on one machine (the asynchronous mode's benchmark). The same opt-in applies.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

FAULTS = ("raise", "crash", "hang", "non_finite", "wrong_shape", "drop_key", "scale", "malformed", "sign_flip", "noise")
ALLOW_ENV = "COLDFUSION_ALLOW_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by the ``raise`` fault."""


class FaultsNotAllowed(PermissionError):
    """The server asked for a fault on a node that has not opted in."""


def allows_faults(node_config: Mapping[str, Any]) -> bool:
    """Has this node opted in to fault injection (node config ``allow-faults``, or the environment)?"""
    flag = node_config.get("allow-faults", os.environ.get(ALLOW_ENV, ""))
    return flag is True or str(flag).strip().lower() in ("1", "true", "yes")


def fault_for(faults: Mapping[str, Any], task: str, node_config: Mapping[str, Any]) -> str | None:
    """The fault this node must inject for ``task``, or None; FaultsNotAllowed if it has not opted in."""
    if not faults.get("enabled"):
        return None
    fault = (faults.get("tasks") or {}).get(task)
    if fault is not None and not allows_faults(node_config):
        raise FaultsNotAllowed(f"the server asked this node to inject the fault '{fault}' (faults.enabled), but "
                               f"the node has not opted in: set node config allow-faults=true (or {ALLOW_ENV}=1) "
                               "only on a test site")
    return fault


def straggle(faults: Mapping[str, Any], task: str, node_config: Mapping[str, Any], elapsed: float) -> float:
    """For a task in ``faults.slow``: wait ``(factor - 1) * elapsed`` seconds (the message's work took ``elapsed``),
    so the reply comes ``factor`` times later. Returns the seconds waited; FaultsNotAllowed without the opt-in."""
    factor = (faults.get("slow") or {}).get(task) if faults.get("enabled") else None
    if factor is None or factor <= 1:
        return 0.0
    if not allows_faults(node_config):
        raise FaultsNotAllowed(f"the server asked this node to be {factor}x slower (faults.slow), but the node has not "
                               f"opted in: set node config allow-faults=true (or {ALLOW_ENV}=1) only on a test site")
    wait = (float(factor) - 1.0) * elapsed
    time.sleep(wait)
    return wait


def before_training(fault: str | None, settings: Mapping[str, Any]) -> None:
    if fault == "raise":
        raise InjectedFault("injected fault: raise")
    if fault == "crash":
        os._exit(17)
    if fault == "hang":
        time.sleep(float(settings.get("hang_s", 60)))


def corrupt_body(fault: str | None, body: dict[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                 settings: Mapping[str, Any], server_round: int = 0) -> dict[str, torch.Tensor]:
    """The body this contributor sends after the injected fault."""
    if fault in ("sign_flip", "noise"):
        return _attack(fault, body, received, settings, server_round)
    key = next(k for k, v in body.items() if v.is_floating_point())
    if fault == "non_finite":
        body[key] = body[key].clone().fill_(float("nan"))
    elif fault == "wrong_shape":
        body[key] = torch.zeros(body[key].numel() + 1)
    elif fault == "drop_key":
        body.pop(key)
    elif fault == "scale":
        factor = float(settings.get("scale", 100.0))
        body = {k: received[k] + factor * (v - received[k]) if v.is_floating_point() else v for k, v in body.items()}
    return body


def _attack(fault: str, body: dict[str, torch.Tensor], received: Mapping[str, torch.Tensor],
            settings: Mapping[str, Any], server_round: int) -> dict[str, torch.Tensor]:
    """An update crafted to pass the norm rule: its L2 norm is the trained update's (over the floating tensors)."""
    floating = sorted(k for k, v in body.items() if v.is_floating_point())
    update = {k: body[k].double() - received[k].double() for k in floating}
    if fault == "sign_flip":
        crafted = {k: -u for k, u in update.items()}
    else:  # noise: one direction per (seed, round), shared by every node that adds it
        generator = torch.Generator().manual_seed(int(settings.get("seed", 0)) * 1_000_003 + server_round)
        direction = {k: torch.randn(update[k].shape, generator=generator, dtype=torch.float64) for k in floating}
        norm = torch.sqrt(sum((u ** 2).sum() for u in update.values()))
        scale = norm / torch.sqrt(sum((d ** 2).sum() for d in direction.values()))
        crafted = {k: d * scale for k, d in direction.items()}
    return {k: (received[k].double() + crafted[k]).to(v.dtype) if k in crafted else v for k, v in body.items()}


def malformed_content(server_round: int, body: dict[str, torch.Tensor], metrics: MetricRecord) -> RecordDict:
    """The ``malformed`` fault's reply content: one of three broken shapes, in turn by round."""
    kind = server_round % 3
    if kind == 1:  # a record is missing
        return RecordDict({"arrays": ArrayRecord(body)})
    if kind == 2:  # a record of the wrong kind
        return RecordDict({"arrays": ConfigRecord({"weights": "not an array"}), "metrics": metrics})
    wrong = MetricRecord({k: v for k, v in metrics.items() if k != "train-loss"})
    wrong["num-examples"] = [1.5, 2.5]  # a list of floats where an int belongs
    return RecordDict({"arrays": ArrayRecord(body), "metrics": wrong})
