"""Rewrite the settings table in README.md from the Settings class (`make docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.settings import Settings, env_name

README = Path(__file__).resolve().parents[1] / "README.md"
HEAD = "| Variable | Default | Meaning |\n|---|---|---|\n"
LAST = "| `DCON_CONFIG` | (none) | TOML file with any of the settings above. |\n"


def shown(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    return "(none)" if value is None else str(value)


def table() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        env = env_name(name)
        if name == "signature_secrets":
            env += "` or `DT_SIGNATURE_SECRET"
        default = shown(field.get_default(call_default_factory=True))
        rows.append(f"| `{env}` | `{default}` | {field.description} |\n")
    return HEAD + "".join(rows) + LAST


def main() -> None:
    text = README.read_text()
    start = text.index(HEAD)
    end = text.index(LAST, start) + len(LAST)
    README.write_text(text[:start] + table() + text[end:])


if __name__ == "__main__":
    main()
