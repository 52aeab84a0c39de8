"""Data-parallel training: relaunch through `accelerate launch`, shard each batch, all-reduce gradients.

Every rank draws the same global batch from the same seeded generator and trains on its own
contiguous shard of it. Each micro-batch loss is scaled by its share of the global batch, so
after one all-reduce (a sum) every rank has the gradient of the global batch's mean loss
and takes the same optimizer step. Only rank 0 logs to MLflow and writes files.

The gradients are all-reduced by hand instead of wrapping the denoiser in
`DistributedDataParallel`. The reference pass runs the same module with its LoRA adapters
disabled, and the family adapters call the denoiser directly, neither of which fits a
DDP wrapper. Only the LoRA gradients travel, which is cheap.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# The launcher binds the rendezvous to loopback only: training runs on one machine.
MASTER_ADDR = "127.0.0.1"


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run; the defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DataParallel:
        """Read RANK, WORLD_SIZE and LOCAL_RANK, which torchrun (behind `accelerate launch`) sets."""
        return cls(
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        )

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Return this rank's device: one GPU per process on CUDA, `device` otherwise."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group: NCCL on CUDA, gloo on CPU."""
        if not self.active or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("rank %d of %d joined the %s process group", self.rank, self.world_size, backend)

    def stop(self) -> None:
        """Wait for every rank, then leave the process group."""
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def shard(self, size: int) -> np.ndarray:
        """Return this rank's contiguous rows of a global batch of `size` rows."""
        if size % self.world_size:
            raise ValueError(f"a batch of {size} pairs does not split over {self.world_size} processes")
        per_rank = size // self.world_size
        return np.arange(self.rank * per_rank, (self.rank + 1) * per_rank)

    def broadcast_parameters(self, parameters: list[torch.nn.Parameter]) -> None:
        """Copy rank 0's values of `parameters` to every rank, as DDP does at construction."""
        if self.active:
            for parameter in parameters:
                dist.broadcast(parameter.data, src=0)

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `parameters` over all ranks in one flat all-reduce."""
        if not self.active:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for parameter, grad in zip(parameters, grads):
            parameter.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
            offset += grad.numel()

    def gather(self, value) -> list:
        """Return the picklable `value` of every rank, in rank order."""
        if not self.active:
            return [value]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((MASTER_ADDR, 0))
        return probe.getsockname()[1]


def launch_command(module: str, num_processes: int, port: int) -> list[str]:
    """Return the `accelerate launch` command that runs `python -m module` in `num_processes` processes.

    `--multi_gpu` selects accelerate's torchrun launcher on CPU as well: its `--cpu` mode starts
    a single process unless MPI is configured. Each rank then picks gloo or NCCL itself.
    """
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes", str(num_processes),
        "--num_machines", "1",
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
        "--main_process_ip", MASTER_ADDR,
        "--main_process_port", str(port),
        "-m", module,
    ]


def relaunch(module: str, num_processes: int) -> int:
    """Run `module` under `accelerate launch` with `num_processes` ranks and return its exit code."""
    command = launch_command(module, num_processes, free_port())
    logger.info("starting %d training processes: %s", num_processes, " ".join(command))
    env = dict(os.environ)
    # Each rank sets its own torch threads from runtime.threads; OMP defaults to one per rank.
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        logger.error("accelerate launch exited with %d; the log of each rank is above", result.returncode)
    return result.returncode
