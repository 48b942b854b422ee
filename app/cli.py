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
from app.settings import DT_ISSUER, Settings, load_settings
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
    from app.tls import AEAD_CIPHERS, ServerConfig

    if config is not None:
        os.environ["DCON_CONFIG"] = str(config)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_level)
        if settings.tls:
            _ensure_certificates(settings)
        application = create_app(settings)
    except (ConfigError, SinkConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    tls: dict[str, object] = {}
    if settings.tls:
        tls = {
            "ssl_certfile": str(settings.tls_certfile),
            "ssl_keyfile": str(settings.tls_keyfile),
            "ssl_ciphers": AEAD_CIPHERS,
        }
    server_config = ServerConfig(
        application,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=settings.proxy_headers,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        reload_interval=settings.tls_reload_interval,
        **tls,
    )
    uvicorn.Server(server_config).run()


def _ensure_certificates(settings: Settings) -> None:
    """Make local certificates on first run when allowed; otherwise insist they exist."""
    from app.certs import CertPaths, write_local_certs

    cert, key = settings.tls_certfile, settings.tls_keyfile
    present = [p.exists() for p in (cert, key)]
    if all(present):
        return
    if any(present) or not settings.tls_self_signed:
        missing = "DCON_TLS_CERTFILE" if not cert.exists() else "DCON_TLS_KEYFILE"
        raise ConfigError(
            f"{missing}: no such file {str(cert if missing.endswith('CERTFILE') else key)!r} "
            "(run `dcon-receiver certs` for a local certificate, or set DCON_TLS=false "
            "behind a TLS-terminating proxy)"
        )
    paths = CertPaths.in_directory(cert.parent)
    paths = CertPaths(paths.ca, paths.ca_key, cert, key)
    write_local_certs(paths)
    click.echo(
        f"created a local CA ({paths.ca}) and a certificate for localhost ({cert}); "
        "clients must trust the CA. DT itself only accepts publicly trusted certificates.",
        err=True,
    )


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("certs"),
    show_default=True,
    help="Where to write ca.pem, ca-key.pem, server.pem and server-key.pem.",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    help="Extra DNS name or IP address for the certificate (repeatable).",
)
@click.option("--force", is_flag=True, help="Replace certificates that already exist.")
def certs(directory: Path, names: tuple[str, ...], force: bool) -> None:
    """Create a local CA and a server certificate (localhost, 127.0.0.1, ::1 and --name)."""
    from app.certs import CertPaths, write_local_certs

    paths = CertPaths.in_directory(directory)
    existing = [str(p) for p in (paths.ca, paths.server) if p.exists()]
    if existing and not force:
        raise click.ClickException(f"{', '.join(existing)} already exist; use --force to replace")
    write_local_certs(paths, names)
    click.echo(f"wrote {paths.ca} (trust this), {paths.server} and {paths.server_key}")


@main.command()
def healthcheck() -> None:
    """Exit 0 if the receiver configured by DCON_* answers /healthz (for containers)."""
    import ssl

    try:
        settings = load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host  # noqa: S104
    scheme = "https" if settings.tls else "http"
    # This asks our own process on its own address whether it is alive; the certificate
    # may name a public host, so identity is not what is checked here.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        response = httpx.get(
            f"{scheme}://{host}:{settings.port}/healthz", verify=context, timeout=5
        )
    except httpx.HTTPError as exc:
        raise click.ClickException(f"no answer: {exc}") from None
    if response.status_code != 200:
        raise click.ClickException(f"/healthz answered {response.status_code}")
    click.echo("ok")


@main.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--url", default="https://127.0.0.1:8443/events", show_default=True, help="Receiver endpoint."
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
    import ssl

    key = key_file.read_bytes() if key_file else None
    failures = 0
    trust = ssl.create_default_context(cafile=cacert)
    with httpx.Client(verify=trust, timeout=15) as client:
        for body in bodies:
            headers = {}
            if secret:
                headers["X-Dt-Signature"] = sign_secret(body, secret)
            if key:
                headers["DT-Asymmetric-Signature"] = sign_asymmetric(
                    body, key, kid=kid, issuer=issuer, org_id=org_id
                )
            try:
                response = client.post(url, content=body, headers=headers)
            except httpx.TransportError as exc:
                raise click.ClickException(f"{url}: {exc}") from None
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
