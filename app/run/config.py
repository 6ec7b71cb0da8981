"""Compose the run configuration from ``conf/`` with Hydra's compose API, and check it.

The Flower run config carries only bridge keys (``experiment``, ``overrides``, ``output-dir``); this
module turns them into the full, validated configuration. A bad key or value fails here, at once,
with a message that names it.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
    """``conf/config.yaml`` + ``experiment=<name>`` + overrides (``"rounds=3 client.lr=1e-4"``)."""
    args = split_overrides(overrides)
    if experiment:
        args = [f"experiment={experiment}", *args]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=args)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"invalid configuration override in {args}: {exc}") from exc
    finally:
        GlobalHydra.instance().clear()
    validate_config(cfg)
    return cfg


def _require(cfg: DictConfig, key: str, kind: type | tuple, check=None, hint: str = "") -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r} ({type(value).__name__})")
    if check is not None and not check(value):
        raise ConfigError(f"config key '{key}' has invalid value {value!r}: {hint}")
    return value


def validate_config(cfg: DictConfig) -> None:
    """Type and range checks for every key the run reads (Hydra already rejects unknown keys)."""
    positive = lambda v: v > 0  # noqa: E731
    number = (int, float)
    _require(cfg, "seed", int)
    _require(cfg, "rounds", int, lambda v: v >= 0, "must be >= 0 (0: evaluate the start model only)")
    if cfg.contributors_per_round == "all":  # one-shot "Fused" baseline: rounds=1 contributors_per_round=all
        _require(cfg, "min_contributions", int, positive, "must be >= 1")
    else:
        k = _require(cfg, "contributors_per_round", int, positive, "must be >= 1 or 'all'")
        _require(cfg, "min_contributions", int, lambda v: 1 <= v <= k, "must be between 1 and contributors_per_round")
    if cfg.federation.expected_nodes is not None:
        _require(cfg, "federation.expected_nodes", int, positive, "must be >= 1 or null")
    _require(cfg, "federation.node_wait_timeout_s", number, positive, "must be > 0 seconds")
    for key in ("discovery", "train", "eval"):
        _require(cfg, f"federation.{key}_timeout_s", number, positive, "must be > 0 seconds")
    if cfg.federation.run_timeout_s is not None:
        _require(cfg, "federation.run_timeout_s", number, positive, "must be > 0 seconds or null")
    _require(cfg, "model.name_or_path", str, bool, "must not be empty")
    _require(cfg, "client.lr", number, positive, "must be > 0")
    _require(cfg, "client.weight_decay", number, lambda v: v >= 0, "must be >= 0")
    _require(cfg, "client.warmup_ratio", number, lambda v: 0 <= v < 1, "must be in [0, 1)")
    _require(cfg, "client.batch_size", int, positive, "must be >= 1")
    _require(cfg, "client.max_length", int, lambda v: v >= 8, "must be >= 8 tokens")
    if cfg.client.max_steps is None and cfg.client.epochs is None:
        raise ConfigError("config keys 'client.max_steps' and 'client.epochs' are both null: set a budget")
    if cfg.client.max_steps is not None:
        _require(cfg, "client.max_steps", int, positive, "must be >= 1 or null")
    if cfg.client.epochs is not None:
        _require(cfg, "client.epochs", number, positive, "must be > 0 or null")
    if cfg.client.max_grad_norm is not None:
        _require(cfg, "client.max_grad_norm", number, positive, "must be > 0 or null")
    _require(cfg, "client.head_policy", str, lambda v: v in ("keep", "reinit"), "must be 'keep' or 'reinit'")
    _require(cfg, "client.head_scope", str, lambda v: v in ("run", "site"), "must be 'run' or 'site'")
    _require(cfg, "client.device", str, bool, "must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
    _check_early_stopping(cfg, "client.early_stopping")
    _check_eval(cfg)
    for key in ("validation.max_update_norm", "validation.max_relative_norm", "backtrack.threshold"):
        if OmegaConf.select(cfg, key) is not None:
            _require(cfg, key, number, lambda v: v > 0, "must be > 0 or null")
    _require(cfg, "validation.min_peers", int, positive, "must be >= 1")
    _require(cfg, "validation.min_reference_norm", number, positive, "must be > 0")
    _require(cfg, "backtrack.monitor", str, lambda v: v in ("contributing", "heldout"), "must be 'contributing' or 'heldout'")
    if cfg.backtrack.threshold is not None and cfg.eval.probe.every != 1:
        raise ConfigError(f"config key 'backtrack.threshold' needs the probe every round (eval.probe.every=1), got "
                          f"eval.probe.every={cfg.eval.probe.every!r}: a round without a probe could not be rolled back")
    if cfg.resume is not None:
        _require(cfg, "resume", str, lambda v: Path(v).is_dir(), "must be an existing run directory")
    _require(cfg, "faults.enabled", bool)
    from app.site.faults import FAULTS

    for task, fault in (cfg.faults.tasks or {}).items():
        if fault not in FAULTS:
            raise ConfigError(f"config key 'faults.tasks.{task}' has invalid value {fault!r}: must be one of {FAULTS}")
    from strategies.fusion import FUSION_OPERATORS

    _require(cfg, "fusion.operator", str, lambda v: v in FUSION_OPERATORS, f"must be one of {sorted(FUSION_OPERATORS)}")
    _require(cfg, "tasks.kind", str, lambda v: v in ("synthetic", "catalog"), "must be 'synthetic' or 'catalog'")


def _check_eval(cfg: DictConfig) -> None:
    from strategies.schedule import VIEWS

    positive = lambda v: v > 0  # noqa: E731
    for view in VIEWS:
        every = OmegaConf.select(cfg, f"eval.{view}.every")
        if every is not None and every != "first_last":
            _require(cfg, f"eval.{view}.every", int, positive, "must be k >= 1, 'first_last' or null")
        for split in ("train", "test"):
            if OmegaConf.select(cfg, f"eval.{view}.max_{split}_examples") is not None:
                _require(cfg, f"eval.{view}.max_{split}_examples", int, positive, "must be >= 1 or null")
    _require(cfg, "eval.start", bool)
    _require(cfg, "eval.finetune.roles", (list, ListConfig),
             lambda v: len(v) > 0 and set(v) <= {"contributing", "heldout"}, "must list 'contributing' and/or 'heldout'")
    if cfg.eval.finetune.max_steps is None and cfg.eval.finetune.epochs is None:
        raise ConfigError("config keys 'eval.finetune.max_steps' and 'eval.finetune.epochs' are both null: set a budget")
    for key in ("eval.finetune.max_steps", "eval.few_shot"):
        if OmegaConf.select(cfg, key) is not None:
            _require(cfg, key, int, positive, "must be >= 1 or null")
    if cfg.eval.finetune.epochs is not None:
        _require(cfg, "eval.finetune.epochs", (int, float), positive, "must be > 0 or null")
    _check_early_stopping(cfg, "eval.finetune.early_stopping")


def _check_early_stopping(cfg: DictConfig, key: str) -> None:
    """null, or the paper's rule: every_examples, patience_examples, min_gain, dev_fraction, dev_max_examples."""
    if OmegaConf.select(cfg, key) is None:
        return
    _require(cfg, f"{key}.every_examples", int, lambda v: v > 0, "must be >= 1")
    _require(cfg, f"{key}.patience_examples", int, lambda v: v > 0, "must be >= 1")
    _require(cfg, f"{key}.min_gain", (int, float), lambda v: v >= 0, "must be >= 0")
    _require(cfg, f"{key}.dev_fraction", float, lambda v: 0 < v < 1, "must be in (0, 1)")
    _require(cfg, f"{key}.dev_max_examples", int, lambda v: v > 0, "must be >= 1")


def to_container(cfg: DictConfig, key: str = "") -> dict:
    """A plain dict of ``cfg[key]`` (the whole config for ""), interpolations resolved."""
    node = OmegaConf.select(cfg, key) if key else cfg
    return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
