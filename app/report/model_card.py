"""The fused model's card (``model/README.md``): Hugging Face Hub metadata, what the model is and what the run measured."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from app.report.aggregate import ROLES, VIEWS, evaluated, regression_tasks, summarise_series, task_roles
from app.report.markdown import (
    backtrack_lines,
    eval_text,
    fusion_text,
    gain_text,
    md_table,
    pool_lines,
    recipe_text,
)
from app.report.runs import cfg_get
from app.report.table import pct
from strategies.records import RoundRecord

# Names of conf/model/*.yaml that are not Hugging Face ids: the Hub id they stand for, or None (no hub model).
MODEL_ALIASES: dict[str, str | None] = {"tiny": None, "minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def base_model_id(name: Any) -> str | None:
    """A Hub id or path for the model card's ``base_model``; project aliases map to their Hub id or to nothing."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        return None
    return MODEL_ALIASES.get(name, name) if name in MODEL_ALIASES else name


def model_card(model_dir: str | Path, config: Mapping[str, Any], records: Sequence[RoundRecord],
               missing: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The README.md text of the fused model: Hub metadata header, then what it is and what was measured."""
    roles, regression = task_roles(records), regression_tasks(records)
    name = cfg_get(config, "model.name_or_path")
    base = base_model_id(name)
    done = records[-1].round if records else 0
    ordered = [t for role in ROLES for t in sorted(t for t, r in roles.items() if r == role)]
    results, score_rows = [], []
    for view, label in VIEWS.items():
        for role, word in ROLES.items():
            points = summarise_series(records, view, role)
            start, final = points["start"], points["final"]
            if final is None:
                if evaluated(records, view) and start is not None:  # scored, but never the saved model
                    score_rows.append([label, word, pct(start[1]), "n/a (saved model not scored)", "-", "-"])
                continue
            change = gain_text(final[1] - start[1]) if start is not None else "-"
            score_rows.append([label, word, pct(start[1]) if start else "-", pct(final[1]), final[0], change])
            results.append({
                "task": {"type": "text-classification", "name": label},
                "dataset": {"type": "coldfusion-pool", "name": f"{word} datasets ({role})"},
                "metrics": [{"type": "accuracy", "value": round(100 * final[1], 2),
                             "name": f"mean accuracy, {word} datasets, round {final[0]}"}]})
    meta: dict[str, Any] = {"library_name": "transformers"}
    if base:
        meta["base_model"] = base
    meta |= {"tags": ["coldfusion", "federated-learning", "flower", "text-classification"],
             "pipeline_tag": "feature-extraction", "datasets": ordered}
    if results:
        meta["model-index"] = [{"name": f"coldfusion-{Path(str(base or name or 'model')).name}", "results": results}]
    origin = f"`{name}`" + (f" (Hub: `{base}`)" if base and base != name else "")
    if base is None:
        origin += " (a project alias, not a Hugging Face Hub model)"
    facts = [
        f"Base model: {origin}",
        (f"Rounds done: {done} (configured: {cfg_get(config, 'rounds', 'unknown')}); "
         f"contributors per round: {cfg_get(config, 'contributors_per_round', 'unknown')}"),
        *pool_lines(roles, regression, missing or []),
        f"Contributor recipe (whole model, body and head): {recipe_text(cfg_get(config, 'client'))}",
        f"Fusion of the contributed bodies: {fusion_text(records)}",
        *(f"Evaluation {line}" for line in eval_text(cfg_get(config, "eval"))),
        *backtrack_lines(config, records),
    ]
    scores = (md_table(["view", "datasets", "start (round 0)", "final", "final round", "change (points)"], score_rows)
              if score_rows else "No evaluation was recorded for this run.")
    body = f"""# ColD Fusion fused model

The shared body produced by ColD Fusion (Don-Yehiya et al., ACL 2023), run as a Flower federation: each round,
contributors finetuned the current body on their own dataset and the server averaged their bodies into this
one. It has **no task heads**: put a fresh head (or a linear probe) on it for your task.

{chr(10).join(f"- {f}" for f in facts)}

## Measured scores

Mean accuracy over the classification datasets of each group (percent; regression datasets are left out).
"Linear probe, first token (ColD-Frozen)": frozen body, fresh linear head on the first token (the paper's view).
"Linear probe, mean pooling": the same on the mean of the tokens. "Full finetune (ColD)": fresh head, whole
model finetuned. "Final" is the saved model: the latest round that scored this very body.

{scores}

These scores come from this run's own train/test splits and its own sampling of contributors; they are not
numbers from the paper.

## How to load

```python
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{Path(model_dir)}")
tokenizer = AutoTokenizer.from_pretrained("{Path(model_dir)}")
```
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body


def write_model_card(model_dir: str | Path, config: Mapping[str, Any], records: Sequence[RoundRecord],
                     missing: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write ``<model_dir>/README.md`` (Hub metadata + what the model is and what this run measured)."""
    if not isinstance(config, dict):
        config = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else dict(config)
    path = Path(model_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card(model_dir, config, records, missing), encoding="utf-8")
    return path
