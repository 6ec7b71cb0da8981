import pytest

from app.run.config import ConfigError, compose_config


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
    ("eval.finetune.roles=[seen]", "'eval.finetune.roles' has invalid value"),
    ("eval.few_shot=0", "'eval.few_shot' has invalid value 0"),
    ("eval.finetune.max_steps=null", "'eval.finetune.max_steps' and 'eval.finetune.epochs' are both null"),
    ("client=paper client.early_stopping.dev_fraction=1.5", "'client.early_stopping.dev_fraction' has invalid value 1.5"),
    ("client.head_policy=sometimes", "'client.head_policy' has invalid value 'sometimes'"),
    ("client.lr=-1", "'client.lr' has invalid value -1"),
    ("model=gpt7", "Could not find 'model/gpt7'"),
    ("min_contributions=9", "'min_contributions' has invalid value 9"),
    ("client.max_steps=null client.epochs=null", "set a budget"),
])
def test_bad_overrides_fail_with_a_message_naming_them(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        compose_config("", override)


def test_unknown_experiment_is_named():
    with pytest.raises(ConfigError, match="experiment/nope"):
        compose_config("nope")
