"""Shared entry point of the DVC stages: logging, params validation, threads, MLflow run.

A stage module defines `run(params, tracker)` and calls `stage_main("name", run, keys)`,
where `keys` lists the params sections the stage reads (the same list as in dvc.yaml).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch

from pgdpo.config import Params, ParamsError, load_params
from pgdpo.runtime import seed_everything
from pgdpo.tracking import Tracker, stage_run
from pgdpo.training.parallel import DataParallel

logger = logging.getLogger(__name__)

# Exit code for invalid params (EX_CONFIG from sysexits.h); the Prefect flow never retries it.
EXIT_INVALID_PARAMS = 78


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("httpx", "alembic", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stage_main(name: str, run: Callable[[Params, Tracker], None], sections: list[str]) -> None:
    """Validate params.yaml, then run one stage inside its MLflow run; exit non-zero on failure."""
    setup_logging()
    try:
        params = load_params()
    except ParamsError as error:
        logger.error("stage %s: invalid params: %s", name, error)
        sys.exit(EXIT_INVALID_PARAMS)

    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    seed_everything(params.seed)

    # Some params can only be checked against the loaded model (for example `base.video` against
    # the family's VAE), so a ParamsError raised while the stage runs exits like one at load time.
    try:
        _run_tracked(name, run, sections, params)
    except ParamsError as error:
        logger.error("stage %s: invalid params: %s", name, error)
        sys.exit(EXIT_INVALID_PARAMS)


def _run_tracked(name: str, run: Callable[[Params, Tracker], None], sections: list[str], params: Params) -> None:
    if DataParallel.from_env().rank > 0:
        # In a data-parallel run only rank 0 logs to MLflow; the other ranks train without a run.
        logger.info("stage %s started on rank %d without MLflow tracking", name, DataParallel.from_env().rank)
        run(params, Tracker(None))
        return

    logged = {section: getattr(params, section).model_dump() for section in sections}
    with stage_run(name, params.tracking.experiment, logged, required=params.tracking.required) as tracker:
        logger.info("stage %s started", name)
        run(params, tracker)
        logger.info("stage %s finished", name)
