"""Stage `score`: decode every candidate clip and score it with the configured scorers."""

from pgdpo.config import Params
from pgdpo.io import read_table, write_table
from pgdpo.paths import CANDIDATES, SCORES
from pgdpo.scoring.table import TOTAL, score_manifest
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker


def run(params: Params, tracker: Tracker) -> None:
    manifest = read_table(CANDIDATES / "manifest.csv")
    scores = score_manifest(manifest, CANDIDATES, params.score.weights)
    write_table(scores, SCORES)
    means = scores[[*params.score.weights, TOTAL]].mean().to_dict()
    tracker.log_metrics({f"score/{name}": value for name, value in means.items()})
    tracker.log_artifact(SCORES)


if __name__ == "__main__":
    stage_main("score", run, ["score"])
