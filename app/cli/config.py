"""`config`: show the effective settings, secrets masked, and validate them without serving.

Validation builds what start-up builds before the port opens: the settings, the sinks
(``build_sinks`` parses their configuration and does no I/O) and the verifier (a pinned
JWKS file is read; DT's published keys are not fetched). Every line printed goes through
one redaction step, so neither a signature secret nor a password in a service URL is
ever shown, not even inside an error message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from app.errors import ConfigError
from app.settings import MASK, Settings, env_name, is_url_field, load_settings, url_password

_SECRET_ENV = ("DCON_SIGNATURE_SECRETS", "DT_SIGNATURE_SECRET", "SIGNATURE_SECRETS")


class InvalidConfig(click.ClickException):
    exit_code = 2


class Redactor:
    """Replaces every known secret value (secrets, URL passwords) in text shown to users."""

    def __init__(self, values: list[str]) -> None:
        # Longest first, so that a secret containing another is replaced whole.
        self._values = sorted({v for v in values if v}, key=len, reverse=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        urls = [v for k, v in settings.model_dump().items() if is_url_field(k)]
        return cls([*settings.signature_secrets, *_passwords(urls)])

    @classmethod
    def from_environment(cls) -> Redactor:
        """For errors raised before settings exist: the raw secret and URL variables."""
        secrets = [
            part
            for name, value in os.environ.items()
            if name.upper() in _SECRET_ENV
            for part in [value, *value.split(",")]
        ]
        urls = [
            v for k, v in os.environ.items() if k.upper().startswith("DCON_") and is_url_field(k)
        ]
        return cls([*secrets, *(s.strip() for s in secrets), *_passwords(urls)])

    def __call__(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, MASK)
        return text


def _passwords(urls: list[str]) -> Iterator[str]:
    for url in urls:
        password = url_password(str(url))
        if password is not None:
            yield password


def origin(settings: Settings, field: str) -> str:
    """Where a value came from: ``env``, ``file`` (the TOML file) or ``default``."""
    if field not in settings.model_fields_set:
        return "default"
    names = _SECRET_ENV if field == "signature_secrets" else (env_name(field),)
    present = {name.upper() for name in os.environ}
    return "env" if present & set(names) else "file"


def describe(settings: Settings) -> dict[str, Any]:
    """What ``serve`` would run with; raises ``ConfigError`` or ``SinkConfigError``."""
    from app.main import build_verifier, startup_warnings
    from app.sinks import build_sinks

    sinks = build_sinks(settings)
    _, keys = build_verifier(settings)
    verification: dict[str, Any] = {"mode": settings.verify_mode, "schemes": settings.schemes}
    if "secret" in settings.schemes:
        verification["secrets"] = len(settings.signature_secrets)
    if keys is not None:
        status = keys.status()
        verification["keys"] = {
            "source": status.source if keys.pinned else settings.dt_oidc_url,
            "pinned": keys.pinned,
            "kids": list(status.kids),
        }
        verification["issuer"] = settings.dt_issuer
        verification["organization"] = settings.dt_org_id
    verification["token_lifetime"] = (
        f"max(exp, iat + {settings.max_token_age} s) + {settings.token_leeway} s leeway"
    )
    return {
        "valid": True,
        "config_file": os.environ.get("DCON_CONFIG") or None,
        "verification": verification,
        "sinks": [
            {"name": sink.name, "types": None if types is None else sorted(types)}
            for sink, (_, types) in zip(sinks, settings.sink_routes, strict=True)
        ],
        "warnings": startup_warnings(settings),
        "settings": settings.masked(),
        "sources": {field: origin(settings, field) for field in Settings.model_fields},
    }


def render(report: dict[str, Any]) -> Iterator[str]:
    verification = report["verification"]
    yield f"configuration file: {report['config_file'] or '(none; environment and defaults)'}"
    schemes = " + ".join(verification["schemes"]) or "OFF"
    yield f"verification: {schemes} (DCON_VERIFY_MODE={verification['mode']})"
    if "secrets" in verification:
        yield f"  secret: {verification['secrets']} secret(s); any of them may match (rotation)"
    if "keys" in verification:
        keys = verification["keys"]
        kids = f" (kids: {', '.join(keys['kids'])})" if keys["kids"] else ""
        how = "pinned from" if keys["pinned"] else "fetched at start-up from"
        yield f"  asymmetric: DT's keys {how} {keys['source']}{kids}"
        yield f"  asymmetric: iss {verification['issuer']}"
        yield f"  asymmetric: sub {verification['organization'] or '(any organization)'}"
    yield f"  tokens live until {verification['token_lifetime']}"
    yield "sinks:"
    for sink in report["sinks"]:
        types = ", ".join(sink["types"]) if sink["types"] is not None else "every event"
        yield f"  {sink['name']}: {types}"
    for warning in report["warnings"]:
        yield f"warning: {warning}"
    yield "settings:"
    width = max(len(env_name(field)) for field in report["settings"])
    for field, value in report["settings"].items():
        shown = ",".join(map(str, value)) if isinstance(value, list) else value
        shown = (
            "(none)" if shown is None else str(shown).lower() if isinstance(shown, bool) else shown
        )
        yield f"  {env_name(field):<{width}}  {shown}  [{report['sources'][field]}]"


@contextmanager
def _config_file(path: Path | None) -> Iterator[None]:
    """``--config`` as ``serve`` treats it (DCON_CONFIG), for this command only."""
    if path is None:
        yield
        return
    before = os.environ.get("DCON_CONFIG")
    os.environ["DCON_CONFIG"] = str(path)
    try:
        yield
    finally:
        if before is None:
            del os.environ["DCON_CONFIG"]
        else:
            os.environ["DCON_CONFIG"] = before


@click.command("config")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML settings file (same as DCON_CONFIG).",
)
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--check", is_flag=True, help="Only validate: print one line.")
def config(config_file: Path | None, as_json: bool, check: bool) -> None:
    """Print the effective configuration (secrets masked) and validate it without serving.

    Exits 0 when valid, 2 with the message naming the setting when not.
    """
    from app.sinks import SinkConfigError

    with _config_file(config_file):
        redact = Redactor.from_environment()
        try:
            settings = load_settings()
            redact = Redactor.from_settings(settings)
            report = describe(settings)
        except (ConfigError, SinkConfigError) as exc:
            message = redact(str(exc))
            if as_json:
                click.echo(json.dumps({"valid": False, "error": message}, indent=2))
                raise SystemExit(InvalidConfig.exit_code) from None
            raise InvalidConfig(message) from None
    if as_json:
        click.echo(redact(json.dumps(report, indent=2)))
    elif check:
        schemes = "+".join(settings.schemes) or "off"
        sinks = ", ".join(sink["name"] for sink in report["sinks"])
        click.echo(redact(f"configuration is valid: signatures {schemes}; sinks {sinks}"))
    else:
        for line in render(report):
            click.echo(redact(line))
