"""Give a container build the package access this machine's pip has.

Reads ``pip config list`` on stdin, writes the settings that decide where packages come from
(indexes, find-links, constraints, CA bundle, proxy) into one pip.conf, and prints the
host paths they name, one a line, for container/check to mount read-only at the same place
in the build. Keeping this out of the Dockerfile keeps the Dockerfile generic: elsewhere the
build simply uses PyPI.

    pip config list | python3 pip_access.py OUT/pip.conf
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# The settings about where packages come from; anything else (user installs, targets, UI)
# is this machine's business, not the build's.
ACCESS = {
    "index-url",
    "extra-index-url",
    "find-links",
    "no-index",
    "trusted-host",
    "cert",
    "client-cert",
    "constraint",
    "proxy",
    "timeout",
    "default-timeout",
    "retries",
}
# pip applies its [global] section, then [install], then PIP_* variables, each over the last.
PRECEDENCE = {"global": 0, "install": 1, ":env:": 2}
# PEP 503 index pages link to their files relatively (../../files/...), so an index needs
# the directory above its root mounted too.
INDEXES = {"index-url", "extra-index-url"}


def effective(lines: list[str]) -> dict[str, str]:
    """The settings pip install would use, from `pip config list` (`section.key='value'`)."""
    found: list[tuple[int, str, str]] = []
    for line in lines:
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and section in PRECEDENCE and name in ACCESS:
            found.append((PRECEDENCE[section], name, str(ast.literal_eval(value))))
    return {name: value for _, name, value in sorted(found, key=lambda item: item[0])}


def local_paths(settings: dict[str, str]) -> list[Path]:
    """Existing host paths named by the settings, widened for index roots."""
    paths: list[Path] = []
    for name, value in settings.items():
        for word in value.split():
            path = Path(word.removeprefix("file://"))
            if not path.is_absolute() or not path.exists():
                continue
            if name in INDEXES and path.parent != Path("/"):
                path = path.parent
            paths.append(path)
    return sorted(set(paths))


def main(argv: list[str]) -> None:
    settings = effective(sys.stdin.read().splitlines())
    lines = ["[global]", *(f"{name} = {value}" for name, value in settings.items())]
    Path(argv[1]).write_text("\n".join(lines) + "\n")
    for path in local_paths(settings):
        print(path)


if __name__ == "__main__":
    main(sys.argv)
