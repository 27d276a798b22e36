"""The base image's torch as a pip requirement (`torch==VERSION`), checked against the project's
own requirement in pyproject.toml; exits 1 with a message naming both when the base's torch is
older. Pre-release builds (NGC ships e.g. 2.12.0a0+<commit>) count as their release."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path


def release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group().split("."))


def main() -> int:
    import torch

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    wanted = next(d for d in project["dependencies"] if re.match(r"torch\b", d))
    minimum = re.search(r">=\s*([\d.]+)", wanted).group(1)
    if release(torch.__version__) < release(minimum):
        print(f"the base image's torch is {torch.__version__}; lmforge needs {wanted} "
              f"(pyproject.toml): build with --build-arg BASE=<an image with a newer torch>",
              file=sys.stderr)
        return 1
    print(f"torch=={torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
