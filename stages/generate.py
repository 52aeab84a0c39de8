"""Stage `generate`: K candidate clips per train prompt, as MP4 files plus a manifest."""

from pgdpo.config import Params
from pgdpo.generation import ModelSource, generate_videos
from pgdpo.io import read_prompts
from pgdpo.paths import CANDIDATES, TRAIN_PROMPTS
from pgdpo.sharding import ClusterSpec
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker


def run(params: Params, tracker: Tracker) -> None:
    cfg = params.generate
    manifest = generate_videos(
        ModelSource.from_params(params),
        read_prompts(TRAIN_PROMPTS),
        num_per_prompt=cfg.num_candidates,
        base_seed=cfg.seed,
        out_dir=CANDIDATES,
        num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale,
        batch_size=cfg.batch_size,
        cluster=ClusterSpec.from_section(cfg),
    )
    tracker.log_metrics({"generate/videos": len(manifest)})
    tracker.log_artifact(CANDIDATES / "manifest.csv", "candidates")
    tracker.log_dataset(TRAIN_PROMPTS, "prompts")


if __name__ == "__main__":
    stage_main("generate", run, ["runtime", "base", "generate"])
