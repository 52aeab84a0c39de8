"""Run one pipeline stage: `python -m stages NAME`, the command of every stage in dvc.yaml.

The stage's MLflow tracking worker starts first, so it imports MLflow while this process imports
torch and diffusers for the stage (BENCHMARKS.md, "Pipeline overhead"). `python -m stages.NAME`
runs the same stage and starts the worker after the imports.

With a stage server running (PGDPO_STAGE_SERVER, `pgdpo/stage_server.py`), the stage runs in a
process forked from the server, which has imported those libraries already.
"""

from __future__ import annotations

import pkgutil
import runpy
import sys
from pathlib import Path

from pgdpo.stage_server import hand_over


def stage_names() -> list[str]:
    return sorted(module.name for module in pkgutil.iter_modules([str(Path(__file__).parent)]) if module.name != "__main__")


def main() -> None:
    hand_over("stages")
    from pgdpo.tracking_worker import start_early

    names = stage_names()
    if len(sys.argv) < 2 or sys.argv[1] not in names:
        argument = repr(sys.argv[1]) if len(sys.argv) > 1 else "no stage"
        sys.exit(f"usage: python -m stages NAME [ARGS...]; got {argument}, expected one of: {', '.join(names)}")
    name = sys.argv.pop(1)

    # `check` only reads params.yaml and opens no MLflow run.
    if name != "check":
        start_early()
    runpy.run_module(f"stages.{name}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
