"""Stage `score`: decode every candidate clip and score it with the configured scorers."""

from pgdpo.config import Params
from pgdpo.io import read_table, write_table
from pgdpo.paths import CANDIDATES, SCORES
from pgdpo.scoring.clip import resource_options
from pgdpo.scoring.sharded import score_manifest_sharded
from pgdpo.scoring.table import TOTAL
from pgdpo.sharding import ClusterSpec
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker


def run(params: Params, tracker: Tracker) -> None:
    manifest = read_table(CANDIDATES / "manifest.csv")
    # The extra columns (scoring.dimensions) report how well the base follows each prompt attribute.
    extra = [name for name in params.scoring.dimensions if name not in params.score.weights]
    scores = score_manifest_sharded(
        manifest, CANDIDATES, params.score.weights, extra_scorers=extra, cluster=ClusterSpec.from_section(params.score),
        resource_options=resource_options(params.scoring),
    )
    write_table(scores, SCORES)
    means = scores[[*params.score.weights, *extra, TOTAL]].mean().to_dict()
    tracker.log_metrics({f"score/{name}": value for name, value in means.items()})
    tracker.log_artifact(SCORES)
    tracker.log_dataset(CANDIDATES / "manifest.csv", "manifest", dvc_path=CANDIDATES)


if __name__ == "__main__":
    stage_main("score", run, ["score", "scoring"])
