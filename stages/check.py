"""Validate params.yaml without running anything: `python -m stages.check [path]`."""

import sys

from pgdpo.config import ParamsError, load_params
from pgdpo.stage import EXIT_INVALID_PARAMS


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "params.yaml"
    try:
        load_params(path)
    except ParamsError as error:
        print(error, file=sys.stderr)
        sys.exit(EXIT_INVALID_PARAMS)
    print(f"{path}: valid")


if __name__ == "__main__":
    main()
