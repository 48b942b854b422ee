"""`serve` and `healthcheck`: run the receiver, and ask it whether it is alive."""

from __future__ import annotations

import os
from pathlib import Path

import click
import httpx

from app.errors import ConfigError
from app.settings import Settings, load_settings


@click.command()
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

    from app.logs import configure_logging, logging_config
    from app.main import create_app
    from app.sinks import SinkConfigError
    from app.tls import AEAD_CIPHERS, ServerConfig

    if config is not None:
        os.environ["DCON_CONFIG"] = str(config)
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, settings.log_format)
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
        log_config=logging_config(settings.log_level, settings.log_format),
        access_log=False,  # our own access log has the event's fields (app.ingest)
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


@click.command()
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
