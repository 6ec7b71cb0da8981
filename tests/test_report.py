"""Per-run report, plots and model card, on a small hand-made run directory (no Flower, no model)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from app.report import PNG_MAGIC, main, saved_model_record, write_model_card, write_report
from strategies.records import read_records

ROLES = {"sst2": "contributing", "stsb": "contributing", "rte": "heldout", "wnli": "heldout"}
REGRESSION = {"stsb"}
# Primary scores per round (probe every round; finetune at rounds 0 and 2 only, its own sparser schedule).
PROBE = {0: {"sst2": 0.60, "stsb": 0.30, "rte": 0.50, "wnli": 0.40},
         1: {"sst2": 0.70, "stsb": 0.35, "rte": 0.52, "wnli": 0.44},
         2: {"sst2": 0.75, "stsb": 0.40, "rte": 0.55, "wnli": 0.47}}
FINETUNE = {0: {"sst2": 0.80, "stsb": 0.70, "rte": 0.60, "wnli": 0.50},
            2: {"sst2": 0.82, "stsb": 0.75, "rte": 0.58, "wnli": 0.49}}


def _mean(scores: dict[str, float], role: str) -> float | None:
    """The server's rule: classification tasks of the role only."""
    values = [v for t, v in scores.items() if ROLES[t] == role and t not in REGRESSION]
    return sum(values) / len(values) if values else None


def _scores(primary: dict[str, float], finetune: bool) -> dict[str, dict[str, float]]:
    out = {}
    for task, value in primary.items():
        metrics = ({"pearson": value, "spearman": value - 0.01} if task in REGRESSION
                   else {"accuracy": value, "macro_f1": value - 0.02})
        if finetune:
            metrics |= {"steps": 30, "train_examples": 200, "stopped_early": 0}
        out[task] = metrics
    return out


def _record(n: int, probe: dict, finetune: dict, contributors: list[str], few_shot: int | None = None) -> dict:
    return {
        "round": n, "contributors": contributors,
        "train_loss": {t: 0.5 for t in contributors}, "train_examples": {t: 200 for t in contributors},
        "failures": [], "rejections": [], "update_norms": {t: 1.0 for t in contributors},
        "fused": bool(contributors), "rolled_back": False, "roles": ROLES,
        "probe": probe, "probe_contributing": _mean(probe, "contributing") if probe else None,
        "probe_heldout": _mean(probe, "heldout") if probe else None,
        "finetune": finetune, "finetune_contributing": _mean(finetune, "contributing") if finetune else None,
        "finetune_heldout": _mean(finetune, "heldout") if finetune else None,
        "scores": {"probe": _scores(probe, False), "finetune": _scores(finetune, True)},
        "few_shot": few_shot, "seconds_train": 1.0, "seconds_eval": 2.0,
    }


def _write_run(path: Path, records: list[dict], name_or_path: str = "FacebookAI/roberta-base",
               missing: list | None = None) -> Path:
    path.mkdir(parents=True)
    cfg = OmegaConf.create({
        "model": {"name_or_path": name_or_path},
        "rounds": 2, "contributors_per_round": 2, "seed": 0,
        "client": {"lr": 5e-5, "batch_size": 16, "max_steps": 60, "epochs": None, "head_policy": "reinit"},
        "eval": {"probe": {"every": 1, "C": 1.0}, "finetune": {"every": 2, "max_steps": 30}},
        "tasks": {"kind": "catalog", "contributing": ["sst2", "stsb"], "heldout": ["rte", "wnli"]},
    })
    OmegaConf.save(cfg, path / "config.yaml")
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if missing is not None:
        (path / "pool.json").write_text(json.dumps({"missing": missing}))
    (path / "model").mkdir()
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    records = [_record(0, PROBE[0], FINETUNE[0], []), _record(1, PROBE[1], {}, ["sst2", "stsb"]),
               _record(2, PROBE[2], FINETUNE[2], ["stsb", "sst2"])]
    missing = [{"name": "mnli", "role": "contributing", "reason": "not found under data_root"}]
    return _write_run(tmp_path / "run", records, missing=missing)


@pytest.fixture
def baseline_dir(tmp_path) -> Path:
    """A multitask model evaluated with rounds=0: its scores are its round 0."""
    probe = {"sst2": 0.72, "stsb": 0.38, "rte": 0.49, "wnli": 0.45}
    finetune = {"sst2": 0.81, "stsb": 0.74, "rte": 0.59, "wnli": 0.52}
    return _write_run(tmp_path / "multitask", [_record(0, probe, finetune, [], few_shot=100)])


