import json
import re

import pytest
from omegaconf import OmegaConf

from app.run.config import CONF_DIR, ConfigError, compose_config, encode_overrides, split_overrides, to_container


def test_defaults_compose_to_the_paper_like_default_run():
    cfg = compose_config()
    assert cfg.model.name_or_path == "tiny"
    assert cfg.tasks.kind == "synthetic" and cfg.tasks.num_tasks == 35 and cfg.tasks.num_heldout == 7
    assert cfg.contributors_per_round == 8 and cfg.rounds == 10
    assert cfg.client.head_policy == "keep"


def test_overrides_and_experiments_change_conf():
    cfg = compose_config("", "rounds=3 contributors_per_round=4 client.head_policy=reinit model=minilm")
    assert (cfg.rounds, cfg.contributors_per_round, cfg.client.head_policy) == (3, 4, "reinit")
    assert cfg.model.name_or_path == "minilm"
    quick = compose_config("quick", ["rounds=5"])
    assert quick.rounds == 5 and quick.client.max_steps == 10  # the override wins over the experiment


@pytest.mark.parametrize("override, message", [
    ("no_such_key=1", "unknown config key 'no_such_key': conf/ has no such key"),
    # the fix Hydra itself suggests for an unknown key ('+' adds it) is refused too, with the close match
    ("roundz=3", "unknown config key 'roundz': conf/ has no such key, and an override cannot add one (with or "
                 "without '+'); did you mean 'rounds'?"),
    ("+roundz=3", "unknown config key 'roundz': conf/ has no such key, and an override cannot add one (with or "
                  "without '+'); did you mean 'rounds'?"),
    ("++roundz=3", "unknown config key 'roundz'"),
    ("+client.lrr=1", "unknown config key 'client.lrr': conf/ has no such key, and an override cannot add one "
                      "(with or without '+'); did you mean 'client.lr'?"),
    ("+model.tiny.hidden=3", "unknown config key 'model.tiny.hidden'"),
    ("+eval.probe.foo=1", "unknown config key 'eval.probe.foo'"),
    ("+tasks.num_task=8", "unknown config key 'tasks.num_task': conf/ has no such key, and an override cannot add "
                          "one (with or without '+'); did you mean 'tasks.num_tasks'?"),
    ("~rounds", "config key 'rounds' was deleted (~rounds): the run needs every key of conf/"),
    ("client.lr=???", "config keys ['client.lr'] have no value: set them in conf/ or as overrides"),
    ("experiment=quick experiment=tiny_sweep", "config group 'experiment' is set 2 times (experiment=quick, "
                                               "experiment=tiny_sweep)"),
    ("client.device=gpu", "config key 'client.device' has invalid value 'gpu': must be 'auto', 'cpu', 'cuda', "
                          "'cuda:N' or 'mps'"),
    ("client.device=cuda:", "config key 'client.device' has invalid value 'cuda:'"),
    ("client.device=cuda:x", "config key 'client.device' has invalid value 'cuda:x'"),
    ("client.device=CPU", "config key 'client.device' has invalid value 'CPU'"),
    ("rounds=abc", "config key 'rounds' must be int, got 'abc'"),
    ("rounds=-1", "config key 'rounds' has invalid value -1"),
    ("eval.finetune.every=0", "'eval.finetune.every' has invalid value 0: must be k >= 1, 'first_last' or null"),
    ("eval.finetune.roles=[seen]", "'eval.finetune.roles[0]' has invalid value 'seen': must be one of contributing, heldout"),
    ("eval.finetune.roles=[]", "'eval.finetune.roles' has invalid value []"),
    ("eval.few_shot=0", "'eval.few_shot' has invalid value 0"),
    ("eval.finetune.max_steps=null", "'eval.finetune.max_steps' and 'eval.finetune.epochs' are both null"),
    ("client=paper client.early_stopping.dev_fraction=1.5", "'client.early_stopping.dev_fraction' has invalid value 1.5"),
    ("client.head_policy=sometimes", "'client.head_policy' has invalid value 'sometimes'"),
    ("client.lr=-1", "'client.lr' has invalid value -1"),
    ("model=gpt7", "Could not find 'model/gpt7'"),
    ("min_contributions=9", "'min_contributions' has invalid value 9"),
    ("client.max_steps=null client.epochs=null", "set a budget"),
    # refused by the schema while Hydra composes: a wrong type, a value out of an enum
    ("client.batch_size=abc", "config key 'client.batch_size' must be int, got 'abc' (str)"),
    ("faults.enabled=maybe", "config key 'faults.enabled' must be bool, got 'maybe' (str)"),
    ("client.head_scope=forever", "config key 'client.head_scope' has invalid value 'forever': must be one of run, site"),
    ("backtrack.monitor=seen", "config key 'backtrack.monitor' has invalid value 'seen': must be one of contributing"),
    ("model.tiny.hidden_size=wide", "config key 'model.tiny.hidden_size' has invalid value 'wide'"),
    # union values, checked by hand
    ("contributors_per_round=some", "config key 'contributors_per_round' has invalid value 'some': must be >= 1 or 'all'"),
    ("contributors_per_round=1.5", "config key 'contributors_per_round' must be int/str, got 1.5 (float)"),
    ("eval.probe.every=sometimes", "config key 'eval.probe.every' has invalid value 'sometimes'"),
    # keys that are null or a mapping: checked against their schema type once composed
    ("client=paper client.early_stopping.every_examples=often", "'client.early_stopping.every_examples' must be int"),
    ("client.early_stopping=3", "config key 'client.early_stopping' must be a mapping or null, got 3"),
    ("transport.dtype=float8", "config key 'transport.dtype' has invalid value 'float8': must be one of float32, "
                               "float16, bfloat16"),
    ("simulation.client_gpus=-0.5", "config key 'simulation.client_gpus' has invalid value -0.5"),
    ("simulation.ray_cpus=0", "config key 'simulation.ray_cpus' has invalid value 0"),
    ("federation.progress_s=0", "config key 'federation.progress_s' has invalid value 0"),
])
def test_bad_overrides_fail_with_a_message_naming_them(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config("", override)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_every_device_form_torch_runs_on_is_accepted(device):
    assert compose_config("", [f"client.device={device}"]).client.device == device


def test_an_experiment_given_as_argument_and_as_override_is_refused():
    with pytest.raises(ConfigError, match=re.escape("config group 'experiment' is set 2 times (experiment=quick, "
                                                    "+experiment=tiny_sweep)")):
        compose_config("quick", ["+experiment=tiny_sweep"])


def test_keys_that_exist_may_be_forced_and_free_mappings_may_grow():
    """'++' on a key of conf/ sets it; '+' adds an entry to a mapping whose keys are names (faults.slow)."""
    cfg = compose_config("", ["++rounds=4", "faults.slow={t0: 2}", "+faults.slow.t1=3"])
    assert cfg.rounds == 4 and dict(cfg.faults.slow) == {"t0": 2, "t1": 3}


# Overrides that a space-joined string would break: a path with a space, quotes and a comma; a dict value.
AWKWARD = ["tasks=shared_data", "tasks.data_root='/tmp/my data, \\'quoted\\''", "faults.slow={t0: 2, t1: 1.5}",
           "rounds=3"]


def test_encoded_overrides_come_back_exactly_and_compose_as_given():
    encoded = encode_overrides(AWKWARD)
    assert split_overrides(encoded) == AWKWARD
    assert json.loads(encoded) == AWKWARD  # the oracle: plain JSON
    cfg = compose_config("", encoded)  # what the ServerApp does with the run config's `overrides`
    assert cfg.tasks.data_root == "/tmp/my data, 'quoted'"
    assert dict(cfg.faults.slow) == {"t0": 2, "t1": 1.5} and cfg.rounds == 3


def test_a_hand_written_space_separated_overrides_string_still_works():
    """``flwr run . --run-config 'overrides="rounds=3 ..."'``: split as a shell would, quotes respected."""
    assert split_overrides("rounds=3  contributors_per_round=4") == ["rounds=3", "contributors_per_round=4"]
    assert split_overrides("tasks.data_root='/my data' rounds=1") == ["tasks.data_root=/my data", "rounds=1"]
    assert split_overrides("") == [] and split_overrides(None) == []
    cfg = compose_config("", "rounds=3 contributors_per_round=4")
    assert (cfg.rounds, cfg.contributors_per_round) == (3, 4)


@pytest.mark.parametrize("overrides, message", [
    ('["rounds=3"', "run config 'overrides' is not a valid JSON list"),
    ('["rounds=3", 4]', "run config 'overrides' must be a JSON list of strings"),
    ("rounds=3 'unclosed", "run config 'overrides' cannot be split (No closing quotation)"),
])
def test_a_malformed_overrides_string_is_named(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        split_overrides(overrides)


def test_a_partial_early_stopping_rule_names_what_it_lacks():
    with pytest.raises(ConfigError, match=re.escape("'client.early_stopping' lacks ['dev_fraction',")):
        compose_config("", ["client.early_stopping={every_examples: 10}"])


def _plain(path):
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / path), resolve=False)
    config.pop("defaults", None)
    config.pop("hydra", None)
    return config


