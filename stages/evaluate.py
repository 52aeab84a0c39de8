"""Stage `evaluate`: the trained adapter samples the eval prompts from the seeds `evaluate_base`
used, and both are compared per dimension with bootstrap intervals."""

import logging

from pgdpo.config import Params
from pgdpo.evaluation import (
    add_omni_total,
    contact_sheet,
    dimension_plot_table,
    markdown_table,
    sample_and_score,
    summarise,
)
from pgdpo.generation import ModelSource
from pgdpo.io import atomic_write_text, read_table, write_json, write_table
from pgdpo.paths import ADAPTER, EVAL_BASE, EVAL_TRAINED, METRICS, PLOTS, REPORTS
from pgdpo.scoring.clip import resource_options
from pgdpo.sharding import ClusterSpec
from pgdpo.stage import stage_main
from pgdpo.suites import load_eval_prompts
from pgdpo.tracking import Tracker

logger = logging.getLogger(__name__)


def run(params: Params, tracker: Tracker) -> None:
    cfg = params.evaluate
    scoring = params.scoring
    trained_manifest, trained_table = sample_and_score(
        ModelSource.from_params(params, lora=ADAPTER), load_eval_prompts(cfg.prompt_suite, cfg.suite_dimensions), cfg,
        EVAL_TRAINED, params.score.weights, "trained", dimensions=scoring.dimensions,
        resource_options=resource_options(scoring), cluster=ClusterSpec.from_section(cfg),
    )
    manifests = {"base": read_table(EVAL_BASE / "manifest.csv"), "trained": trained_manifest}
    tables = {"base": read_table(EVAL_BASE / "scores.csv"), "trained": trained_table}
    roots = {"base": EVAL_BASE, "trained": EVAL_TRAINED}
    base_clips = manifests["base"][["prompt", "seed"]].values.tolist()
    if base_clips != trained_manifest[["prompt", "seed"]].values.tolist():
        raise ValueError(f"{EVAL_BASE} was sampled with other seeds or prompts; run `dvc repro evaluate_base`")

    add_omni_total(tables, scoring.dimensions, scoring.quality_weight, scoring.semantic_weight)
    summary = summarise(tables, seed=cfg.seed, dimensions=scoring.dimensions)
    write_json(METRICS / "eval.json", summary)
    write_table(dimension_plot_table(summary), PLOTS / "eval_dimensions.tsv")
    sheet = REPORTS / "contact_sheet.png"
    contact_sheet(manifests, roots, cfg.sheet_prompts, sheet)
    report = "# Evaluation: base vs trained\n\nMean over clips; deltas with 95% bootstrap intervals.\n\n"
    atomic_write_text(REPORTS / "eval.md", report + markdown_table(summary) + "\n![contact sheet](contact_sheet.png)\n")

    for model, block in summary.items():
        tracker.log_metrics({f"eval/{model}/{dim}": entry["mean"] for dim, entry in block.items()})
    tracker.log_artifact(sheet)
    tracker.log_artifact(REPORTS / "eval.md")
    for model, root in roots.items():
        tracker.log_clips(manifests[model], root, f"videos/{model}", params.tracking.max_logged_clips)


if __name__ == "__main__":
    stage_main("evaluate", run, ["runtime", "base", "score", "scoring", "evaluate"])
