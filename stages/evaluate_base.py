"""Stage `evaluate_base`: the base model samples and scores the eval prompts.

Kept apart from `evaluate` so that experiments which only change training reuse these clips
from the DVC cache.
"""

from pgdpo.config import Params
from pgdpo.evaluation import sample_and_score
from pgdpo.io import read_prompts
from pgdpo.models import load_base
from pgdpo.paths import EVAL_BASE, EVAL_PROMPTS
from pgdpo.scoring.table import TOTAL
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker


def run(params: Params, tracker: Tracker) -> None:
    adapter = load_base(params)
    _, table = sample_and_score(adapter, read_prompts(EVAL_PROMPTS), params.evaluate, EVAL_BASE, params.score.weights, "base")
    means = table.drop(columns=["prompt_id", "prompt", "index", "seed", "path"]).mean().to_dict()
    tracker.log_metrics({f"eval/base/{name}": value for name, value in means.items()})
    tracker.log_metrics({"eval/base/clips": len(table), "eval/base/mean_total": float(table[TOTAL].mean())})


if __name__ == "__main__":
    stage_main("evaluate_base", run, ["runtime", "base", "score", "evaluate"])