def test_the_default_config_resolves_to_the_yaml_files_plain_values_in_their_order():
    """The schema adds no key, drops none, reorders none and changes no value's type: repr() shows an Enum or
    an int turned float (the yaml files read with OmegaConf alone are the oracle)."""
    expected = {"model": _plain("model/tiny.yaml"), "tasks": _plain("tasks/synthetic.yaml"),
                "client": _plain("client/default.yaml"), "eval": _plain("eval/default.yaml"),
                "fusion": _plain("fusion/uniform_mean.yaml"), **_plain("config.yaml")}
    resolved = to_container(compose_config())
    assert repr(resolved) == repr(expected)
    assert OmegaConf.to_yaml(compose_config(), resolve=True) == OmegaConf.to_yaml(OmegaConf.create(expected))


def test_unknown_experiment_is_named():
    with pytest.raises(ConfigError, match="experiment/nope"):
        compose_config("nope")


def test_simulation_resources_reach_flowers_federation_config():
    from app.run.launch import federation_config

    assert federation_config(compose_config("", ""), 35) == \
        "num-supernodes=35 client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    packed = compose_config("", "simulation.client_gpus=0.25 simulation.client_cpus=2 simulation.ray_cpus=16")
    assert federation_config(packed, 8) == \
        "num-supernodes=8 client-resources-num-cpus=2 client-resources-num-gpus=0.25 init-args-num-cpus=16"
