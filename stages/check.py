"""Validate params.yaml and the prompt files it names without running anything: `python -m stages.check [path]`."""

import argparse
import sys
from pathlib import Path

from pgdpo.config import ParamsError, load_params
from pgdpo.stage import EXIT_INVALID_PARAMS
from pgdpo.suites import check_prompt_files


def main() -> None:
    parser = argparse.ArgumentParser(description="Validate a params file against pgdpo's schema; exit 78 when it is invalid.")
    parser.add_argument("path", nargs="?", default="params.yaml", help="params file (default: params.yaml)")
    path = parser.parse_args().path
    try:
        params = load_params(path)
        # Prompt files are read by stages far down the pipeline, so they are checked here too.
        check_prompt_files(params, Path(path).parent)
    except ParamsError as error:
        print(error, file=sys.stderr)
        sys.exit(EXIT_INVALID_PARAMS)
    print(f"{path}: valid")


if __name__ == "__main__":
    main()
