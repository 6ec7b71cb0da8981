"""Fault injection: a TESTING AID that makes chosen contributors misbehave on purpose.

Enabled only through ``faults.enabled=true`` in ``conf/`` (off by default). ``faults.tasks`` maps a task
name to one fault; the node holding that task then, every round it is asked to train:

* ``raise``: fails the message (Flower returns an error reply);
* ``crash``: kills its ClientApp process (``os._exit``) without replying. In a deployment that is one
  message's process; in a Ray simulation it is a shared actor, and Flower fails every message queued
  on it (measured: the other contributors of that actor fail too), so prefer ``raise`` there;
* ``hang``: sleeps ``faults.hang_s`` seconds before answering (past the round timeout);
* ``non_finite``: replies with NaN in one tensor; ``wrong_shape``: one tensor of another shape;
  ``drop_key``: one key missing; ``scale``: an update ``faults.scale`` times larger than trained.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

import torch

FAULTS = ("raise", "crash", "hang", "non_finite", "wrong_shape", "drop_key", "scale")


class InjectedFault(RuntimeError):
    """Raised by the ``raise`` fault."""


def fault_for(faults: Mapping[str, Any], task: str) -> str | None:
    if not faults.get("enabled"):
        return None
    return (faults.get("tasks") or {}).get(task)


def before_training(fault: str | None, settings: Mapping[str, Any]) -> None:
    if fault == "raise":
        raise InjectedFault("injected fault: raise")
    if fault == "crash":
        os._exit(17)
    if fault == "hang":
        time.sleep(float(settings.get("hang_s", 60)))


def corrupt_body(fault: str | None, body: dict[str, torch.Tensor], received: Mapping[str, torch.Tensor],
                 settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The body this contributor sends after the injected fault."""
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
