"""MLflow tracking of a stage in a worker process that runs beside the stage's computation.

Importing mlflow, opening its SQL store and hashing the DVC stage took 2.7 to 3.5 s of one core
per stage in BENCHMARKS.md. So a stage starts `python -m pgdpo.tracking_worker`, which does that
work and opens the stage's run with `pgdpo.tracking.stage_run` while the stage computes. The
stage's `WorkerTracker` sends each tracker call to the worker as one JSON line on the worker's
stdin and does not wait. `WorkerTracker.close` ends the run and waits for the worker, and raises
if the run could not be opened or a call failed. Before it exits, the worker writes one JSON line
with the result to stdout. Anything else it prints goes to stderr. A stage can announce a slow
call it makes at its end (`Tracker.prepare`), and the worker does the part of it that needs no
stage output while the stage computes (PREPARATIONS).

NOTE: calls are applied after they are sent, so a file handed to the tracker must stay unchanged
until the stage ends. The stages only log their outputs, which they write before logging.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pgdpo.logs import setup_logging
from pgdpo.process import freeze_before_exit
from pgdpo.stage_server import hand_over
from pgdpo.tracking import Tracker, stage_run, tracking_uri

logger = logging.getLogger(__name__)


class StageFailed(Exception):
    """Exception raised inside the worker's run when the stage reports a failure, so the run ends FAILED."""


def _json_default(value: Any) -> Any:
    """Encode what JSON lacks: numpy and torch scalars as numbers, paths and the rest as strings."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _start_worker() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pgdpo.tracking_worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


# The worker `start_early` started, until a WorkerTracker takes it over.
_early_worker: subprocess.Popen | None = None


def start_early() -> None:
    """Start this process's tracking worker now, before the stage imports torch and diffusers.

    The worker imports MLflow while the stage imports its own libraries, and waits for the
    stage's WorkerTracker to send it the run to open. `python -m stages NAME` calls this.
    """
    global _early_worker
    if _early_worker is None:
        _early_worker = _start_worker()


def stop_early() -> None:
    """Close a worker that `start_early` started and no WorkerTracker took over (a stage without tracking)."""
    global _early_worker
    if _early_worker is not None:
        _early_worker.stdin.close()
        _early_worker.wait()
        _early_worker = None


class WorkerTracker(Tracker):
    """Tracker of the stage process: forwards every call to a tracking worker without waiting."""

    def __init__(self, stage: str, experiment: str, params: dict[str, Any], required: bool):
        global _early_worker
        super().__init__(None)
        self.stage = stage
        self.process = _early_worker or _start_worker()
        _early_worker = None
        self._send("open", stage=stage, experiment=experiment, params=params, required=required)

    @property
    def enabled(self) -> bool:
        return True

    def _send(self, call: str, **args: Any) -> None:
        line = json.dumps({"call": call, "args": args}, default=_json_default)
        try:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        except BrokenPipeError as error:
            raise RuntimeError(
                f"the MLflow tracking worker of stage {self.stage} exited early with code {self.process.poll()}, "
                "see its error in the log above"
            ) from error

    def prepare(self, *calls: str) -> None:
        unknown = sorted(set(calls) - set(PREPARATIONS))
        if unknown:
            raise ValueError(f"nothing to prepare for tracker calls {unknown}; preparable calls: {sorted(PREPARATIONS)}")
        self._send("prepare", calls=list(calls))

    def log_params(self, params: dict[str, Any]) -> None:
        self._send("log_params", params=params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._send("log_metrics", metrics={key: float(value) for key, value in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send("log_artifact", path=str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send("set_tags", tags=tags)

    def log_clips(self, manifest, root: str | Path, artifact_path: str, limit: int) -> int:
        """Send the first `limit` manifest rows and return how many clips the worker will log."""
        records = manifest.head(max(limit, 0)).to_dict("records")
        self._send("log_clips", records=records, root=str(root), artifact_path=artifact_path, limit=limit)
        return len(records)

    def log_lora_model(self, params, base_dir: str | Path, adapter_dir: str | Path) -> None:
        """Log the LoRA pyfunc model from the worker. The model URI is recorded in the run, not returned."""
        self._send("log_lora_model", params=params.model_dump(mode="json"), base_dir=str(base_dir), adapter_dir=str(adapter_dir))

    def log_dataset(self, path: str | Path, name: str, dvc_path: str | Path | None = None, context: str = "input") -> None:
        self._send("log_dataset", path=str(path), name=name, dvc_path=None if dvc_path is None else str(dvc_path), context=context)

    def close(self, status: str) -> None:
        """End the run with `status` ("FINISHED" or "FAILED") and wait for the worker.

        Raises RuntimeError when the worker could not open the run or a call failed, unless the
        stage itself failed (status "FAILED"): then the worker's error is only logged, so the
        stage's own exception is the one that propagates.
        """
        waiting = time.perf_counter()
        try:
            self._send("end", status=status)
        except RuntimeError as error:
            logger.warning("could not send the end request to the tracking worker of stage %s: %s", self.stage, error)
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        output = self.process.stdout.read()
        code = self.process.wait()
        logger.info("MLflow tracking worker of stage %s done %.1f s after the stage", self.stage, time.perf_counter() - waiting)
        lines = output.strip().splitlines()
        result = json.loads(lines[-1]) if lines else {"error": f"no result line, exit code {code}, see its log above"}
        error = result.get("error")
        if error is None and code != 0:
            error = f"exit code {code}"
        if error is None:
            return
        message = f"MLflow tracking of stage {self.stage} failed in the tracking worker: {error}"
        if status == "FINISHED":
            raise RuntimeError(message)
        logger.error(message)


def _prepare_lora_model() -> None:
    from pgdpo.mlflow_model import prepare_logging

    prepare_logging()


# Work done ahead of a call that the stage announced with `prepare`, by call name.
PREPARATIONS = {"log_lora_model": _prepare_lora_model}


def _apply(tracker: Tracker, call: str, args: dict[str, Any]) -> None:
    """Apply one forwarded call to the worker's in-process tracker."""
    if call == "prepare":
        for name in args["calls"]:
            try:
                PREPARATIONS[name]()
            except Exception as error:  # noqa: BLE001 - only a speed-up; the call itself does the same work
                logger.warning("preparing tracker call %s failed (%s); the call will do that work itself", name, error)
    elif call == "log_clips":
        import pandas as pd

        tracker.log_clips(pd.DataFrame(args["records"]), args["root"], args["artifact_path"], args["limit"])
    elif call == "log_lora_model":
        from pgdpo.config import Params

        tracker.log_lora_model(Params.model_validate(args["params"]), args["base_dir"], args["adapter_dir"])
    elif call in {"log_params", "log_metrics", "log_artifact", "set_tags", "log_dataset"}:
        getattr(tracker, call)(**args)
    else:
        raise ValueError(f"unknown tracker call {call!r}")


