"""Compose the run configuration from ``conf/`` with Hydra's compose API, and check it.

The Flower run config carries only bridge keys (``experiment``, ``overrides``, ``output-dir``); this
module turns them into the full, validated configuration. Types and allowed values are the schema's
(``app.run.schema``): Hydra rejects a wrong one while composing. :func:`validate_config` checks what a
type cannot say. A bad key or value fails here, at once, with a message that names it.
"""

from __future__ import annotations

import dataclasses
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

from app.run.schema import TYPED_AFTER, schema_type  # importing it registers the schema
from strategies.fusion import FusionError, build_operator
from strategies.schedule import VIEWS

# conf/ ships inside the package after `pip install .` (app/conf, package data: see pyproject.toml);
# in a checkout (and an editable install) it is the repository's conf/.
_PACKAGED_CONF = Path(__file__).resolve().parents[1] / "conf"
CONF_DIR = _PACKAGED_CONF if (_PACKAGED_CONF / "config.yaml").is_file() else _PACKAGED_CONF.parents[1] / "conf"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


def split_overrides(overrides: str | list[str] | None) -> list[str]:
    if not overrides:
        return []
    return list(overrides) if isinstance(overrides, (list, tuple)) else shlex.split(overrides)


def compose_config(experiment: str = "", overrides: str | list[str] | None = None) -> DictConfig:
    """``conf/config.yaml`` + ``experiment=<name>`` + overrides (``"rounds=3 client.lr=1e-4"``), checked."""
    args = split_overrides(overrides)
    if experiment:
        args = [f"experiment={experiment}", *args]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=args)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _schema_error(exc) or ConfigError(f"invalid configuration override in {args}: {exc}") from exc
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
    "client.device": (bool, "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    **{f"client.early_stopping.{k}": rule for k, rule in _STOPPING.items()},
    "eval.few_shot": _AT_LEAST_1,
    **{f"eval.{view}.max_{split}_examples": _AT_LEAST_1 for view in VIEWS for split in ("train", "test")},
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
    "resume": (lambda v: Path(v).is_dir(), "an existing run directory"),
    "tasks.kind": (lambda v: v in ("synthetic", "catalog"), "'synthetic' or 'catalog'"),
}


def validate_config(cfg: DictConfig) -> DictConfig:
    """What the schema cannot say: every key set, ranges, ``k or 'all'`` values, rules across keys."""
    try:
        _validate(cfg)
    except OmegaConfBaseException as exc:  # an interpolation that does not resolve, or resolves to a wrong type
        raise _schema_error(exc) or ConfigError(f"invalid configuration: {exc}") from exc
    return cfg


def _validate(cfg: DictConfig) -> None:
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
    if cfg.mode == "async" and cfg.backtrack.threshold is not None:
        raise ConfigError(f"config key 'backtrack.threshold' must be null with mode=async, got "
                          f"{cfg.backtrack.threshold!r}: back-tracking rolls back synchronous rounds, and an "
                          "asynchronous version has contributions in flight on it")
    if any(not factor >= 1 for factor in (cfg.faults.slow or {}).values()):
        raise _invalid("faults.slow", dict(cfg.faults.slow), "{task name: factor >= 1}")
    try:  # the operator checks its own parameters, naming the key (fusion.<parameter>)
        build_operator(OmegaConf.to_container(cfg.fusion, resolve=True))
    except FusionError as exc:
        raise ConfigError(str(exc)) from None


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
