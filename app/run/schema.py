"""The schema of ``conf/``: Hydra structured configs, so that Hydra rejects a wrong type or value at compose time.

Importing this module registers the schema in Hydra's ConfigStore; ``conf/config.yaml`` lists ``coldfusion_schema``
first in its defaults, so every composition (``app.run.config``, the ServerApp, ``coldfusion-sweep``) is typed by it.
The yaml files hold the defaults and say what each key means: fields here have no default (MISSING). What a type
cannot say (ranges, rules across keys, ``k or 'all'``) is checked by ``app.run.config.validate_config``.

Two limits of OmegaConf 2.3 shape this file: a config nested in another is created with it (``default_factory``),
because expanding a MISSING one that holds a Union crashes under Hydra (omry/omegaconf#1087); and a key that is
null by default and may become a mapping is typed ``Any`` here and checked against its type in ``TYPED_AFTER``
once composed, because OmegaConf cannot merge an override or an interpolation into a null typed node
(omry/omegaconf#1360, #1020).
"""

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from app.site.faults import FAULTS
from strategies.transport import TRANSPORT_DTYPES

Number = Union[int, float]  # an int stays an int, a float a float: the written config.yaml keeps the yaml's values


class Choice(str, Enum):
    """An allowed value that behaves as its plain string (==, hash, str(), f-strings, json)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class HeadPolicy(Choice):
    keep = "keep"
    reinit = "reinit"


class HeadScope(Choice):
    run = "run"
    site = "site"


class Role(Choice):  # backtrack.monitor, eval.finetune.roles
    contributing = "contributing"
    heldout = "heldout"


Fault = Choice("Fault", {name: name for name in FAULTS})  # a fault of app/site/faults.py
TransportDtype = Choice("TransportDtype", {name: name for name in TRANSPORT_DTYPES})  # strategies/transport.py


@dataclass
class TinyEncoder:  # model/tiny.yaml: the random-init encoder built on first use
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    intermediate_size: int = MISSING
    max_length: int = MISSING
    init_seed: int = MISSING
    corpus_seed: int = MISSING


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    cache_dir: Optional[str] = MISSING


@dataclass
class TinyModelConfig(ModelConfig):  # model/tiny.yaml extends it (its defaults list): only it has `tiny:`
    tiny: TinyEncoder = MISSING


@dataclass
class EarlyStopping:  # the paper's rule on a dev split (client/paper.yaml)
    every_examples: int = MISSING
    patience_examples: int = MISSING
    min_gain: float = MISSING
    dev_fraction: float = MISSING
    dev_max_examples: int = MISSING


@dataclass
class ClientConfig:
    lr: Number = MISSING
    weight_decay: Number = MISSING
    warmup_ratio: Number = MISSING
    batch_size: int = MISSING
    max_length: int = MISSING
    max_steps: Optional[int] = MISSING
    epochs: Optional[Number] = MISSING
    early_stopping: Any = MISSING  # null or EarlyStopping (TYPED_AFTER)
    max_grad_norm: Optional[Number] = MISSING
    head_policy: HeadPolicy = MISSING
    head_scope: HeadScope = MISSING
    device: str = MISSING


@dataclass
class ProbeView:
    every: Optional[Union[int, str]] = MISSING  # k >= 1, 'first_last' or null (validate_config)
    max_train_examples: Optional[int] = MISSING
    max_test_examples: Optional[int] = MISSING
    max_dev_examples: int = MISSING  # the rows decisions read (tasks.splits.fit_dev)
    dev_fraction: Number = MISSING  # of a train split too small to spare max_dev_examples rows past the fit draw
    batch_size: int = MISSING
    C: Number = MISSING
    ridge_alpha: Number = MISSING
    max_iter: int = MISSING


@dataclass
class FinetuneView:
    every: Optional[Union[int, str]] = MISSING  # as ProbeView.every
    roles: List[Role] = MISSING
    max_train_examples: Optional[int] = MISSING
    max_test_examples: Optional[int] = MISSING
    max_dev_examples: int = MISSING  # as ProbeView's; with early_stopping set, its dev split is the view's
    dev_fraction: Number = MISSING
    max_steps: Optional[int] = MISSING
    epochs: Optional[Number] = MISSING
    early_stopping: Any = MISSING  # null or EarlyStopping (TYPED_AFTER); experiment/paper.yaml: ${client.early_stopping}


@dataclass
class EvalConfig:
    start: bool = MISSING
    few_shot: Optional[int] = MISSING
    probe: ProbeView = field(default_factory=ProbeView)
    finetune: FinetuneView = field(default_factory=FinetuneView)


@dataclass
class ValidationConfig:
    max_update_norm: Optional[Number] = MISSING
    max_relative_norm: Optional[Number] = MISSING
    min_peers: int = MISSING
    min_reference_norm: Number = MISSING


@dataclass
class TransportConfig:
    dtype: TransportDtype = MISSING  # type: ignore[valid-type]


@dataclass
class BacktrackConfig:
    threshold: Optional[Number] = MISSING
    monitor: Role = MISSING  # contributing only: validate_config refuses heldout (held-out tasks must not steer)


@dataclass
class FaultsConfig:
    enabled: bool = MISSING
    tasks: Any = MISSING  # null or {task name: Fault} (TYPED_AFTER)
    hang_s: Number = MISSING
    scale: Number = MISSING
    seed: int = MISSING
    pinned: Optional[List[str]] = MISSING
    slow: Any = MISSING  # null or {task name: factor} (TYPED_AFTER)


# strategies/coldfusion.py (sync) | strategies/asynchronous.py (async; a keyword, hence the functional form)
Mode = Choice("Mode", {"sync": "sync", "async": "async"})


class StalenessWeight(Choice):  # strategies.asynchronous.staleness_weight
    inverse_sqrt = "inverse_sqrt"
    constant = "constant"


class AsyncAggregation(Choice):  # strategies.asynchronous.fold_terms
    normalised = "normalised"
    fedbuff = "fedbuff"


@dataclass
class AsynchronousConfig:
    concurrency: int = MISSING
    buffer_size: int = MISSING
    max_staleness: Optional[int] = MISSING
    staleness_weight: StalenessWeight = MISSING
    aggregation: AsyncAggregation = MISSING
    server_lr: Number = MISSING


@dataclass
class FederationConfig:
    expected_nodes: Optional[int] = MISSING
    node_wait_timeout_s: Number = MISSING
    discovery_timeout_s: Number = MISSING
    train_timeout_s: Number = MISSING
    eval_timeout_s: Number = MISSING
    run_timeout_s: Optional[Number] = MISSING
    progress_s: Number = MISSING


@dataclass
class SimulationConfig:
    client_cpus: int = MISSING
    client_gpus: Number = MISSING
    ray_cpus: Optional[int] = MISSING


@dataclass
class RunConfig:
    """The whole run configuration, in the order of the composed config (groups first, then config.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: Dict[str, Any] = MISSING  # the options differ in shape (synthetic / catalog): tasks/registry.py checks them
    client: ClientConfig = field(default_factory=ClientConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fusion: Dict[str, Any] = MISSING  # {operator: name, **its parameters}: strategies.fusion.build_operator checks it
    seed: int = MISSING
    rounds: int = MISSING
    mode: Mode = MISSING  # type: ignore[valid-type]
    contributors_per_round: Union[int, str] = MISSING  # k >= 1 or 'all' (validate_config)
    min_contributions: int = MISSING
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    asynchronous: AsynchronousConfig = field(default_factory=AsynchronousConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    backtrack: BacktrackConfig = field(default_factory=BacktrackConfig)
    resume: Optional[str] = MISSING
    resume_allow_config_change: bool = MISSING
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


# Keys typed Any above, and the type their value has when it is not null.
TYPED_AFTER: Dict[str, Any] = {"client.early_stopping": EarlyStopping, "eval.finetune.early_stopping": EarlyStopping,
                               "faults.tasks": Dict[str, Fault],  # type: ignore[valid-type]
                               "faults.slow": Dict[str, float]}


def schema_type(key: str) -> Any:
    """The type the schema gives a dotted key (``eval.finetune.roles[0]`` -> Role); Any where it leaves it open."""
    type_: Any = RunConfig
    path = []
    for part in re.findall(r"[^.\[\]]+", key):
        path.append(part)
        if dataclasses.is_dataclass(type_):
            type_ = TYPED_AFTER.get(".".join(path)) or typing.get_type_hints(type_).get(part, Any)
        elif typing.get_origin(type_) in (list, dict):
            type_ = typing.get_args(type_)[-1]
        else:
            return Any
    return type_


cs = ConfigStore.instance()
cs.store(name="coldfusion_schema", node=RunConfig)
cs.store(group="model", name="tiny_schema", node=TinyModelConfig)
