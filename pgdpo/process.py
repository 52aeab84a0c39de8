"""Process-level helpers shared by the stage processes, their MLflow tracking workers and the Prefect flow."""

from __future__ import annotations

import gc
import subprocess


def freeze_before_exit() -> None:
    """Spare the garbage collections the interpreter runs while it exits, which walk every live object.

    With torch and diffusers imported, exiting took 1.2 to 1.5 s longer than with this call, once
    per stage in every pipeline run (BENCHMARKS.md, "Pipeline overhead"). `gc.collect` first
    finalizes the garbage there is now; `gc.freeze` then moves every object still alive out of
    the collector's reach. atexit handlers and module teardown still run, so log handlers flush
    as before.

    NOTE: a reference cycle that becomes garbage after this call (for example during module
    teardown) is never finalized. The stages close what they write (context managers) before
    they return, so no output depends on such a finalizer.
    """
    gc.collect()
    gc.freeze()


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """Send SIGTERM to `process` and wait for it, then SIGKILL it if it is still running after `grace_s` seconds."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
