"""Stage `label`: chosen/rejected pairs from the scores, plus cached latents of every paired clip."""

from dataclasses import asdict

from pgdpo.config import Params
from pgdpo.io import atomic_dir, read_table, write_json, write_table
from pgdpo.models import load_base
from pgdpo.pairs import build_pairs, cache_latents
from pgdpo.paths import CANDIDATES, PAIRS, SCORES
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker


def run(params: Params, tracker: Tracker) -> None:
    cfg = params.label
    pairs, stats = build_pairs(read_table(SCORES), cfg.strategy, cfg.min_margin, cfg.num_probe_pairs, cfg.seed)
    adapter = load_base(params)
    with atomic_dir(PAIRS) as tmp:
        write_table(pairs, tmp / "pairs.csv")
        write_json(tmp / "summary.json", asdict(stats) | {"mean_margin": float(pairs["margin"].mean())})
        cache_latents(adapter, pairs, CANDIDATES, tmp / "latents.safetensors")
    tracker.log_metrics({f"label/{key}": value for key, value in asdict(stats).items()})
    tracker.log_metrics({"label/mean_margin": float(pairs["margin"].mean())})
    tracker.log_artifact(PAIRS / "pairs.csv")
    tracker.log_dataset(SCORES, "scores")


if __name__ == "__main__":
    stage_main("label", run, ["runtime", "base", "label"])
