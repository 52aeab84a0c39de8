"""Validate params.yaml without running anything: `python -m stages.check [path]`."""

import argparse
import sys

from pgdpo.config import ParamsError, load_params
from pgdpo.stage import EXIT_INVALID_PARAMS


def main() -> None:
    parser = argparse.ArgumentParser(description="Validate a params file against pgdpo's schema; exit 78 when it is invalid.")
    parser.add_argument("path", nargs="?", default="params.yaml", help="params file (default: params.yaml)")
    path = parser.parse_args().path
    try:
        load_params(path)
    except ParamsError as error:
        print(error, file=sys.stderr)
        sys.exit(EXIT_INVALID_PARAMS)
    print(f"{path}: valid")


if __name__ == "__main__":
    main()