def serve(requests, write_result) -> None:
    """Open the run described by the first request, apply the calls that follow, and write one result.

    The run ends FINISHED only on an "end" request with that status and no failed call. At the
    end of input without "end" (the stage process died) it ends FAILED.
    """
    first = requests.readline()
    if not first:
        # A worker started early whose stage ended without tracking (invalid params, no server).
        return
    opening = json.loads(first)
    if opening.get("call") != "open":
        write_result({"error": f"expected an 'open' request first, got {opening.get('call')!r}"})
        return
    errors: list[str] = []
    try:
        with stage_run(**opening["args"]) as tracker:
            status = "FAILED"
            for line in requests:
                request = json.loads(line)
                if request["call"] == "end":
                    status = request["args"]["status"]
                    break
                try:
                    _apply(tracker, request["call"], request["args"])
                except Exception as error:  # noqa: BLE001 - reported to the stage when it closes
                    logger.exception("tracker call %s of stage %s failed", request["call"], opening["args"]["stage"])
                    errors.append(f"{request['call']}: {error}")
            if status != "FINISHED" or errors:
                raise StageFailed(status)
    except StageFailed:
        pass
    except Exception as error:  # noqa: BLE001 - e.g. the store could not be opened
        logger.exception("MLflow tracking of stage %s failed", opening["args"].get("stage"))
        errors.append(str(error))
    write_result({"error": "; ".join(errors) if errors else None})


def import_ahead() -> None:
    """Import what opening a run needs before the first request arrives (2.5 s under `python -X importtime`).

    A worker started early does this while its stage imports torch and diffusers.
    """
    from urllib.parse import urlparse

    import mlflow  # noqa: F401
    from dvc.repo import Repo  # noqa: F401
    from mlflow.store.db.db_types import DATABASE_ENGINES

    if urlparse(tracking_uri()).scheme.split("+")[0] in DATABASE_ENGINES:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def main() -> None:
    hand_over("pgdpo.tracking_worker")
    setup_logging()
    import_ahead()
    # The result line goes to the real stdout, and whatever libraries print goes to stderr instead.
    results = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def write_result(result: dict) -> None:
        results.write(json.dumps(result) + "\n")
        results.flush()

    try:
        serve(sys.stdin, write_result)
    finally:
        freeze_before_exit()


if __name__ == "__main__":
    main()
