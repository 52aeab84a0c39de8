"""Stage `score`: decode every candidate clip and score it with the configured scorers."""

from pgdpo.config import Params
from pgdpo.io import read_table, write_table
from pgdpo.paths import CANDIDATES, SCORES
from pgdpo.scoring.table import REPORTED_DIMENSIONS, TOTAL, score_manifest
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker


def run(params: Params, tracker: Tracker) -> None:
    manifest = read_table(CANDIDATES / "manifest.csv")
    # The extra oracle columns report how well the base follows each prompt attribute.
    extra = [name for name in REPORTED_DIMENSIONS if name not in params.score.weights]
    scores = score_manifest(manifest, CANDIDATES, params.score.weights, extra_scorers=extra)
    write_table(scores, SCORES)
    means = scores[[*params.score.weights, *extra, TOTAL]].mean().to_dict()
    tracker.log_metrics({f"score/{name}": value for name, value in means.items()})
    tracker.log_artifact(SCORES)


if __name__ == "__main__":
    stage_main("score", run, ["score"])
