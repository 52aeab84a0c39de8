"""Shared entry point of the DVC stages: logging, params validation, threads, MLflow run.

A stage module defines `run(params, tracker)` and calls `stage_main("name", run, keys)`,
where `keys` lists the params sections the stage reads (the same list as in dvc.yaml).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import torch

from pgdpo.config import Params, ParamsError, load_params
from pgdpo.logs import setup_logging
from pgdpo.process import freeze_before_exit
from pgdpo.runtime import seed_everything
from pgdpo.tracking import Tracker, check_reachable, tracking_unusable, tracking_uri
from pgdpo.tracking_worker import WorkerTracker, stop_early
from pgdpo.training.parallel import DataParallel

logger = logging.getLogger(__name__)

# Tags with the Unix times at which the stage's computation started and ended.
COMPUTE_START_TAG = "pgdpo.compute_start"
COMPUTE_END_TAG = "pgdpo.compute_end"

# Exit code for invalid params (EX_CONFIG from sysexits.h); the Prefect flow never retries it.
EXIT_INVALID_PARAMS = 78


def stage_main(name: str, run: Callable[[Params, Tracker], None], sections: list[str]) -> None:
    """Validate params.yaml, then run one stage inside its MLflow run; exit non-zero on failure."""
    setup_logging()
    try:
        _validate_and_run(name, run, sections)
    finally:
        stop_early()
        freeze_before_exit()


def _validate_and_run(name: str, run: Callable[[Params, Tracker], None], sections: list[str]) -> None:
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
    rank = DataParallel.from_env().rank
    if rank > 0:
        # In a data-parallel run only rank 0 logs to MLflow; the other ranks train without a run.
        logger.info("stage %s started on rank %d without MLflow tracking", name, rank)
        stop_early()
        run(params, Tracker(None))
        return

    # An unreachable tracking server stops a stage that needs tracking before it computes.
    uri = tracking_uri()
    try:
        check_reachable(uri)
    except ConnectionError as error:
        stop_early()
        tracking_unusable(uri, name, error, params.tracking.required)
        run(params, Tracker(None))
        return

    logged = {section: getattr(params, section).model_dump(mode="json") for section in sections}
    tracker = WorkerTracker(name, params.tracking.experiment, logged, required=params.tracking.required)
    status = "FAILED"
    try:
        logger.info("stage %s started", name)
        started = time.time()
        run(params, tracker)
        # The stage's own time, which the run's start and end times do not give: the run opens
        # in the tracking worker while the stage computes, and closes after the last call.
        tracker.set_tags({COMPUTE_START_TAG: f"{started:.3f}", COMPUTE_END_TAG: f"{time.time():.3f}"})
        logger.info("stage %s finished", name)
        status = "FINISHED"
    finally:
        tracker.close(status)
