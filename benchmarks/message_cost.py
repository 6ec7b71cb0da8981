"""A train message's fixed cost on a node: seconds from the start of the process that handles it to the first
training step, as a deployment pays it (a SuperNode starts a fresh ClientApp process for every message), against
the bare cost of ``import torch, transformers`` plus loading the model, measured alongside.

    .venv/bin/python benchmarks/message_cost.py --out benchmarks/results/message_cost            # imdb, MiniLM
    .venv/bin/python benchmarks/message_cost.py --out DIR --data ../shared/data/sst2 --repeats 1

Every measurement is its own fresh process (median of ``--repeats``), so no import, model or dataset is warm in
memory; what the operating system caches on disk is warm for all (one untimed warm-up of each variant first):

* ``bare``: ``import torch, transformers`` and ``AutoModelForSequenceClassification.from_pretrained(MiniLM)``;
* ``after``: this project's ClientApp handling a train message (``experiment=realdata``'s recipe, MiniLM, one site
  whose node config names a dataset directory, as a deployed site's does): imports, reading the message's body
  from disk (what Flower's deserialisation stands for), the handler, up to the model's first forward pass in
  training;
* ``before``: the same, with the two per-message costs as they were before issue 13: the model built with a
  random initialisation then overwritten by the body, and every split of the dataset tokenised eagerly in
  memory (``datasets.map``, no cache), restated here from the earlier ``tasks/tokenize.py``.

The first forward pass is caught by a global module forward hook, which stops the handler there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("bare", "before", "after")


class FirstStep(Exception):
    """Raised by the forward hook: the handler reached its first training step."""


def minilm_path() -> str:
    from app.learning.model import resolve_model

    return resolve_model({"name_or_path": "minilm"})


def bare() -> dict:
    import torch  # noqa: F401
    import transformers

    transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    return {}


def patch_before() -> None:
    """Restate the per-message set-up as it was: a randomly initialised model overwritten by the body, and every
    split tokenised eagerly (``git show 880c0fe^:tasks/tokenize.py``)."""
    import app.site.contributor as contributor
    from app.learning.model import build_classifier, load_body

    def build_then_overwrite(path, num_labels, head_seed, body=None):
        model = build_classifier(path, num_labels, head_seed)
        if body is not None:
            load_body(model, body)
        return model

    def tokenize_eagerly(data, tokenizer, max_length):
        pair = "text_pair" in data["train"].column_names

        def encode(batch):
            args = (batch["text"], batch["text_pair"]) if pair else (batch["text"],)
            return {**tokenizer(*args, truncation=True, max_length=max_length), "labels": batch["label"]}

        return data.map(encode, batched=True, remove_columns=data["train"].column_names, load_from_cache_file=False,
                        keep_in_memory=True, desc=None)

    contributor.build_classifier, contributor.tokenize_task = build_then_overwrite, tokenize_eagerly


def handle_train_message(variant: str, data_dir: str, body_file: str) -> dict:
    """The ClientApp's train handler on one message, stopped at the model's first forward pass."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file

    from app.client_app import app as client_app
    from app.run.config import compose_config
    from app.run.server import round_configs
    from app.site.contributor import node_task_entry
    from tasks.registry import entry_key

    if variant == "before":
        patch_before()
    imported = time.time()
    body = load_file(body_file)  # the message's arrays, as Flower hands them over deserialised
    cfg = compose_config("realdata")
    train, _ = round_configs(cfg, json.dumps({"name_or_path": "minilm"}))
    node_config = {"data-dir": data_dir}
    config = ConfigRecord({**dict(train), "server-round": 1, "transport": "float32",
                           "task-entry": entry_key(node_task_entry(node_config, []))})
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0  # as a ClientApp process has it
    message = Message(content=RecordDict({"arrays": ArrayRecord(body), "config": config}),
                      message_type=MessageType.TRAIN, dst_node_id=1)
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    def stop(module, args):
        if module.training:
            raise FirstStep

    torch.nn.modules.module.register_module_forward_pre_hook(stop)
    handed_over = time.time()
    try:
        reply = client_app(message, context)
    except FirstStep:
        return {"imports_s": imported, "message_at": handed_over}
    raise RuntimeError(f"the handler returned without training: {reply.error if reply.has_error() else reply}")


def child(variant: str, data_dir: str, body_file: str) -> None:
    from app.site.contributor import process_age

    started = time.time() - process_age(time.time())
    marks = bare() if variant == "bare" else handle_train_message(variant, data_dir, body_file)
    done = time.time()
    out = {"total_s": done - started}
    if marks:  # split: imports; the message handed over; the handler up to the first step
        out.update(imports_s=marks["imports_s"] - started, handler_s=done - marks["message_at"])
    print(json.dumps(out))


def measure(variant: str, data_dir: str, body_file: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--data", data_dir, "--body", body_file]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "imdb"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--body")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.data, args.body)
    if not Path(args.data, "meta.json").is_file():
        raise SystemExit(f"--data {args.data}: not a local dataset directory (no meta.json)")
    from safetensors.torch import save_file

    from app.learning.model import initial_body

    with tempfile.TemporaryDirectory() as tmp:
        body_file = str(Path(tmp) / "body.safetensors")
        save_file(initial_body(minilm_path()), body_file)
        for variant in VARIANTS:
            measure(variant, args.data, body_file)  # warm-up: the disk cache, for every variant alike
        runs = {v: [measure(v, args.data, body_file) for _ in range(args.repeats)] for v in VARIANTS}
    medians = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for v, rs in runs.items()}
    reference = medians["bare"]["total_s"]
    lines = [f"Fresh process per message, MiniLM, {Path(args.data).name}, median of {args.repeats} "
             f"(`{' '.join(['benchmarks/message_cost.py', *sys.argv[1:]])}`)", "",
             "| | process start to first training step | of which imports | handler | x bare |",
             "|---|---|---|---|---|"]
    for variant in ("before", "after"):
        m = medians[variant]
        lines.append(f"| {variant} | {m['total_s']:.2f} s | {m['imports_s']:.2f} s | {m['handler_s']:.2f} s | "
                     f"{m['total_s'] / reference:.2f}x |")
    lines.append(f"| bare `import torch, transformers` + `from_pretrained` | {reference:.2f} s | | | 1.00x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "message_cost.md").write_text(table + "\n")
        (args.out / "message_cost.json").write_text(json.dumps({"data": args.data, "runs": runs,
                                                                "medians": medians}, indent=1) + "\n")


if __name__ == "__main__":
    main()
