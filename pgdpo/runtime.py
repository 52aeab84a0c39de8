"""Device, dtype and seeding helpers shared by every stage."""

from __future__ import annotations

import contextlib
import logging
import os
import random

import numpy as np
import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (dtype name, device type) pairs whose ignored autocast was already logged.
_ignored_autocast: set[tuple[str, str]] = set()


def resolve_device(name: str) -> torch.device:
    """Return the torch device for `name` ("cpu", "cuda", "cuda:1" or "auto")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device is {name!r} but CUDA is not available here; set runtime.device: cpu")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for a params name such as "bfloat16"."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def autocast(device: torch.device, dtype_name: str | None):
    """Return an autocast context for mixed precision, or a no-op context when `dtype_name` is None.

    NOTE: autocast is only enabled on CUDA. On CPU, bf16 autocast is slower than float32 for
    the tiny models used here, so it is ignored with a log message.
    """
    if not dtype_name or dtype_name == "float32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        # The trainer enters this context twice per step, so the message is logged once per process.
        if (dtype_name, device.type) not in _ignored_autocast:
            logger.info("runtime.autocast=%s ignored on %s: autocast applies on CUDA only", dtype_name, device)
            _ignored_autocast.add((dtype_name, device.type))
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=resolve_dtype(dtype_name))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch, and ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # NOTE: `torch.use_deterministic_algorithms` would also import torch._inductor (about 1.3 s
    # per stage process) to set the compiler's flag. `compile_denoiser` sets that flag where
    # compilation is used, so only the kernel flag is set here.
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    # cuBLAS needs this workspace setting for deterministic matmuls on CUDA.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """Return one seeded torch.Generator per seed, so each sample's noise is independent of batching."""
    return [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
