import re

import pytest
from omegaconf import OmegaConf

from app.run.config import CONF_DIR, ConfigError, compose_config, to_container


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
    ("no_such_key=1", "Could not override 'no_such_key'"),
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
