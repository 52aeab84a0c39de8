"""Shared helpers of the benchmark scripts: command line, timing, memory, tables and JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import torch

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def parse_args(description: str, configure: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse the options every benchmark takes (--device, --smoke, --out) plus its own ones."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="torch device to run on: cpu (default), cuda or cuda:N")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes that finish in seconds, for tests")
    parser.add_argument("--out", type=Path, default=None, help="write the results to this JSON file")
    if configure is not None:
        configure(parser)
    args = parser.parse_args()
    args.device = resolve_bench_device(args.device)
    return args


def add_models_option(parser: argparse.ArgumentParser, models: list[str]) -> None:
    """Add `--models`, the benchmark models to run (default: all; tiny_wan only with --smoke)."""
    parser.add_argument("--models", nargs="+", default=None, choices=models,
                        help="benchmark models (default: all; tiny_wan only with --smoke)")


def resolve_bench_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name} requested but CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name} is not supported; use cpu, cuda or cuda:N")
    return device


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "alembic", "urllib3", "diffusers", "transformers", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ----- timing ---------------------------------------------------------------------------------


class Stopwatch:
    """Time a block in seconds: perf_counter on CPU, CUDA events (after a synchronize) on CUDA.

    Usage: `with Stopwatch(device) as watch: ...`, then `watch.seconds`.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = math.nan

    def __enter__(self) -> Stopwatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t0


def use_fresh_inductor_cache() -> str:
    """Point torch's inductor cache at a new, empty folder and return its path.

    Kernels that an earlier run left in torch's default cache folder would hide the compile
    time, so benchmarks with --compile compile from scratch (torch reads the variable per lookup).
    """
    folder = tempfile.mkdtemp(prefix="bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def summarise_times(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min, max and count of a list of durations in seconds."""
    values = list(seconds)
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "max_s": max(values),
        "n": len(values),
    }


# ----- memory ---------------------------------------------------------------------------------


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (VmHWM; Linux 4.0+, `/proc/self/clear_refs`)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss() -> int:
    """Return this process's peak resident set size in bytes since start or the last reset."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status; peak RSS needs Linux")


class PeakMemory:
    """Peak memory of a block in bytes: RSS on CPU (whole process), allocated tensor bytes on CUDA.

    On CPU `peak` is the process's peak RSS during the block and `increase` is that peak minus
    the RSS at the start of the block. On CUDA both come from torch.cuda's allocator statistics.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.increase = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            reset_peak_rss()
            self._start = current_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss()
        self.increase = self.peak - self._start


def run_isolated(function: Callable[..., dict], *args, timeout_s: float = 1800) -> dict:
    """Run `function(*args)` in a forked child process and return its result dict.

    Memory is measured in a child so that memory freed by one measurement and kept by the
    allocator cannot hide the next one. The fork shares the parent's imported modules, so no
    import time is paid. NOTE: the parent should not have run multi-threaded torch work before
    calling this, because OpenMP thread pools do not survive a fork.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def target() -> None:
        try:
            sender.send(("ok", function(*args)))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the parent, which raises
            sender.send(("error", traceback.format_exc()))
        finally:
            sender.close()

    process = context.Process(target=target)
    process.start()
    sender.close()
    if not receiver.poll(timeout_s):
        process.kill()
        raise TimeoutError(f"isolated run of {function.__name__} timed out after {timeout_s} s")
    try:
        status, payload = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(
            f"isolated run of {function.__name__} died with exit code {process.exitcode} before returning a result"
        ) from None
    process.join()
    if status != "ok":
        raise RuntimeError(f"isolated run of {function.__name__} failed:\n{payload}")
    return payload


# ----- output ---------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    """Describe the machine a result was measured on."""
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores_logical": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def result_header(name: str, args) -> dict[str, Any]:
    """Return the fields every result file starts with: benchmark, date, command, smoke flag and machine."""
    return {
        "benchmark": name,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([Path(sys.executable).name, "-m", f"bench.{name}", *sys.argv[1:]]),
        "smoke": bool(args.smoke),
        "code": code_version(),
        "machine": machine_info(args.device),
    }


def code_version() -> dict[str, Any]:
    """Return the git commit of the checkout and whether tracked files differ from it."""
    def git(*arguments: str) -> str:
        result = subprocess.run(["git", *arguments], cwd=ROOT, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or None, "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Format rows as a GitHub-flavoured Markdown table; floats get 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def finish(result: dict[str, Any], tables: dict[str, str], out: Path | None) -> None:
    """Print the tables, record the load average after the run, and write `result` as JSON."""
    result["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    for title, table in tables.items():
        print(f"\n## {title}\n\n{table}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        logger.info("wrote %s", out)


def known_sections(overrides: dict[str, dict], params_file: Path = ROOT / "params.yaml") -> dict[str, dict]:
    """Drop the sections of `overrides` that `params_file` does not have (older or newer params)."""
    import yaml

    sections = yaml.safe_load(Path(params_file).read_text())
    return {section: values for section, values in overrides.items() if section in sections}
