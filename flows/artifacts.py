"""Contents of the Prefect artifacts the flows publish: evaluation report, MLflow runs, pairs summary.

The functions here only build markdown and table rows from files and the MLflow store, so they
are testable without Prefect. The flows publish them with `prefect.artifacts`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

EVAL_REPORT = Path("reports/eval.md")
PAIRS_TABLE = Path("data/pairs/pairs.csv")
PAIRS_SUMMARY = Path("data/pairs/summary.json")


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Return a markdown link to a run in the MLflow UI for an http(s) server, else the bare run id."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"[{run_id}]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})"
    return f"`{run_id}`"


def mlflow_runs_markdown(tracking_uri: str, parent_run_id: str) -> str:
    """Return a markdown table of the parent run and its stage runs: stage, run, status, DVC stage md5."""
    from mlflow.tracking import MlflowClient

    from pgdpo.tracking import STAGE_MD5_TAG, STAGE_TAG

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", order_by=["attributes.start_time ASC"]
    )
    lines = [
        f"MLflow tracking URI: `{tracking_uri}`, experiment id `{experiment_id}`.",
        "",
        "| stage | run | status | DVC stage md5 |",
        "|---|---|---|---|",
        f"| pipeline (parent) | {run_link(tracking_uri, experiment_id, parent_run_id)} | {parent.info.status} | |",
    ]
    for run in children:
        stage = run.data.tags.get(STAGE_TAG, run.info.run_name)
        md5 = run.data.tags.get(STAGE_MD5_TAG, "")
        lines.append(f"| {stage} | {run_link(tracking_uri, experiment_id, run.info.run_id)} | {run.info.status} | {md5} |")
    return "\n".join(lines) + "\n"


def pipeline_report_markdown(project: Path, tracking_uri: str, parent_run_id: str) -> str:
    """Return the evaluation report (reports/eval.md, when it exists) followed by the MLflow runs table."""
    report = project / EVAL_REPORT
    evaluation = report.read_text() if report.is_file() else f"_{EVAL_REPORT} was not written by this run._\n"
    # The contact sheet link in eval.md is relative to reports/ and does not resolve in the Prefect UI.
    sheet = project / "reports/contact_sheet.png"
    evaluation = evaluation.replace("![contact sheet](contact_sheet.png)", f"Contact sheet: `{sheet}`")
    return evaluation + "\n## MLflow runs\n\n" + mlflow_runs_markdown(tracking_uri, parent_run_id)


def pairs_summary_rows(project: Path) -> list[dict[str, Any]]:
    """Summarise data/pairs/pairs.csv per split and overall: pair and prompt counts, margin statistics.

    Returns [] when pairs.csv does not exist.
    """
    table_path = project / PAIRS_TABLE
    if not table_path.is_file():
        return []
    pairs = pd.read_csv(table_path)
    groups = [(split, group) for split, group in pairs.groupby("split", sort=True)] + [("all", pairs)]
    rows = []
    for split, group in groups:
        margin = group["margin"]
        rows.append({
            "split": split,
            "pairs": int(len(group)),
            "prompts": int(group["prompt"].nunique()),
            "margin_mean": round(float(margin.mean()), 4),
            "margin_min": round(float(margin.min()), 4),
            "margin_median": round(float(margin.median()), 4),
            "margin_max": round(float(margin.max()), 4),
        })
    return rows


def pairs_description(project: Path) -> str:
    """Describe the pairs table, with the dropped-pair counts of data/pairs/summary.json when present."""
    text = f"Preference pairs of {PAIRS_TABLE} per split (train, probe) and overall."
    summary_path = project / PAIRS_SUMMARY
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        dropped = ", ".join(f"{key}: {value}" for key, value in sorted(summary.items()) if key.startswith("dropped_"))
        if dropped:
            text += f" Dropped before pairing: {dropped}."
    return text