def _row(markdown: str, first_cell: str) -> list[str]:
    """Cells of every table row starting with ``first_cell`` (one per view)."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows]


def _jsonl(run: Path) -> list[dict]:
    """The run's records, read straight from metrics.jsonl: the oracles below recompute from this."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _oracle_means(records: list[dict], view: str) -> dict[str, list[tuple[int, float]]]:
    """Per role, (round, mean primary score x 100) of the rounds that scored ``view``: classification tasks only
    (a regression task is one scored by Pearson r), recomputed from the per-task scores."""
    out: dict[str, list[tuple[int, float]]] = {"contributing": [], "heldout": []}
    for r in records:
        regression = {t for t, m in r["scores"][view].items() if "pearson" in m}
        for role, series in out.items():
            values = [v for t, v in r[view].items() if r["roles"][t] == role and t not in regression]
            if values:
                series.append((r["round"], 100 * sum(values) / len(values)))
    return out


def test_csv_has_every_metric_in_long_format(run_dir, baseline_dir):
    report = write_report(run_dir, {"multitask": baseline_dir})
    assert report == run_dir / "report" / "report.md"
    with open(run_dir / "report" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["round", "view", "task", "role", "metric", "value"]
    # oracle: every (round, view, task, metric) value of metrics.jsonl, with the task's role, and nothing else
    oracle = {(r["round"], view, task, metric): (r["roles"][task], value) for r in _jsonl(run_dir)
              for view, tasks in r["scores"].items() for task, metrics in tasks.items()
              for metric, value in metrics.items()}
    got = {(int(r["round"]), r["view"], r["task"], r["metric"]): (r["role"], float(r["value"])) for r in rows}
    # probe: 3 rounds x 4 tasks x 2 metrics; finetune: rounds 0, 2 x 4 tasks x (2 metrics + 3 counts); no row twice
    assert len(got) == len(rows) == len(oracle) == 3 * 4 * 2 + 2 * 4 * 5
    assert got.keys() == oracle.keys()
    for key, (role, value) in oracle.items():
        assert got[key][0] == role and got[key][1] == pytest.approx(value, abs=1e-12), key


@pytest.fixture
def figures(monkeypatch) -> dict[str, object]:
    """File name -> the matplotlib Figure saved to it, so that a test reads back what a plot drew."""
    figures, save = {}, Figure.savefig

    def saving(fig, path, *args, **kwargs):
        figures[Path(path).name] = fig
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", saving)
    return figures


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (the first one, after the 8-byte signature)."""
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_are_pngs_of_the_figures_and_views_vs_rounds_draws_the_means(run_dir, baseline_dir, figures):
    write_report(run_dir, {"multitask": baseline_dir})
    assert set(figures) == {"views_vs_rounds.png", "seen_unseen.png", "task_gain.png"}
    for name, fig in figures.items():  # the file is that figure, rendered at the report's 110 dpi
        width, height = (round(110 * x) for x in fig.get_size_inches())
        assert _png_size((run_dir / "report" / name).read_bytes()) == (width, height), name
        assert len(fig.axes) == 2, name  # one panel per view that ran: probe and finetune
    # views vs rounds: each role's mean per round, and the baseline's final means as flat lines
    records, baseline = _jsonl(run_dir), _jsonl(baseline_dir)
    for ax, view in zip(figures["views_vs_rounds.png"].axes, ("probe", "finetune")):
        lines = {line.get_label(): line.get_xydata().tolist() for line in ax.lines}
        oracle, base = _oracle_means(records, view), _oracle_means(baseline, view)
        assert set(lines) == {"ColD Fusion, seen", "ColD Fusion, unseen", "multitask, seen", "multitask, unseen"}
        for role, word in (("contributing", "seen"), ("heldout", "unseen")):
            np.testing.assert_allclose(lines[f"ColD Fusion, {word}"], oracle[role], err_msg=f"{view} {role}")
            assert [y for _, y in lines[f"multitask, {word}"]] == pytest.approx([base[role][-1][1]] * 2), (view, role)


def test_seen_unseen_bars_are_the_start_and_final_means(run_dir, figures):
    """The hand-made records have no dev scores, so no "best" bar: exactly a start and a final bar per role."""
    write_report(run_dir)
    records = _jsonl(run_dir)
    for ax, view in zip(figures["seen_unseen.png"].axes, ("probe", "finetune")):
        oracle = _oracle_means(records, view)
        expected = sorted((f"{y:.1f}\nr{n}", y) for role in ("contributing", "heldout")
                          for n, y in (oracle[role][0], oracle[role][-1]))  # start (round 0), final (round 2)
        bars = sorted(zip((t.get_text() for t in ax.texts), (p.get_height() for p in ax.patches)))
        assert [b[0] for b in bars] == [e[0] for e in expected], view
        assert [b[1] for b in bars] == pytest.approx([e[1] for e in expected]), view


def test_task_gain_bars_are_each_tasks_final_minus_start(run_dir, figures):
    write_report(run_dir)
    first, last = _jsonl(run_dir)[0], _jsonl(run_dir)[-1]
    for ax, view in zip(figures["task_gain.png"].axes, ("probe", "finetune")):
        labels = [t.get_text().removesuffix(" (r)") for t in ax.get_yticklabels()]
        gains = dict(zip(labels, (p.get_width() for p in ax.patches)))
        assert gains == pytest.approx({t: 100 * (last[view][t] - first[view][t]) for t in first[view]}), view
        assert [gains[t] for t in labels] == sorted(gains.values())  # drawn in order of gain


def test_report_tables_are_the_numbers_of_metrics_jsonl(run_dir):
    """Every number of the per-round and per-task tables, recomputed from metrics.jsonl."""
    text = write_report(run_dir).read_text()
    records = _jsonl(run_dir)
    cell = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    means = {view: {role: dict(series) for role, series in _oracle_means(records, view).items()}
             for view in ("probe", "finetune")}
    for r in records:  # round, contributors, probe seen/unseen, mean-pool seen/unseen, finetune seen/unseen, ...
        row = _row(text, str(r["round"]))[0]
        assert row[1] == str(len(r["contributors"]))
        assert row[2:4] == [cell(means["probe"][role].get(r["round"])) for role in ("contributing", "heldout")]
        assert row[6:8] == [cell(means["finetune"][role].get(r["round"])) for role in ("contributing", "heldout")]
    first, last = records[0], records[-1]
    for task in first["roles"]:  # the probe's table first, then the finetune's
        for row, view in zip(_row(text, task), ("probe", "finetune"), strict=True):
            start, final = 100 * first[view][task], 100 * last[view][task]
            assert row[3:6] == [f"{start:.1f}", f"{final:.1f}", f"{final - start:+.1f}"], (task, view)


def test_report_states_gains_baselines_and_verdicts(run_dir, baseline_dir, tmp_path):
    out = tmp_path / "elsewhere"
    text = write_report(run_dir, {"multitask": baseline_dir}, out_dir=out).read_text()
    assert not (run_dir / "report").exists()
    # per-task table, probe then finetune: task, role, metric, start, final, gain, multitask
    assert _row(text, "sst2") == [["sst2", "seen", "accuracy", "60.0", "75.0", "+15.0", "72.0"],
                                  ["sst2", "seen", "accuracy", "80.0", "82.0", "+2.0", "81.0"]]
    assert _row(text, "stsb")[0] == ["stsb", "seen", "pearson", "30.0", "40.0", "+10.0", "38.0"]
    assert _row(text, "rte")[1] == ["rte", "unseen", "accuracy", "60.0", "58.0", "-2.0", "59.0"]
    # means over classification tasks only (stsb left out): probe unseen 45.0 -> 51.0, baseline (49+45)/2
    assert _row(text, "**mean unseen**")[0] == ["**mean unseen**", "unseen", "accuracy", "45.0", "51.0", "+6.0",
                                                "47.0"]
    assert _row(text, "**mean seen**")[0][3:7] == ["60.0", "75.0", "+15.0", "72.0"]
    assert "| task | role | metric | start | final | gain | multitask |" in text
    assert "Improved over the start model: 4 of 4 tasks (seen 2 of 2, unseen 2 of 2)." in text
    assert "Improved over the start model: 2 of 4 tasks (seen 2 of 2, unseen 0 of 2)." in text
    assert ("Linear probe, first token (ColD-Frozen): the fused model beats the start model on held-out datasets by +6.0 points"
            in text)
    assert ("Full finetune (ColD): the fused model does not beat the start model on held-out datasets "
            "(-1.5 points" in text)
    # per-round table: finetune columns empty at round 1, filled at rounds 0 and 2
    # (columns: probe seen/unseen, mean-pool probe seen/unseen, finetune seen/unseen; this run has no mean-pool)
    assert _row(text, "1") == [["1", "2", "70.0", "48.0", "-", "-", "-", "-", "-", ""]]  # bytes not recorded: "-"
    assert _row(text, "2")[0][:8] == ["2", "2", "75.0", "51.0", "-", "-", "82.0", "53.5"]
    # run facts and embedded plots
    assert "mnli (contributing: not found under data_root)" in text
    assert "Seen (contributing) datasets (2): sst2, stsb" in text
    assert "lr=5e-05, batch_size=16, max_steps=60, epochs=none, head_policy=reinit" in text
    for name in ("views_vs_rounds.png", "seen_unseen.png", "task_gain.png"):
        assert f"]({name})" in text and (out / name).exists()


def test_report_of_a_run_with_only_round_zero_has_no_gain_plot_and_no_verdict(baseline_dir, tmp_path):
    text = write_report(baseline_dir, out_dir=tmp_path / "r").read_text()
    assert not (tmp_path / "r" / "task_gain.png").exists() and "task_gain.png" not in text
    assert "Linear probe, first token (ColD-Frozen): not evaluated at round 0 and at a later round" in text
    assert _row(text, "sst2")[0][3:6] == ["72.0", "72.0", "+0.0"]
    assert "Few-shot: held-out datasets evaluated with k=100 training examples" in text


def _card_header(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "no YAML header"
    return yaml.safe_load(match.group(1))


def test_model_card_has_hub_header_and_measured_scores(run_dir):
    config = OmegaConf.load(run_dir / "config.yaml")  # a DictConfig, as the ServerApp holds it
    records = read_records(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    card = write_model_card(run_dir / "model", config, records, [{"name": "mnli", "role": "contributing",
                                                                  "reason": "absent"}])
    assert card == run_dir / "model" / "README.md"
    text = card.read_text()
    meta = _card_header(text)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "FacebookAI/roberta-base"
    assert meta["datasets"] == ["sst2", "stsb", "rte", "wnli"]
    assert meta["pipeline_tag"] == "feature-extraction"
    assert {"coldfusion", "federated-learning", "flower", "text-classification"} <= set(meta["tags"])
    values = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]
              if r["task"]["name"].startswith("Linear probe")}
    assert values == {"seen datasets (contributing)": 75.0, "unseen datasets (heldout)": 51.0}
    body = text.split("---\n", 2)[2]
    assert "| Linear probe, first token (ColD-Frozen) | unseen | 45.0 | 51.0 | 2 | +6.0 |" in body
    assert "| Full finetune (ColD) | unseen | 55.0 | 53.5 | 2 | -1.5 |" in body
    assert "no task heads" in body and "Rounds done: 2" in body and "mnli (contributing: absent)" in body
    assert f'AutoModel.from_pretrained("{run_dir / "model"}")' in body
    assert "this run's own train/test splits" in body


def test_model_card_omits_base_model_for_the_tiny_alias(tmp_path):
    records = read_records([_record(0, PROBE[0], {}, [])])
    text = write_model_card(tmp_path / "m", {"model": {"name_or_path": "tiny"}}, records).read_text()
    meta = _card_header(text)
    assert "base_model" not in meta
    assert "not a Hugging Face Hub model" in text


def test_cli_writes_report_and_card(run_dir, baseline_dir, capsys):
    assert main([str(run_dir), "--baseline", f"multitask={baseline_dir}"]) == 0
    printed = capsys.readouterr().out
    assert str(run_dir / "report" / "report.md") in printed
    assert (run_dir / "model" / "README.md").exists()
    assert "multitask" in (run_dir / "report" / "report.md").read_text()


def test_cli_leaves_the_model_alone_when_asked(run_dir):
    assert main([str(run_dir), "--no-model-card"]) == 0
    assert not (run_dir / "model" / "README.md").exists()


@pytest.mark.parametrize("content", [None, "{not json\n", "", "[1, 2]\n"])
def test_cli_missing_or_corrupt_metrics_exit_2(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main([str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / "metrics.jsonl") in err and "Traceback" not in err
    assert not (run / "report").exists() or not any((run / "report").iterdir())


@pytest.mark.parametrize("spec", ["nonsense", "=somewhere", "name="])
def test_cli_bad_baseline_spec_exit_2(run_dir, capsys, spec):
    assert main([str(run_dir), "--baseline", spec]) == 2
    err = capsys.readouterr().err
    assert f"--baseline {spec!r}" in err and "NAME=RUN_DIR" in err and "Traceback" not in err


def test_cli_baseline_without_metrics_exit_2(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(run_dir), "--baseline", f"fused={empty}"]) == 2
    err = capsys.readouterr().err
    assert "baseline 'fused'" in err and str(empty / "metrics.jsonl") in err


def test_final_figures_describe_the_saved_model_when_the_last_round_was_rolled_back(tmp_path):
    """Round 2 was rolled back: the saved model is round 1's base. Its probe scores are round 1's; the finetune
    view scored round 0 and the undone round-2 base only, so it has no final score for the saved model."""
    rolled = _record(2, {"sst2": 0.10, "stsb": 0.10, "rte": 0.10, "wnli": 0.10},
                     {"sst2": 0.20, "stsb": 0.20, "rte": 0.20, "wnli": 0.20}, ["stsb", "sst2"])
    rolled.update(rolled_back=True, base_round=1)
    records = [_record(0, PROBE[0], FINETUNE[0], []) | {"base_round": 0},
               _record(1, PROBE[1], {}, ["sst2", "stsb"]) | {"base_round": 1}, rolled]
    run = _write_run(tmp_path / "run", records)
    text = write_report(run).read_text()
    # probe: start 60/45 (seen/unseen) -> final = round 1 (70/48), never the rolled-back 10
    assert "start (round 0) vs final (round 1, the saved model)" in text
    assert _row(text, "**mean unseen**")[0][3:6] == ["45.0", "48.0", "+3.0"]
    assert "+6.0" not in text.split("## Per task")[1].split("###")[1]  # round 2's figures are not "final"
    assert "final n/a (no round scored the saved model in this view)" in text
    assert "Full finetune (ColD): n/a: no round scored the saved model" in text
    assert "The saved model is the base produced in round 1" in text
    card = write_model_card(run / "model", OmegaConf.load(run / "config.yaml"), read_records(records)).read_text()
    meta = _card_header(card)
    values = {(r["task"]["name"], r["dataset"]["name"]): r["metrics"][0] for r in meta["model-index"][0]["results"]}
    assert values[("Linear probe, first token (ColD-Frozen)", "unseen datasets (heldout)")]["value"] == 48.0
    assert "round 1" in values[("Linear probe, first token (ColD-Frozen)", "unseen datasets (heldout)")]["name"]
    assert not any(name.startswith("Full finetune") for name, _ in values)
    assert "| Full finetune (ColD) | unseen | 55.0 | n/a (saved model not scored) | - | - |" in card


def test_older_records_without_base_round_derive_it():
    records = read_records([{"round": 0, "fused": False}, {"round": 1, "fused": True},
                            {"round": 2, "fused": True, "rolled_back": True, "probe": {"a": 1.0}},
                            {"round": 3, "fused": False, "probe": {"a": 0.5}}])
    assert [r.base_round for r in records] == [0, 1, 1, 1]
    assert saved_model_record(records, "probe").round == 3  # round 3 did not fuse: it scored round 1's base
    assert saved_model_record(records[:3], "probe") is None  # only the undone base was scored


COMMITTED_RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "realdata-poolings"


def test_the_committed_benchmark_run_loads_and_reports_the_same_heldout_means(tmp_path):
    """The committed real-data run (version-1 records, upgraded on reading) goes through coldfusion-report;
    its per-round held-out first-token probe means equal the means of the committed metrics.csv's per-task
    accuracies (regression tasks, scored by Pearson r, left out), an oracle computed here from scratch."""
    run = shutil.copytree(COMMITTED_RUN, tmp_path / "realdata-poolings")
    assert main([str(run)]) == 0
    text = (run / "report" / "report.md").read_text()
    with open(COMMITTED_RUN / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    regression = {r["task"] for r in rows if r["metric"] == "pearson"}
    accuracies: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if (r["view"], r["role"], r["metric"]) == ("probe", "heldout", "accuracy") and r["task"] not in regression:
            accuracies[int(r["round"])].append(float(r["value"]))
    oracle = {n: 100 * sum(v) / len(v) for n, v in accuracies.items()}
    assert regression == {"stsb"} and sorted(oracle) == [0, 1, 2, 3, 4, 5]
    assert len(accuracies[0]) == 6  # the seven held-out datasets less stsb
    assert round(oracle[0], 1) != round(oracle[5], 1)  # the check tells rounds apart
    for n, mean in oracle.items():  # per-round table: round, contributors, probe seen, probe unseen, ...
        assert _row(text, str(n))[0][3] == f"{mean:.1f}", n
    # the first-token per-task section: its unseen mean at round 0 and at the saved model (round 5)
    assert "Linear probe, first token (ColD-Frozen): start (round 0) vs final (round 5, the saved model)" in text
    assert _row(text, "**mean unseen**")[0][3:5] == [f"{oracle[0]:.1f}", f"{oracle[5]:.1f}"]
    assert "Regression datasets (Pearson r, left out of the means): stsb" in text
    # and the long CSV made from the records now is the one committed with them
    assert (run / "report" / "metrics.csv").read_text() == (COMMITTED_RUN / "metrics.csv").read_text()
