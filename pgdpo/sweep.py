"""Read finished DVC experiments back from git and compare them.

DVC commits each experiment to a ref under `refs/exps/`, including the outputs marked
`cache: false` (metrics/*.json, plots/*.tsv), so `git show <ref>:<path>` reads them without
checking the experiment out.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

# Columns of the comparison table: (label, file, dotted key path).
COLUMNS = (
    ("probe D(x_w)", "metrics/train.json", "probe.diff_chosen"),
    ("probe D(x_l)", "metrics/train.json", "probe.diff_rejected"),
    ("probe displacement", "metrics/train.json", "probe.displacement_rate"),
    ("probe implicit acc", "metrics/train.json", "probe.implicit_acc"),
    ("eval oracle alignment", "metrics/eval.json", "trained.oracle_alignment.mean"),
    ("eval alignment - base", "metrics/eval.json", "trained.oracle_alignment.delta"),
    ("eval reward", "metrics/eval.json", "trained.total.mean"),
)


def experiment_refs(project: str | Path) -> dict[str, str]:
    """Map experiment name -> git ref for every DVC experiment in `project`."""
    out = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps/"],
        cwd=project, capture_output=True, text=True, check=True,
    ).stdout
    refs = {}
    for ref in out.split():
        name = ref.rsplit("/", 1)[-1]
        if name not in ("exec", "celery", "runs") and ref.count("/") >= 4:
            refs[name] = ref
    return refs


def show_file(project: str | Path, ref: str, path: str) -> str:
    """Return the text of `path` at git `ref`."""
    return subprocess.run(
        ["git", "show", f"{ref}:{path}"], cwd=project, capture_output=True, text=True, check=True
    ).stdout


def _lookup(data: dict, dotted: str) -> float:
    for key in dotted.split("."):
        data = data[key]
    return float(data)


def collect_experiments(project: str | Path, names: list[str]) -> list[dict]:
    """Return one record per experiment: name, params overrides of interest, metrics and probe log."""
    refs = experiment_refs(project)
    missing = [name for name in names if name not in refs]
    if missing:
        raise ValueError(f"experiments {missing} not found under refs/exps; did they run? (`dvc exp show`)")
    records = []
    for name in names:
        ref = refs[name]
        params = yaml.safe_load(show_file(project, ref, "params.yaml"))
        files = {path: json.loads(show_file(project, ref, path)) for path in {c[1] for c in COLUMNS}}
        probe = pd.read_csv(io.StringIO(show_file(project, ref, "plots/probe.tsv")), sep="\t")
        records.append({
            "name": name,
            "method": params["train"]["method"],
            "seed": params["train"]["seed"],
            "loss": params["train"].get("loss", {}),
            "metrics": {label: _lookup(files[path], key) for label, path, key in COLUMNS},
            "probe": probe.to_dict("list"),
        })
    return records


def comparison_markdown(records: list[dict]) -> str:
    """Markdown table: one row per experiment, then mean and std per method over seeds."""
    labels = [label for label, _, _ in COLUMNS]
    lines = ["| experiment | method | seed | " + " | ".join(labels) + " |", "|" + "---|" * (3 + len(labels))]
    for record in records:
        cells = [f"{record['metrics'][label]:.4g}" for label in labels]
        lines.append(f"| {record['name']} | {record['method']} | {record['seed']} | " + " | ".join(cells) + " |")

    lines += ["", "| method | runs | " + " | ".join(labels) + " |", "|" + "---|" * (2 + len(labels))]
    for method in dict.fromkeys(r["method"] for r in records):
        group = [r for r in records if r["method"] == method]
        cells = []
        for label in labels:
            values = np.array([r["metrics"][label] for r in group])
            cells.append(f"{values.mean():.4g} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.2g}")
        lines.append(f"| {method} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_probe_trajectories(records: list[dict], out_file: Path, column: str = "diff_chosen") -> None:
    """Plot the held-out probe's `column` per step: one line per run, coloured by method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(record["method"] for record in records))
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for record in records:
        label = record["method"] if record is next(r for r in records if r["method"] == record["method"]) else None
        axis.plot(record["probe"]["step"], record["probe"][column], color=colours[record["method"]], alpha=0.8, label=label)
    axis.axhline(0.0, color="grey", linewidth=0.8)
    axis.set_xlabel("training step")
    axis.set_ylabel(f"held-out {column} (policy - reference error)")
    axis.legend()
    figure.tight_layout()
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_file, dpi=120)
    plt.close(figure)
