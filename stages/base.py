"""Stage `base`: train the shapes-world base pipeline, or check that `base.model` loads."""

import logging

from pgdpo.config import Params
from pgdpo.io import atomic_dir, read_prompts, write_json
from pgdpo.models.shapes_base import ShapesBaseConfig, train_shapes_base
from pgdpo.paths import BASE_MODEL, TRAIN_PROMPTS
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker

logger = logging.getLogger(__name__)


def run(params: Params, tracker: Tracker) -> None:
    base = params.base
    if base.model != "shapes":
        # NOTE: an external model is not copied into data/base; later stages load base.model
        # directly, and this stage only records that choice.
        BASE_MODEL.mkdir(parents=True, exist_ok=True)
        write_json(BASE_MODEL / "external.json", {"model": base.model, "revision": base.revision})
        return

    cfg = ShapesBaseConfig(
        num_frames=params.world.num_frames,
        height=params.world.height,
        width=params.world.width,
        fps=params.world.fps,
        vae_steps=base.vae_steps,
        vae_lr=base.vae_lr,
        transformer_steps=base.transformer_steps,
        transformer_lr=base.transformer_lr,
        batch_size=base.batch_size,
        clips_per_prompt=base.clips_per_prompt,
        seed=base.seed,
    )
    with atomic_dir(BASE_MODEL) as tmp:
        train_shapes_base(read_prompts(TRAIN_PROMPTS), cfg, tmp, on_metrics=_logger(tracker))
    tracker.log_artifact(BASE_MODEL / "model_index.json", "base")


def _logger(tracker: Tracker):
    def log(prefix: str, metrics: dict, step: int) -> None:
        tracker.log_metrics({f"{prefix}/{key}": value for key, value in metrics.items()}, step=step)

    return log


if __name__ == "__main__":
    stage_main("base", run, ["world", "base"])
