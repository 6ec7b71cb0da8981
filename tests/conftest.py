"""Shared fixtures: the real tiny model (built once per session into a private cache), composed configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("coldfusion-cache")


@pytest.fixture(scope="session")
def tiny_cfg(cache_dir):
    """The default configuration shrunk for tests, with the tiny model cached in a private folder."""
    from app.run.config import compose_config

    return compose_config("quick", [f"model.cache_dir={cache_dir}", "client.max_steps=5",
                                    "tasks.train_size=200", "tasks.test_size=100",
                                    "eval.probe.max_train_examples=150", "eval.probe.max_test_examples=100",
                                    "eval.finetune.max_steps=5", "eval.finetune.max_train_examples=150",
                                    "eval.finetune.max_test_examples=100"])


@pytest.fixture(scope="session")
def tiny_path(tiny_cfg) -> str:
    from app.run.config import to_container
    from app.learning.model import resolve_model

    return resolve_model(to_container(tiny_cfg, "model"))


@pytest.fixture(scope="session")
def pool(tiny_cfg):
    from app.run.config import to_container
    from tasks.registry import build_pool

    return build_pool(to_container(tiny_cfg, "tasks"))


@pytest.fixture(scope="session")
def small_pool(pool):
    """Six contributing and two held-out tasks: enough for every strategy path, fast in-process."""
    contributing = [e for e in pool if e["role"] == "contributing"][:6]
    heldout = [e for e in pool if e["role"] == "heldout"][:2]
    return contributing + heldout


def model_json(cfg) -> str:
    from app.run.config import to_container

    return json.dumps(to_container(cfg, "model"), sort_keys=True)


@pytest.fixture()
def node(pool):
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 0
    return Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": len(pool)},
                   state=RecordDict(), run_config={})


# ------------------------------------------------------------------ independent oracles of the key split
# Written out by hand from the BERT/RoBERTa architecture (not computed by app.learning.model): what a sequence classifier's
# body (keys relative to its base model) and head are, for the tiny RoBERTa and for MiniLM (BERT).
ROBERTA_HEAD = {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                "classifier.out_proj.bias"}
BERT_HEAD = {"classifier.weight", "classifier.bias"}
_LAYER = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]


def encoder_keys(layers: int, pooler: bool) -> set[str]:
    """The state-dict keys of a BERT-style encoder with ``layers`` layers (and the pooler, if it has one)."""
    keys = {f"embeddings.{name}" for name in ("word_embeddings.weight", "position_embeddings.weight",
                                              "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")}
    keys |= {f"encoder.layer.{i}.{module}.{p}" for i in range(layers) for module in _LAYER for p in ("weight", "bias")}
    return keys | ({"pooler.dense.weight", "pooler.dense.bias"} if pooler else set())


# tiny: 2 layers, its classifier's body has no pooler; MiniLM-L6: 6 layers, the pooler is body (app/learning/model.py)
SPLITS = {
    "tiny": {"prefix": "roberta", "body": encoder_keys(2, pooler=False), "head": ROBERTA_HEAD},
    "minilm": {"prefix": "bert", "body": encoder_keys(6, pooler=True), "head": BERT_HEAD},
}


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from app.learning.model import resolve_model

    return resolve_model({"name_or_path": "minilm"})


@pytest.fixture(scope="session")
def half_path(tiny_path, tmp_path_factory) -> str:
    """The tiny model saved in float16 (a Hugging Face folder whose config declares dtype float16)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-float16")
    AutoModel.from_pretrained(tiny_path).to(torch.float16).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(out)
    return str(out)
