"""Stage `prompts`: write the shapes-world train and eval prompt lists."""

from pgdpo.config import Params
from pgdpo.io import write_prompts
from pgdpo.paths import EVAL_PROMPTS, TRAIN_PROMPTS
from pgdpo.stage import stage_main
from pgdpo.tracking import Tracker
from pgdpo.world import split_prompts


def run(params: Params, tracker: Tracker) -> None:
    train, held_out = split_prompts(params.prompts.num_eval_combos, params.prompts.seed)
    write_prompts(TRAIN_PROMPTS, train)
    write_prompts(EVAL_PROMPTS, held_out)
    tracker.log_metrics({"prompts/train": len(train), "prompts/eval": len(held_out)})
    tracker.log_artifact(TRAIN_PROMPTS.parent, "prompts")


if __name__ == "__main__":
    stage_main("prompts", run, ["prompts"])
