"""Print the project's runtime dependencies from pyproject.toml, one per line, for `pip install -r` in the images.

The images install dependencies before copying the code (so a code change does not reinstall them); the list
stays in pyproject.toml and the exact versions in constraints.txt (`pip install -c constraints.txt -r ...`).

    python project-deps.py pyproject.toml                       # every runtime dependency
    python project-deps.py pyproject.toml --only fastapi ollama # a subset (the think-api image); unknown names fail
"""

from __future__ import annotations

import argparse
import re
import sys

import tomllib


def dependencies(pyproject: str, only: list[str] | None = None) -> list[str]:
    with open(pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    if only is None:
        return list(deps)
    by_name = {re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0].lower().replace("_", "-"): d for d in deps}
    wanted = [n.lower().replace("_", "-") for n in only]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise SystemExit(f"{pyproject}: not among [project] dependencies: {', '.join(missing)}")
    return [by_name[n] for n in wanted]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject")
    p.add_argument("--only", nargs="+", help="only these distributions (names as in pyproject.toml)")
    args = p.parse_args(argv)
    print("\n".join(dependencies(args.pyproject, args.only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
