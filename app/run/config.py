"""Compose the run configuration from ``conf/`` with Hydra's compose API, and check it.

The Flower run config carries only bridge keys (``experiment``, ``overrides``, ``output-dir``); this
module turns them into the full, validated configuration. Types and allowed values are the schema's
(``app.run.schema``): Hydra rejects a wrong one while composing. :func:`validate_config` checks what a
type cannot say. A bad key or value fails here, at once, with a message that names it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import re
import shlex
import typing
from enum import Enum
from pathlib import Path
from typing import Any, Callable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from app.run.schema import TYPED_AFTER, RunConfig, schema_type  # importing it registers the schema
from strategies.asynchronous import refusal
from strategies.fusion import FusionError, build_operator
from strategies.schedule import VIEWS

# conf/ ships inside the package after `pip install .` (app/conf, package data: see pyproject.toml);
# in a checkout (and an editable install) it is the repository's conf/.
_PACKAGED_CONF = Path(__file__).resolve().parents[1] / "conf"
CONF_DIR = _PACKAGED_CONF if (_PACKAGED_CONF / "config.yaml").is_file() else _PACKAGED_CONF.parents[1] / "conf"


# client.device (and a site's node config device): what torch.device accepts that this project runs on
DEVICE_FORM = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


def encode_overrides(overrides: list[str]) -> str:
    """The overrides as the run config's ``overrides`` string: a JSON list, so that every override reaches the
    ServerApp exactly as given (a value with a space, quotes or a ``{dict: value}`` included)."""
    return json.dumps(list(overrides))


def split_overrides(overrides: str | list[str] | None) -> list[str]:
    """The overrides of a list, of a JSON list string (:func:`encode_overrides`) or, for a hand-written
    ``flwr run --run-config``, of a space-separated string (split as a shell would, quotes respected)."""
    if not overrides:
        return []
    if isinstance(overrides, (list, tuple)):
        return list(overrides)
    if overrides.lstrip().startswith("["):  # no override starts with '[': this is the JSON form
        try:
            decoded = json.loads(overrides)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"run config 'overrides' is not a valid JSON list ({exc}): {overrides!r}") from None
        if not (isinstance(decoded, list) and all(isinstance(item, str) for item in decoded)):
            raise ConfigError(f"run config 'overrides' must be a JSON list of strings, got {overrides!r}")
        return decoded
    try:
        return shlex.split(overrides)
    except ValueError as exc:  # an unclosed quote
        raise ConfigError(f"run config 'overrides' cannot be split ({exc}): {overrides!r}") from None


def override_key(override: str) -> str:
    """The key an override sets: ``+a.b=1`` / ``++a.b=1`` / ``~a.b`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def pop_experiment(overrides: list[str]) -> tuple[str, list[str]]:
    """``(experiment, the other overrides)``; an experiment given twice is refused, not half-applied."""
    named = [o for o in overrides if override_key(o) == "experiment"]
    if len(named) > 1:
        raise ConfigError(f"config group 'experiment' is set {len(named)} times ({', '.join(named)}): an experiment "
                          "is one file of conf/experiment/; give one, and override single keys after it")
    experiment = named[0].split("=", 1)[1] if named and "=" in named[0] else ""
    return experiment, [o for o in overrides if override_key(o) != "experiment"]


def compose_config(experiment: str = "", overrides: str | list[str] | None = None) -> DictConfig:
    """``conf/config.yaml`` + ``experiment=<name>`` + overrides (``"rounds=3 client.lr=1e-4"``), checked."""
    args = split_overrides(overrides)
    pop_experiment([f"experiment={experiment}", *args] if experiment else args)  # refuses a repeated experiment
    if experiment:
        args = [f"experiment={experiment}", *args]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=args)
    except (HydraException, OmegaConfBaseException) as exc:
        raise (_schema_error(exc) or _not_in_conf(exc)
               or ConfigError(f"invalid configuration override in {args}: {exc}")) from exc
    finally:
        GlobalHydra.instance().clear()
    return validate_config(cfg)


def _schema_error(exc: BaseException | None, prefix: str = "") -> ConfigError | None:
    """The schema's verdict on a value (an OmegaConf ValidationError in ``exc``'s chain), naming key and value."""
    while exc is not None and not isinstance(exc, ValidationError):
        exc = exc.__cause__ or exc.__context__
    if exc is None:
        return None
    key, value, expected = prefix + exc.full_key, exc.value, schema_type(prefix + exc.full_key)
    if isinstance(expected, type) and issubclass(expected, Enum):
        return ConfigError(f"config key '{key}' has invalid value {value!r}: must be one of {', '.join(expected)}")
    if expected is Any:
        return ConfigError(f"config key '{key}' has invalid value {value!r}: {str(exc.msg).splitlines()[0]}")
    return ConfigError(f"config key '{key}' must be {_type_name(expected)}, got {value!r} ({type(value).__name__})")


def _type_name(type_: Any) -> str:
    """``int``, ``int/float``, ``list of contributing/heldout``: a schema type as a message says it."""
    args = [arg for arg in typing.get_args(type_) if arg is not type(None)]
    if typing.get_origin(type_) is typing.Union:
        return "/".join(_type_name(arg) for arg in args)
    if typing.get_origin(type_) is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(type_, type) and issubclass(type_, Enum):
        return "/".join(type_)
    return "mapping" if dataclasses.is_dataclass(type_) else type_.__name__


_AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
_POSITIVE = (lambda v: v > 0, "> 0")
_STOPPING = {"every_examples": _AT_LEAST_1, "patience_examples": _AT_LEAST_1, "min_gain": (lambda v: v >= 0, ">= 0"),
             "dev_fraction": (lambda v: 0 < v < 1, "in (0, 1)"), "dev_max_examples": _AT_LEAST_1}
# What a value must satisfy beyond its type; a null value is not checked (the schema says which keys may be null).
RANGES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "rounds": (lambda v: v >= 0, ">= 0 (0: evaluate the start model only)"),
    "min_contributions": _AT_LEAST_1,
    "federation.expected_nodes": _AT_LEAST_1,
    "federation.progress_s": (_POSITIVE[0], "> 0 seconds"),
    "simulation.client_cpus": _AT_LEAST_1,
    "simulation.ray_cpus": _AT_LEAST_1,
    "simulation.client_gpus": (lambda v: v >= 0, ">= 0 (a fraction of a GPU per virtual client)"),
    **{f"federation.{k}_timeout_s": (_POSITIVE[0], "> 0 seconds") for k in ("node_wait", "discovery", "train", "eval", "run")},
    "model.name_or_path": (bool, "a name or a path, not empty"),
    "client.lr": _POSITIVE,
    "client.weight_decay": (lambda v: v >= 0, ">= 0"),
    "client.warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "client.batch_size": _AT_LEAST_1,
    "client.max_length": (lambda v: v >= 8, ">= 8 tokens"),
    "client.max_steps": _AT_LEAST_1,
    "client.epochs": _POSITIVE,
    "client.max_grad_norm": _POSITIVE,
    "client.device": (lambda v: DEVICE_FORM.fullmatch(v), "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    **{f"client.early_stopping.{k}": rule for k, rule in _STOPPING.items()},
    "eval.few_shot": _AT_LEAST_1,
    **{f"eval.{view}.max_{split}_examples": _AT_LEAST_1 for view in VIEWS for split in ("train", "test", "dev")},
    **{f"eval.{view}.dev_fraction": _STOPPING["dev_fraction"] for view in VIEWS},
    "eval.finetune.roles": (len, "a non-empty list"),
    "eval.finetune.max_steps": _AT_LEAST_1,
    "eval.finetune.epochs": _POSITIVE,
    **{f"eval.finetune.early_stopping.{k}": rule for k, rule in _STOPPING.items()},
    "validation.max_update_norm": _POSITIVE,
    "validation.max_relative_norm": _POSITIVE,
    "validation.min_peers": _AT_LEAST_1,
    "validation.min_reference_norm": _POSITIVE,
    "backtrack.threshold": _POSITIVE,
    "asynchronous.concurrency": _AT_LEAST_1,
    "asynchronous.buffer_size": _AT_LEAST_1,
    "asynchronous.max_staleness": (lambda v: v >= 0, ">= 0 versions, or null"),
    "asynchronous.server_lr": _POSITIVE,
    "resume": (lambda v: Path(v).is_dir(), "an existing run directory"),
    "tasks.kind": (lambda v: v in ("synthetic", "catalog"), "'synthetic' or 'catalog'"),
    "tasks.max_unknown_fraction": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
                                   "a number in [0, 1], or null (no check)"),
}


def validate_config(cfg: DictConfig) -> DictConfig:
    """What the schema cannot say: every key set, ranges, ``k or 'all'`` values, rules across keys."""
    try:
        _validate(cfg)
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve, or resolves to a wrong type
        raise _schema_error(exc) or ConfigError(f"invalid configuration: {exc}") from exc
    return cfg


def _validate(cfg: DictConfig) -> None:
    _check_keys(cfg)
    if missing := OmegaConf.missing_keys(cfg):
        raise ConfigError(f"config keys {sorted(missing)} have no value: set them in conf/ or as overrides")
    for key, type_ in TYPED_AFTER.items():
        _check_typed(cfg, key, type_)
    k = cfg.contributors_per_round
    if k != "all" and not (isinstance(k, int) and k >= 1):
        raise _invalid("contributors_per_round", k, ">= 1 or 'all'")
    for view in VIEWS:
        every = cfg.eval[view].every
        if every not in (None, "first_last") and not (isinstance(every, int) and every >= 1):
            raise _invalid(f"eval.{view}.every", every, "k >= 1, 'first_last' or null")
    for key, (ok, hint) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise _invalid(key, value, hint)
    if k != "all" and cfg.min_contributions > k:  # one-shot "Fused" baseline: rounds=1 contributors_per_round=all
        raise _invalid("min_contributions", cfg.min_contributions, "between 1 and contributors_per_round")
    for recipe in ("client", "eval.finetune"):
        if OmegaConf.select(cfg, f"{recipe}.max_steps") is None and OmegaConf.select(cfg, f"{recipe}.epochs") is None:
            raise ConfigError(f"config keys '{recipe}.max_steps' and '{recipe}.epochs' are both null: set a budget")
    if cfg.backtrack.threshold is not None and cfg.eval.probe.every != 1:
        raise ConfigError(f"config key 'backtrack.threshold' needs the probe every round (eval.probe.every=1), got "
                          f"eval.probe.every={cfg.eval.probe.every!r}: a round without a probe could not be rolled back")
    if cfg.backtrack.monitor == "heldout":
        raise ConfigError("config key 'backtrack.monitor' has invalid value 'heldout': held-out (unseen) tasks must not "
                          "steer training, or every unseen figure of the run is selected on them; use contributing")
    if cfg.mode == "async" and cfg.backtrack.threshold is not None:
        raise ConfigError(f"config key 'backtrack.threshold' must be null with mode=async, got "
                          f"{cfg.backtrack.threshold!r}: back-tracking rolls back synchronous rounds, and an "
                          "asynchronous version has contributions in flight on it")
    if any(not factor >= 1 for factor in (cfg.faults.slow or {}).values()):
        raise _invalid("faults.slow", dict(cfg.faults.slow), "{task name: factor >= 1}")
    try:  # the operator checks its own parameters, naming the key (fusion.<parameter>)
        operator = build_operator(OmegaConf.to_container(cfg.fusion, resolve=True))
    except FusionError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.mode == "async" and (problem := refusal(operator, str(cfg.asynchronous.aggregation),
                                                   str(cfg.asynchronous.staleness_weight))):
        raise ConfigError(problem)  # at start, not at the ServerApp's first stale reply


def _check_keys(node: DictConfig, prefix: str = "") -> None:
    """Every key of the schema is there and no other: a ``+key=value`` (or ``++``) override adds a key Hydra's
    struct mode would refuse, and nothing would read it; ``~key`` deletes one that the run needs."""
    type_ = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(type_):
        return
    fields = [f.name for f in dataclasses.fields(type_)]
    for key in node.keys():
        if key not in fields:
            raise _unknown(f"{prefix}{key}", fields, prefix)
    if deleted := [key for key in fields if key not in node.keys()]:
        raise ConfigError(f"config key '{prefix}{deleted[0]}' was deleted (~{prefix}{deleted[0]}): the run needs "
                          "every key of conf/; set it to a value (or null, where the key allows it) instead")
    for key in fields:
        # a TYPED_AFTER key is checked against its type (_check_typed), a missing value is named as such (_validate),
        # an interpolation's target where it lives
        if f"{prefix}{key}" in TYPED_AFTER or OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        if OmegaConf.is_dict(child := node[key]):
            _check_keys(child, f"{prefix}{key}.")
    if not prefix:
        _check_task_keys(node)


def _not_in_conf(exc: BaseException) -> ConfigError | None:
    """Hydra's "Could not override 'key'" for a key of the schema's own (not a free mapping's entry), with
    the close match instead of its hint to add the key with '+' (which :func:`_check_keys` refuses)."""
    found = re.match(r"Could not override '([^']+)'", str(exc))
    if not found:
        return None
    key = found.group(1)
    parent, _, _ = key.rpartition(".")
    type_ = schema_type(parent) if parent else RunConfig
    known = ([f.name for f in dataclasses.fields(type_)] if dataclasses.is_dataclass(type_)
             else _task_keys() if parent == "tasks" else None)
    return _unknown(key, known, f"{parent}." if parent else "") if known is not None else None


def _unknown(key: str, known: list[str], prefix: str = "") -> ConfigError:
    name = key[len(prefix):]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; the keys there: {', '.join(known)}"
    return ConfigError(f"unknown config key '{key}': conf/ has no such key, and an override cannot add one "
                       f"(with or without '+'){hint}")


@functools.lru_cache(maxsize=1)
def _task_keys() -> list[str]:
    """The keys the task presets (``conf/tasks/*.yaml``) define: ``tasks`` is a mapping whose shape depends on
    its kind (the schema leaves it open), and an experiment may move synthetic keys onto a catalog."""
    keys: dict[str, None] = {}
    for preset in sorted((CONF_DIR / "tasks").glob("*.yaml")):
        keys.update(dict.fromkeys(k for k in OmegaConf.load(preset) if k != "defaults"))
    return list(keys)


def _check_task_keys(cfg: DictConfig) -> None:
    if OmegaConf.is_dict(cfg.get("tasks")):
        for key in cfg.tasks.keys():
            if key not in _task_keys():
                raise _unknown(f"tasks.{key}", _task_keys(), "tasks.")


def _invalid(key: str, value: Any, hint: str) -> ConfigError:
    return ConfigError(f"config key '{key}' has invalid value {value!r}: must be {hint}")


def _check_typed(cfg: DictConfig, key: str, type_: Any) -> None:
    """A key the schema leaves Any (see ``TYPED_AFTER``): its value, unless null, against ``type_``."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if not OmegaConf.is_dict(value):
        raise ConfigError(f"config key '{key}' must be a mapping or null, got {value!r}")
    typed = (OmegaConf.structured(type_) if dataclasses.is_dataclass(type_)
             else DictConfig({}, key_type=str, element_type=typing.get_args(type_)[1]))
    try:
        typed.merge_with(value)
    except OmegaConfBaseException as exc:
        raise _schema_error(exc, f"{key}.") or ConfigError(f"config key '{key}': {str(exc).splitlines()[0]}") from exc
    if missing := OmegaConf.missing_keys(typed):
        raise ConfigError(f"config key '{key}' lacks {sorted(missing)}")


def to_container(cfg: DictConfig, key: str = "") -> dict:
    """A plain dict of ``cfg[key]`` (the whole config for ""), interpolations resolved, allowed values as strings."""
    node = OmegaConf.select(cfg, key) if key else cfg
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)  # type: ignore[return-value]
