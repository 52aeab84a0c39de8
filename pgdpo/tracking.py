"""MLflow tracking: one child run per stage under one parent run per pipeline run.

The parent run is found in this order:
1. `PGDPO_PARENT_RUN_ID`, set by the Prefect flow, which creates the parent itself;
2. the `dvc repro` / `dvc exp run` process that started this stage: every stage of one DVC
   invocation shares that process, so its pid and start time key the parent run;
3. none: a stage started by hand logs a top-level run.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else `sqlite:///mlflow.db` in the
current folder (the project root when DVC runs a stage).

Every stage run is tagged with the git commit, the stage name, the DVC experiment name (inside
`dvc exp run`) and `pgdpo.dvc_stage_md5`: the md5 of the stage's command, dependency checksums
and params values, computed with DVC's own hashing when the stage starts. These are the fields
DVC writes to the stage's entry in dvc.lock after the run, and `lock_fingerprint` computes the
same md5 from that entry, so a run can be matched to its dvc.lock entry. The owner tag names
the process that opened the run: a stage run that finds an older run of its stage still RUNNING
with a dead owner marks that run KILLED.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

PARENT_ENV = "PGDPO_PARENT_RUN_ID"
PIPELINE_KEY_TAG = "pgdpo.pipeline_key"
STAGE_TAG = "pgdpo.stage"
STAGE_MD5_TAG = "pgdpo.dvc_stage_md5"
DVC_EXP_TAG = "pgdpo.dvc_exp"
# "host/pid-start_ms" of the process that opened a stage run, so a later stage run can check
# whether a run left RUNNING still has a live owner.
OWNER_TAG = "pgdpo.owner"
PARENT_RUN_TAG = "mlflow.parentRunId"


# Path parts of DVC's workspace for a queued or `--temp` experiment: a copy of the project at
# <project>/.dvc/tmp/exps/<folder>, removed when the experiment ends.
DVC_TEMP_WORKSPACE = (".dvc", "tmp", "exps")


def project_root(folder: str | Path) -> Path:
    """Return the project that `folder` belongs to: the project of a DVC temporary experiment workspace, else `folder`."""
    folder = Path(folder).resolve()
    parts = folder.parts
    width = len(DVC_TEMP_WORKSPACE)
    for start in range(len(parts) - width):
        if parts[start : start + width] == DVC_TEMP_WORKSPACE:
            return Path(*parts[:start])
    return folder


def tracking_uri(project_dir: str | Path | None = None) -> str:
    """Return `MLFLOW_TRACKING_URI`, else the sqlite store `mlflow.db` of the project at `project_dir` (default: cwd).

    A stage of a queued experiment runs in a temporary copy of the project, and logs to the
    project's store, which outlives that copy.
    """
    root = project_root(project_dir if project_dir is not None else Path.cwd())
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def create_store(uri: str) -> None:
    """Create the tables of a database tracking store now, before parallel processes open it.

    Two processes creating the tables of a new sqlite store at the same time can fail.
    """
    if uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ConnectionError if an http(s) tracking server does not respond on its /health endpoint.

    MLflow's own client retries a refused connection for minutes; this check fails in seconds.
    """
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            if response.status != 200:
                raise ConnectionError(f"{uri}/health returned HTTP {response.status}")
    except (OSError, urllib.error.URLError) as error:
        raise ConnectionError(f"MLflow tracking server {uri} is unreachable: {error}") from error


