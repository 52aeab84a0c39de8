"""Process-level helpers shared by the stage processes and their MLflow tracking workers."""

from __future__ import annotations

import gc


def freeze_before_exit() -> None:
    """Spare the interpreter's last garbage collection, which walks every object alive at exit.

    With torch and diffusers imported, that walk took 1.2 to 1.5 s per stage process, paid once
    per stage at the end of every run (BENCHMARKS.md, "Pipeline overhead"). `gc.freeze` moves
    all objects alive now out of the collector's reach. atexit handlers and module teardown still
    run, so log handlers flush as before.

    NOTE: an object that is only reachable through a reference cycle when the process exits is
    then never finalized. The stages close what they write (context managers) before they return,
    so no output depends on such a finalizer.
    """
    gc.collect()
    gc.freeze()
