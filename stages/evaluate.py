"""Stage `evaluate`: base vs trained adapter on the held-out eval prompts, from identical seeds."""

import logging

from pgdpo.config import Params
from pgdpo.evaluation import contact_sheet, markdown_table, score_model_videos, summarise
from pgdpo.generation import generate_videos
from pgdpo.io import atomic_write_text, read_prompts, write_json, write_table
from pgdpo.models import load_base
from pgdpo.paths import ADAPTER, EVAL_PROMPTS, EVAL_VIDEOS, METRICS, REPORTS
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker

logger = logging.getLogger(__name__)


def run(params: Params, tracker: Tracker) -> None:
    cfg = params.evaluate
    prompts = read_prompts(EVAL_PROMPTS)
    adapter = load_base(params)

    manifests, tables, roots = {}, {}, {}
    for model in ("base", "trained"):
        if model == "trained":
            adapter.pipe.load_lora_weights(str(ADAPTER))
        root = EVAL_VIDEOS / model
        manifests[model] = generate_videos(
            adapter, prompts, cfg.num_videos_per_prompt, cfg.seed, root,
            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
            batch_size=cfg.batch_size, desc=f"evaluate {model}",
        )
        roots[model] = root
        tables[model] = score_model_videos(manifests[model], root, params.score.weights)
        write_table(tables[model], root / "scores.csv")

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
