"""Stage `evaluate_base`: the base model samples and scores the eval prompts.

Kept apart from `evaluate` so that experiments which only change training reuse these clips
from the DVC cache.
"""

from pgdpo.config import Params
from pgdpo.evaluation import sample_and_score
from pgdpo.generation import ModelSource
from pgdpo.paths import EVAL_BASE
from pgdpo.scoring.clip import resource_options
from pgdpo.scoring.table import TOTAL
from pgdpo.sharding import ClusterSpec
from pgdpo.stage import stage_main
from pgdpo.suites import load_eval_prompts
from pgdpo.tracking import Tracker


def run(params: Params, tracker: Tracker) -> None:
    cfg = params.evaluate
    _, table = sample_and_score(
        ModelSource.from_params(params), load_eval_prompts(cfg.prompt_suite, cfg.suite_dimensions), cfg, EVAL_BASE,
        params.score.weights, "base", dimensions=params.scoring.dimensions,
        resource_options=resource_options(params.scoring), cluster=ClusterSpec.from_section(cfg),
    )
    means = table.drop(columns=["prompt_id", "prompt", "index", "seed", "path"]).mean().to_dict()
    tracker.log_metrics({f"eval/base/{name}": value for name, value in means.items()})
    tracker.log_metrics({"eval/base/clips": len(table), "eval/base/mean_total": float(table[TOTAL].mean())})


if __name__ == "__main__":
    stage_main("evaluate_base", run, ["runtime", "base", "score", "scoring", "evaluate"])
