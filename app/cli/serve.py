"""`serve` and `healthcheck`: run the receiver, and ask it whether it is alive."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import click
import httpx

from app.errors import ConfigError
from app.settings import Settings, env_name, load_settings
from app.tls import ServerConfig

# Workers import the app by name and build it from the environment (``app.main``).
APP_IMPORT = "app.main:app"


class WorkerConfig(ServerConfig):
    """The config each of several workers receives (uvicorn pickles it into the worker).

    ``ServerConfig.load`` builds and hardens the worker's own TLS context. Building the
    app from the environment configures logging afresh, which would turn uvicorn's access
    log back on; applying uvicorn's logging settings once more keeps it off, as with one
    worker (our access log in ``app.ingest`` has the event's fields).
    """

    def load(self) -> None:
        super().load()
        self.configure_logging()


@click.command()
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML settings file (same as DCON_CONFIG).",
)
@click.option("--host", help="Override DCON_HOST.")
@click.option("--port", type=int, help="Override DCON_PORT.")
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="Override DCON_WORKERS: worker processes sharing the port.",
)
def serve(config: Path | None, host: str | None, port: int | None, workers: int | None) -> None:
    """Run the receiver (settings from DCON_* variables and the TOML file).

    SIGTERM or SIGINT stops it gracefully: uvicorn closes the listening socket and idle
    keep-alive connections, lets each request in flight finish (every one ends with 200
    or 503 within DCON_SINK_TIMEOUT), and only then runs the app's shutdown, which
    flushes and closes the sinks. DCON_SHUTDOWN_TIMEOUT bounds that wait; a request
    still running past it (a client that never sends its body) is cancelled and answered
    500, which DT retries. A second SIGINT quits at once without closing the sinks. With
    several workers, the parent passes the signal on and each worker stops the same way.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from app.dedup_stores import build_dedup
    from app.logs import configure_logging, logging_config
    from app.main import create_app
    from app.sinks import SinkConfigError
    from app.tls import AEAD_CIPHERS

    if config is not None:
        os.environ["DCON_CONFIG"] = str(config)
    chosen = {"host": host, "port": port, "workers": workers}
    overrides = {k: v for k, v in chosen.items() if v is not None}
    try:
        settings = load_settings(**overrides)
        configure_logging(settings.log_level, settings.log_format)
        if settings.tls:
            _ensure_certificates(settings)
        # Everything a worker builds is built here first, without I/O, so that a bad
        # setting stops the start before the port opens.
        application = create_app(settings)
        build_dedup(settings)
    except (ConfigError, SinkConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    tls: dict[str, object] = {}
    if settings.tls:
        tls = {
            "ssl_certfile": str(settings.tls_certfile),
            "ssl_keyfile": str(settings.tls_keyfile),
            "ssl_ciphers": AEAD_CIPHERS,
        }
    # Workers are separate processes that import the app by name and read their settings
    # from the environment, so the command-line overrides travel there.
    if settings.workers > 1:
        for name, value in overrides.items():
            os.environ[env_name(name)] = str(value)
    config_class = ServerConfig if settings.workers == 1 else WorkerConfig
    server_config = config_class(
        application if settings.workers == 1 else APP_IMPORT,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_config=logging_config(settings.log_level, settings.log_format),
        access_log=False,  # our own access log has the event's fields (app.ingest)
        proxy_headers=settings.proxy_headers,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        reload_interval=settings.tls_reload_interval,
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_seconds),
        **tls,
    )
    try:
        if settings.workers == 1:
            uvicorn.Server(server_config).run()
            return
        # uvicorn pickles this ServerConfig into every worker, where ServerConfig.load()
        # builds and hardens that worker's own TLS context and certificate watcher.
        Multiprocess(server_config, sockets=[server_config.bind_socket()]).run()
    except KeyboardInterrupt:
        # Ctrl-C: uvicorn has shut down gracefully and raises the SIGINT it caught again,
        # which click would report as "Aborted!" with status 1. End as an interrupt,
        # quietly, with the status a shell gives one.
        raise SystemExit(128 + signal.SIGINT) from None


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
    # This asks our own process on its own address whether it is alive; the certificate
    # may name a public host, so identity is not what is checked here.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        response = httpx.get(settings.local_url("/healthz"), verify=context, timeout=5)
    except httpx.HTTPError as exc:
        raise click.ClickException(f"no answer: {exc}") from None
    if response.status_code != 200:
        raise click.ClickException(f"/healthz answered {response.status_code}")
    click.echo("ok")
