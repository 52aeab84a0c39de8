"""Run the shards of a stage as Prefect tasks on a Dask cluster.

`generate` and `score` split their work into shards and hand them to `run_shards`, which
wraps each call in a Prefect task and submits it through `prefect_dask.DaskTaskRunner`:
a local cluster of worker processes by default, or the running cluster at `address`.
Results come back in shard order whatever order the workers finish in.

Workers of a cluster given by address must see the project folder at the same absolute path
(a shared file system), because shards read the model and the clips from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterSpec:
    """Shard layout: `shards` pieces on `workers` local processes, or on the cluster at `address`."""

    shards: int = 1
    workers: int = 2
    address: str | None = None

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    @classmethod
    def from_section(cls, section: Any) -> ClusterSpec:
        """Read `shards`, `workers` and `dask_address` from a params section."""
        return cls(shards=section.shards, workers=section.workers, address=section.dask_address)


def split_evenly(count: int, shards: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split range(count) into at most `shards` contiguous (start, stop) ranges of whole `unit`s.

    Every boundary except the last is a multiple of `unit`, so a shard that samples in batches
    of `unit` forms exactly the batches a single run over range(count) forms.
    """
    if count < 1:
        return []
    units = -(-count // unit)
    shards = max(1, min(shards, units))
    base, extra = divmod(units, shards)
    ranges, start_unit = [], 0
    for index in range(shards):
        stop_unit = start_unit + base + (1 if index < extra else 0)
        ranges.append((start_unit * unit, min(stop_unit * unit, count)))
        start_unit = stop_unit
    return ranges


def dask_task_runner(cluster: ClusterSpec):
    """Return a DaskTaskRunner for `cluster`: its address, or a new local cluster on 127.0.0.1."""
    from prefect_dask import DaskTaskRunner

    if cluster.address:
        return DaskTaskRunner(address=cluster.address)
    # One thread per worker process: torch parallelises inside a process, and Dask's nanny
    # already sets OMP_NUM_THREADS=1 in each worker. No dashboard, so nothing listens beyond
    # the scheduler and workers on the loopback interface.
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": cluster.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )


def run_shards(function: Callable[..., Any], shard_args: Sequence[tuple], cluster: ClusterSpec, name: str) -> list[Any]:
    """Call `function(*args)` once per entry of `shard_args` on the Dask cluster; return results in order.

    `function` must be importable by the workers (a module-level function of this package).
    """
    from prefect import flow, task

    shard_task = task(function, name=f"{name}-shard", task_run_name=f"{name} shard {{shard_index}}")
    target = cluster.address or f"a local Dask cluster of {cluster.workers} worker process(es)"
    logger.info("running %d %s shard(s) on %s", len(shard_args), name, target)

    @flow(name=f"pgdpo-{name}-shards", task_runner=dask_task_runner(cluster), log_prints=False)
    def shards_flow() -> list[Any]:
        futures = [shard_task.submit(*args) for args in shard_args]
        return [future.result() for future in futures]

    return shards_flow()