def git_commit() -> str | None:
    """Return the current git commit, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def process_key(process: psutil.Process) -> str:
    """Return "pid-start_ms" of `process`: unlike the pid alone, it names one process even after pid reuse."""
    return f"{process.pid}-{int(process.create_time() * 1000)}"


def dvc_invocation_key() -> str | None:
    """Return "pid-start_time" of the nearest `dvc` ancestor process, or None if there is none."""
    try:
        process = psutil.Process().parent()
        while process is not None:
            cmdline = " ".join(process.cmdline())
            if "dvc" in Path(process.exe()).name or " dvc " in f" {cmdline} " or "/dvc " in cmdline:
                return process_key(process)
            process = process.parent()
    except (psutil.Error, OSError):
        return None
    return None


def lock_fingerprint(entry: dict[str, Any]) -> str:
    """Return the md5 of a dvc.lock stage entry's cmd, dependency checksums and params values.

    Outputs are left out because they do not exist yet when a stage starts.
    """
    deps = sorted((dep["path"], dep.get("md5") or dep.get("etag") or dep.get("checksum")) for dep in entry.get("deps", []))
    canonical = {"cmd": entry.get("cmd"), "deps": deps, "params": entry.get("params", {})}
    return hashlib.md5(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()


def dvc_stage_entry(stage: str, project_dir: str | Path = ".") -> dict[str, Any] | None:
    """Return the dvc.lock-style entry (cmd, deps with md5, params) of `stage` as DVC hashes it now.

    Returns None, with a warning, outside a DVC project or when DVC fails; tracking then goes on
    without the stage hash and dataset checksums.
    """
    try:
        from dvc.dependency.param import ParamsDependency
        from dvc.repo import Repo

        with Repo(str(project_dir)) as repo:
            (dvc_stage,) = repo.stage.collect(stage)
            deps, params = [], {}
            for dep in dvc_stage.deps:
                dep.save()
                if isinstance(dep, ParamsDependency):
                    params[dep.def_path] = dep.hash_info.value
                else:
                    deps.append({"path": dep.def_path, "md5": dep.hash_info.value})
            return {"cmd": dvc_stage.cmd, "deps": deps, "params": params}
    except Exception as error:  # noqa: BLE001 - the hash is metadata; the stage must still run
        logger.warning("could not hash DVC stage %s (%s); its run gets no %s tag", stage, error, STAGE_MD5_TAG)
        return None


def dvc_checksum(entry: dict[str, Any] | None, path: str | Path) -> str | None:
    """Return the DVC md5 of `path` from a stage entry: its own dep, else the folder dep that contains it."""
    if entry is None:
        return None
    target = Path(path)
    for dep in entry["deps"]:
        if Path(dep["path"]) == target:
            return dep["md5"]
    for dep in entry["deps"]:
        if Path(dep["path"]) in target.parents:
            return dep["md5"]
    return None


def read_dataset_table(path: str | Path):
    """Read a stage input as a DataFrame: a prompt list (.txt) becomes one `prompt` column."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".txt":
        return pd.DataFrame({"prompt": [line for line in path.read_text().splitlines() if line.strip()]})
    return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys, e.g. {"lora": {"rank": 8}} -> {"lora.rank": 8}."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class Tracker:
    """Thin wrapper over the active MLflow run; a disabled tracker drops every call."""

    def __init__(self, run_id: str | None, dvc_entry: dict[str, Any] | None = None):
        self.run_id = run_id
        self.dvc_entry = dvc_entry

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    def prepare(self, *calls: str) -> None:
        """Announce calls the stage makes at its end, such as "log_lora_model".

        The in-process tracker has nothing to prepare. A tracking worker does the slow parts of
        those calls that need no stage output while the stage computes.
        """

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            import mlflow

            flat = {key: ("null" if value is None else value) for key, value in flatten(params).items()}
            mlflow.log_params(flat)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.enabled:
            import mlflow

            mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            import mlflow

            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=artifact_path)
            else:
                mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tags(tags)

    def log_clips(self, manifest, root: str | Path, artifact_path: str, limit: int) -> int:
        """Log the first `limit` clips of `manifest` as MP4 plus a PNG poster of the middle frame.

        Returns the number of clips logged.
        """
        if not self.enabled or limit <= 0:
            return 0
        import mlflow
        from PIL import Image

        from pgdpo.video import read_video

        records = manifest.head(limit).to_dict("records")
        with tempfile.TemporaryDirectory(prefix="pgdpo-posters-") as folder:
            for record in records:
                clip = Path(root) / record["path"]
                frames = read_video(clip)
                poster = Path(folder) / f"{clip.stem}.png"
                Image.fromarray(frames[len(frames) // 2]).save(poster)
                mlflow.log_artifact(str(clip), artifact_path=artifact_path)
                mlflow.log_artifact(str(poster), artifact_path=artifact_path)
        return len(records)

    def log_lora_model(self, params, base_dir: str | Path, adapter_dir: str | Path) -> str | None:
        """Log the LoRA as a pyfunc model registered as `tracking.registered_model`; null skips it.

        Returns the model URI, or None when nothing was logged.
        """
        name = params.tracking.registered_model
        if not self.enabled or name is None:
            return None
        from pgdpo.mlflow_model import log_lora_model

        return log_lora_model(params, Path(base_dir), Path(adapter_dir), name)

    def log_dataset(self, path: str | Path, name: str, dvc_path: str | Path | None = None, context: str = "input") -> None:
        """Log the table at `path` as an MLflow dataset input, with its DVC md5 as the digest.

        The digest is the checksum DVC records for `dvc_path` (default `path`) or for the tracked
        folder that contains it; a folder's checksum ends in ".dir". Without one, MLflow's own
        hash of the DataFrame is the digest.
        """
        if not self.enabled:
            return
        import mlflow

        checksum = dvc_checksum(self.dvc_entry, dvc_path or path)
        dataset = mlflow.data.from_pandas(read_dataset_table(path), source=str(path), name=name, digest=checksum)
        mlflow.log_input(dataset, context=context, tags={"dvc.path": str(dvc_path or path)})


def find_or_create_parent(client, experiment_id: str, key: str) -> str:
    """Return the id of the pipeline parent run tagged with `key`, creating it if needed."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{key}'", max_results=1
    )
    if runs:
        return runs[0].info.run_id
    run = client.create_run(experiment_id, run_name="pipeline", tags={PIPELINE_KEY_TAG: key})
    logger.info("created MLflow parent run %s for pipeline %s", run.info.run_id, key)
    return run.info.run_id


def run_owner() -> str:
    """Return the OWNER_TAG value of this process: "host/pid-start_ms"."""
    return f"{socket.gethostname()}/{process_key(psutil.Process())}"


def owner_alive(owner: str) -> bool | None:
    """Return whether the process an OWNER_TAG value names still runs, or None when this host cannot check it.

    None covers an owner on another host and a tag that is not "host/pid-start_ms".
    """
    host, _, key = owner.rpartition("/")
    pid, _, _ = key.partition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        return process_key(psutil.Process(int(pid))) == key
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return None


def end_orphaned_runs(client, experiment_id: str, stage: str, current_parent: str | None) -> list[str]:
    """Mark KILLED the RUNNING runs of `stage` whose owner process has died, and return their ids.

    A stage whose tracking process was killed (`kill -9`, an out-of-memory kill, a lost machine)
    never ends its run, so the MLflow UI would show it running forever. The run's parent pipeline
    run is marked KILLED as well, unless it is `current_parent`, which this stage run continues.
    NOTE: runs opened on another host, and runs from before the owner tag existed, stay as they are.
    """
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'RUNNING'"
    )
    ended = []
    for run in runs:
        owner = run.data.tags.get(OWNER_TAG)
        if owner is None or owner_alive(owner) is not False:
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
        logger.warning(
            "MLflow run %s of stage %s was still RUNNING, but its process %s no longer exists; marked it KILLED",
            run.info.run_id, stage, owner,
        )

        parent = run.data.tags.get(PARENT_RUN_TAG)
        if parent and parent != current_parent and client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, status="KILLED")
            logger.warning("marked its pipeline run %s KILLED as well", parent)
    return ended


def tracking_unusable(uri: str, stage: str, error: Exception, required: bool) -> None:
    """Raise RuntimeError for a tracking store that failed, or warn once when tracking is optional."""
    if required:
        raise RuntimeError(
            f"MLflow tracking at {uri} failed for stage {stage}: {error}. Start the server or set "
            "MLFLOW_TRACKING_URI, or set tracking.required: false to run without tracking."
        ) from error
    logger.warning("MLflow at %s unreachable (%s); stage %s runs without tracking", uri, error, stage)


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: dict[str, Any], required: bool = True) -> Iterator[Tracker]:
    """Open the MLflow child run of `stage`, log `params` and the git commit, and yield a Tracker.

    With `required=False`, an unreachable tracking server logs one warning and the stage runs
    with a disabled tracker, so its DVC outputs are still written.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    try:
        check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        experiment_id = mlflow.set_experiment(experiment).experiment_id
        client = MlflowClient()
        parent_id = os.environ.get(PARENT_ENV)
        if not parent_id:
            key = dvc_invocation_key()
            parent_id = find_or_create_parent(client, experiment_id, key) if key else None
        try:
            end_orphaned_runs(client, experiment_id, stage, parent_id)
        except Exception as error:  # noqa: BLE001 - cleaning up is optional, the new run is not
            logger.warning("checking for runs of stage %s left RUNNING failed: %s", stage, error)
        run = mlflow.start_run(run_name=stage, parent_run_id=parent_id, tags={STAGE_TAG: stage, OWNER_TAG: run_owner()})
    except Exception as error:  # noqa: BLE001 - any client error means the store is unusable
        tracking_unusable(uri, stage, error, required)
        yield Tracker(None)
        return

    entry = dvc_stage_entry(stage)
    tracker = Tracker(run.info.run_id, entry)
    commit = git_commit()
    tags = {"git.commit": commit or "unknown"}
    if entry is not None:
        tags[STAGE_MD5_TAG] = lock_fingerprint(entry)
    if os.environ.get("DVC_EXP_NAME"):
        tags[DVC_EXP_TAG] = os.environ["DVC_EXP_NAME"]
    tracker.set_tags(tags)
    tracker.log_params(params)
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
        if parent_id and not os.environ.get(PARENT_ENV):
            client.set_terminated(parent_id, status=status)
