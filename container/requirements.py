"""Print what pyproject.toml needs installed, one requirement a line: the build system's
requirements, the dependencies, and those of the extras named (comma-separated).

The Dockerfile installs these in a layer of their own before it copies the code, so a code
change rebuilds only the small layer that installs the package itself. An extra that
pyproject.toml does not define is an error here, where pip would only warn.

    python3 requirements.py pyproject.toml "redis,nats" > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path
from typing import Any


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _self_extras(requirement: str, project: str) -> list[str] | None:
    """The extras of a requirement on the project itself (`all = ["me[redis,nats]"]`)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*\[([^\]]*)\]", requirement)
    if match is None or _normalise(match[1]) != project:
        return None
    return [extra.strip() for extra in match[2].split(",") if extra.strip()]


def requirements(pyproject: dict[str, Any], extras: list[str]) -> list[str]:
    build, project = pyproject.get("build-system", {}), pyproject["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    name = _normalise(project["name"])
    found = [*build.get("requires", []), *project.get("dependencies", [])]
    pending, seen = [_normalise(extra) for extra in extras], set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in optional:
            known = ", ".join(sorted(optional)) or "none"
            raise SystemExit(f"no extra {extra!r} in pyproject.toml (extras: {known})")
        for requirement in optional[extra]:
            nested = _self_extras(requirement, name)
            if nested is None:
                found.append(requirement)
            else:
                pending.extend(_normalise(item) for item in nested)
    return list(dict.fromkeys(found))


def main(argv: list[str]) -> None:
    path = Path(argv[1])
    extras = [item.strip() for item in (argv[2] if len(argv) > 2 else "").split(",")]
    with path.open("rb") as file:
        pyproject = tomllib.load(file)
    print("\n".join(requirements(pyproject, [extra for extra in extras if extra])))


if __name__ == "__main__":
    main(sys.argv)
