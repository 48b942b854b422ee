"""``dcon-receiver``: serve the receiver, or emulate a DT Data Connector with ``send``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import httpx

from app import __version__
from app.errors import ConfigError
from app.samples import EVENT_TYPES, sample_body
from app.settings import DT_ISSUER, load_settings
from app.signing import sign_asymmetric, sign_secret


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dcon-receiver")
def main() -> None:
    """Receiver for Disruptive Technologies Data Connectors."""


@main.command()
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML settings file (same as DCON_CONFIG).",
)
@click.option("--host", help="Override DCON_HOST.")
@click.option("--port", type=int, help="Override DCON_PORT.")
def serve(config: Path | None, host: str | None, port: int | None) -> None:
    """Run the receiver (settings from DCON_* variables and the TOML file)."""
    import uvicorn

    from app.logs import configure_logging
    from app.main import create_app
    from app.sinks import SinkConfigError

    if config is not None:
        os.environ["DCON_CONFIG"] = str(config)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_level)
        application = create_app(settings)
    except (ConfigError, SinkConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=settings.log_level)


@main.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--url", default="http://127.0.0.1:8000/events", show_default=True, help="Receiver endpoint."
)
@click.option(
    "--type",
    "event_type",
    type=click.Choice(EVENT_TYPES),
    default="temperature",
    show_default=True,
    help="Event type to generate when no FILES are given.",
)
@click.option(
    "--count",
    type=int,
    default=1,
    show_default=True,
    help="Generated events to send when no FILES are given.",
)
@click.option(
    "--secret", envvar="DCON_SEND_SECRET", help="Sign X-Dt-Signature (HS256) with this secret."
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sign DT-Asymmetric-Signature (ES256) with this EC P-256 private key (PEM).",
)
@click.option("--kid", default="local", show_default=True, help="kid for --key.")
@click.option("--org-id", default="local-org", show_default=True, help="sub for --key.")
@click.option("--issuer", default=DT_ISSUER, show_default=True, help="iss for --key.")
@click.option(
    "--cacert",
    type=click.Path(exists=True, dir_okay=False),
    help="CA bundle to trust for https URLs.",
)
def send(
    files: tuple[Path, ...],
    url: str,
    event_type: str,
    count: int,
    secret: str | None,
    key_file: Path | None,
    kid: str,
    org_id: str,
    issuer: str,
    cacert: str | None,
) -> None:
    """POST DT events, signed as DT signs them: FILES as they are, or generated ones."""
    bodies = (
        [f.read_bytes() for f in files]
        if files
        else [sample_body(event_type) for _ in range(count)]
    )
    key = key_file.read_bytes() if key_file else None
    failures = 0
    with httpx.Client(verify=cacert or True, timeout=15) as client:
        for body in bodies:
            headers = {}
            if secret:
                headers["X-Dt-Signature"] = sign_secret(body, secret)
            if key:
                headers["DT-Asymmetric-Signature"] = sign_asymmetric(
                    body, key, kid=kid, issuer=issuer, org_id=org_id
                )
            response = client.post(url, content=body, headers=headers)
            click.echo(f"{response.status_code} {response.text}")
            failures += not response.is_success
    sys.exit(1 if failures else 0)


@main.command("dev-keys")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--kid", default="local", show_default=True, help="kid of the key.")
def dev_keys(directory: Path, kid: str) -> None:
    """Make a local EC P-256 key and its JWKS, to rehearse the asymmetric scheme.

    Pin the JWKS with DCON_DT_JWKS_FILE=DIRECTORY/jwks.json and sign with
    `send --key DIRECTORY/private.pem`.
    """
    import json

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private = directory / "private.pem"
    private.touch(mode=0o600)
    private.write_bytes(pem)
    public = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks = {"keys": [{**public, "kid": kid, "use": "sig", "alg": "ES256"}]}
    (directory / "jwks.json").write_text(json.dumps(jwks, indent=2) + "\n")
    click.echo(f"wrote {private} (keep it private) and {directory / 'jwks.json'}")
