"""The centralised multitask baseline: one process, every contributing dataset, one head per dataset.

    coldfusion-multitask --out outputs/multitask experiment=realdata [hydra overrides...]
    coldfusion-sim experiment=realdata rounds=0 model.name_or_path=outputs/multitask   # same evaluation

It is what ColD Fusion approximates without pooling the data: a shared body and a head per dataset,
trained with the contributor recipe (the same optimizer, learning rate, schedule, clipping, batch size
and training steps: ``app.learning.recipe``) for the same total number of steps a ColD Fusion run
spends (rounds x contributors per round x client.max_steps).
Each step takes one batch of one dataset, drawn uniformly at random, as ColD Fusion samples datasets
uniformly. The body is saved like a fused one, so ``rounds=0`` evaluates it with the same harness,
the same splits and the same views.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from app.run.config import ConfigError, compose_config, to_container
from app.learning.recipe import RecipeOptimizer, endless, train_steps
from app.learning.model import (
    ModelLoadError,
    body_state,
    build_classifier,
    derive_seed,
    initial_body,
    load_tokenizer,
    pick_device,
    resolve_model,
    save_fused_model,
)
from tasks.registry import load_task, resolve_pool
from tasks.spec import TaskDataError
from tasks.tokenize import tokenize_task

console = Console()


def contributor_steps(cfg) -> int:
    """The total number of contributor steps of the ColD Fusion run this baseline is compared with."""
    if cfg.client.max_steps is None:
        raise ConfigError("the multitask baseline matches ColD Fusion's step budget: set client.max_steps (or --steps)")
    contributing = sum(e["role"] == "contributing" for e in resolve_pool(to_container(cfg, "tasks")).entries)
    per_round = contributing if cfg.contributors_per_round == "all" else min(int(cfg.contributors_per_round), contributing)
    return int(cfg.rounds) * per_round * int(cfg.client.max_steps)


def train_multitask(cfg, out_dir: Path, steps: int) -> dict[str, int]:
    """Train a shared body with one head per contributing dataset; save the body to ``out_dir``."""
    recipe, seed = to_container(cfg, "client"), int(cfg.seed)
    path = resolve_model(to_container(cfg, "model"))
    tokenizer = load_tokenizer(path)
    entries = [e for e in resolve_pool(to_container(cfg, "tasks")).entries if e["role"] == "contributing"]
    models, batches = {}, {}
    start, body = initial_body(path), None  # the pretrained (or tiny) start body, as ColD Fusion's round 1 gets it
    for entry in entries:
        info, data = load_task(entry)
        model = build_classifier(path, info.num_labels, derive_seed(seed, info.name, "head", 0), body=start)
        if body is None:
            body = model.base_model
        else:  # every head sits on the one shared body
            setattr(model, model.base_model_prefix, body)
        models[info.name] = model
        train = tokenize_task(data, tokenizer, int(recipe["max_length"]))["train"]
        loader = DataLoader(train, batch_size=int(recipe["batch_size"]), shuffle=True, collate_fn=DataCollatorWithPadding(tokenizer),
                            generator=torch.Generator().manual_seed(derive_seed(seed, info.name, "multitask")))
        batches[info.name] = endless(loader)
    # the shared body's parameters once, not once per head: one update (and one clipping norm) per step
    parameters = list({id(p): p for m in models.values() for p in m.parameters()}.values())
    optimizer = RecipeOptimizer.build(parameters, recipe, steps)
    device = pick_device(str(recipe["device"]))
    for model in models.values():
        model.to(device).train()
    # each step trains one dataset drawn uniformly at random, as ColD Fusion samples datasets
    rng, datasets = random.Random(seed), sorted(models)
    names = [rng.choice(datasets) for _ in range(steps)]
    torch.manual_seed(seed)  # dropout masks
    start = time.perf_counter()
    drawn = ((models[name], next(batches[name])) for name in names)
    losses = (loss for _, loss in train_steps(drawn, optimizer, device))
    for step, (name, loss) in enumerate(zip(names, losses), start=1):
        if step % 100 == 0 or step == steps:
            console.print(f"multitask step {step}/{steps} ({time.perf_counter() - start:.0f}s): {name} loss {loss.item():.3f}")
    save_fused_model(path, body_state(next(iter(models.values()))), out_dir)
    return {name: names.count(name) for name in models}  # steps per dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coldfusion-multitask", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the trained body (a Hugging Face model)")
    parser.add_argument("--steps", type=int, default=None, help="total steps (default: the ColD Fusion run's budget)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=realdata rounds=5")
    args = parser.parse_args(argv)
    try:
        cfg = compose_config("", args.overrides)
        steps = args.steps or contributor_steps(cfg)
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        if args.out.exists() and any(args.out.iterdir()):
            raise ConfigError(f"--out {args.out} is not empty: choose a new folder")
        counts = train_multitask(cfg, args.out, steps)
    except (ConfigError, TaskDataError, ModelLoadError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    console.print(f"multitask body saved to {args.out} after {steps} steps: {counts}")
    console.print(f"evaluate it: coldfusion-sim rounds=0 model.name_or_path={args.out.resolve()} {' '.join(args.overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
