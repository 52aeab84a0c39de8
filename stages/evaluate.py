"""Stage `evaluate`: the trained adapter samples the eval prompts from the seeds `evaluate_base`
used, and both are compared per dimension with bootstrap intervals."""

import logging

from pgdpo.config import Params
from pgdpo.evaluation import contact_sheet, markdown_table, sample_and_score, summarise
from pgdpo.io import atomic_write_text, read_prompts, read_table, write_json
from pgdpo.models import load_base
from pgdpo.paths import ADAPTER, EVAL_BASE, EVAL_PROMPTS, EVAL_TRAINED, METRICS, REPORTS
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker

logger = logging.getLogger(__name__)


def run(params: Params, tracker: Tracker) -> None:
    cfg = params.evaluate
    adapter = load_base(params)
    adapter.pipe.load_lora_weights(str(ADAPTER))
    trained_manifest, trained_table = sample_and_score(
        adapter, read_prompts(EVAL_PROMPTS), cfg, EVAL_TRAINED, params.score.weights, "trained"
    )
    manifests = {"base": read_table(EVAL_BASE / "manifest.csv"), "trained": trained_manifest}
    tables = {"base": read_table(EVAL_BASE / "scores.csv"), "trained": trained_table}
    roots = {"base": EVAL_BASE, "trained": EVAL_TRAINED}
    if manifests["base"]["seed"].tolist() != trained_manifest["seed"].tolist():
        raise ValueError(f"{EVAL_BASE} was sampled with other seeds or prompts; run `dvc repro evaluate_base`")

    summary = summarise(tables, seed=cfg.seed)
    write_json(METRICS / "eval.json", summary)
    sheet = REPORTS / "contact_sheet.png"
    contact_sheet(manifests, roots, cfg.sheet_prompts, sheet)
    report = "# Evaluation: base vs trained\n\nMean over clips; deltas with 95% bootstrap intervals.\n\n"
    atomic_write_text(REPORTS / "eval.md", report + markdown_table(summary) + "\n![contact sheet](contact_sheet.png)\n")

    for model, block in summary.items():
        tracker.log_metrics({f"eval/{model}/{dim}": entry["mean"] for dim, entry in block.items()})
    tracker.log_artifact(sheet)
    tracker.log_artifact(REPORTS / "eval.md")
    for model, root in roots.items():
        tracker.log_artifact(root / "videos", f"videos/{model}")


if __name__ == "__main__":
    stage_main("evaluate", run, ["runtime", "base", "score", "evaluate"])
