"""Stage `prompts`: write the train and eval prompt lists.

Train prompts come from `prompts.train_file` when it is set, else from the shapes-world
grammar; eval prompts are the shapes-world combinations held out from training.
"""

from pgdpo.config import Params, ParamsError
from pgdpo.io import write_prompts
from pgdpo.paths import EVAL_PROMPTS, TRAIN_PROMPTS
from pgdpo.stage import stage_main
from pgdpo.suites import read_suite
from pgdpo.tracking import Tracker
from pgdpo.world import split_prompts


def run(params: Params, tracker: Tracker) -> None:
    train, held_out = split_prompts(params.prompts.num_eval_combos, params.prompts.seed)
    if params.prompts.train_file is not None:
        train = read_suite(params.prompts.train_file, key="prompts.train_file").prompts
        overlap = sorted(set(train) & set(held_out))
        if overlap:
            raise ParamsError(
                f"prompts.train_file = {params.prompts.train_file!r} contains {len(overlap)} eval prompts, "
                f"for example {overlap[:3]}; remove them from the file, because eval prompts are held out."
            )

    write_prompts(TRAIN_PROMPTS, train)
    write_prompts(EVAL_PROMPTS, held_out)
    tracker.log_metrics({"prompts/train": len(train), "prompts/eval": len(held_out)})
    tracker.log_artifact(TRAIN_PROMPTS.parent, "prompts")


if __name__ == "__main__":
    stage_main("prompts", run, ["prompts"])
