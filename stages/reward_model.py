"""Stage `reward_model`: train the tiny shapes-world CLIP that the CLIP scorers load by default.

It trains on the shapes-world prompts and holds out the eval combinations of `prompts`, whatever
`prompts.train_file` sets for the rest of the pipeline.
"""

import logging

from pgdpo.config import Params
from pgdpo.io import atomic_dir, write_json
from pgdpo.paths import METRICS, REWARD_MODEL
from pgdpo.reward import RewardModelConfig, train_reward_model
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker
from pgdpo.world import split_prompts

logger = logging.getLogger(__name__)


def run(params: Params, tracker: Tracker) -> None:
    section = params.reward_model
    cfg = RewardModelConfig(
        steps=section.steps,
        batch_size=section.batch_size,
        lr=section.lr,
        weight_decay=section.weight_decay,
        warmup_steps=section.warmup_steps,
        clips_per_prompt=section.clips_per_prompt,
        eval_clips_per_prompt=section.eval_clips_per_prompt,
        num_frames=params.world.num_frames,
        height=params.world.height,
        width=params.world.width,
        seed=section.seed,
    )

    def log_step(metrics: dict[str, float], step: int) -> None:
        tracker.log_metrics({f"reward_model/{key}": value for key, value in metrics.items()}, step=step)

    train, held_out = split_prompts(params.prompts.num_eval_combos, params.prompts.seed)
    with atomic_dir(REWARD_MODEL) as tmp:
        metrics = train_reward_model(train, held_out, cfg, tmp, on_metrics=log_step)
    write_json(METRICS / "reward_model.json", {"retrieval": metrics})
    tracker.log_metrics({f"reward_model/retrieval/{key}": value for key, value in metrics.items()})
    tracker.log_artifact(REWARD_MODEL, "reward_model")


if __name__ == "__main__":
    stage_main("reward_model", run, ["world", "prompts", "reward_model"])
