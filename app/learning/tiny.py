"""The embedded default model, ``model=tiny``: a small randomly initialised RoBERTa-style encoder with a
word-level tokenizer trained on the synthetic corpus (``tasks.synthetic``). Built offline, deterministic for
its settings, cached on disk (``COLDFUSION_CACHE``, default ``~/.cache/coldfusion``) and then loaded exactly
like any other checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

TINY_VERSION = 1  # bump when the way the tiny model is built changes (invalidates the cache)
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def default_cache_dir() -> Path:
    root = os.environ.get("COLDFUSION_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    ) / "coldfusion"
    return Path(root)


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
