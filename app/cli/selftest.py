"""`selftest`: before pointing DT at a receiver, check it the way DT will use it.

One signed event goes through the running receiver. The report covers the certificate
DT would see (and whether DT would trust it), whether the signature was accepted, whether
every configured sink confirmed the event (and, for the file sink, that the line is on
disk), readiness, and the round-trip time.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import click
import httpx
from cryptography import x509

from app.errors import ConfigError
from app.samples import sample_body
from app.settings import Settings, load_settings
from app.signing import sign_asymmetric, sign_secret

SELFTEST_PROJECT = "dcon-selftest"


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def ok(self, text: str) -> None:
        click.echo(f"  ok    {text}")

    def warn(self, text: str) -> None:
        click.echo(f"  warn  {text}")

    def fail(self, text: str) -> None:
        self.failed += 1
        click.echo(f"  FAIL  {text}")


def _leaf(host: str, port: int, context: ssl.SSLContext) -> tuple[x509.Certificate, str, str]:
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        cipher = tls.cipher()
        if der is None or cipher is None:
            raise ssl.SSLError("handshake ended without a certificate")
        return x509.load_der_x509_certificate(der), tls.version() or "?", cipher[0]


def check_tls(report: Report, url: str, cacert: str | None) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    permissive = ssl.create_default_context()
    permissive.check_hostname = False
    permissive.verify_mode = ssl.CERT_NONE
    try:
        cert, version, cipher = _leaf(host, port, permissive)
    except OSError as exc:
        report.fail(f"TLS handshake with {host}:{port}: {exc}")
        return
    days = (cert.not_valid_after_utc - datetime.now(UTC)).days
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    shown = ", ".join(str(n.value) for n in names)
    report.ok(f"TLS {version} {cipher}; certificate for {shown}")
    report.ok(f"issued by {cert.issuer.rfc4514_string()}")
    (report.ok if days > 14 else report.warn)(
        f"expires {cert.not_valid_after_utc:%Y-%m-%d} ({days} days left)"
    )
    for label, context in (
        ("publicly trusted (system CAs), as DT requires", ssl.create_default_context()),
        (f"trusted by {cacert}", ssl.create_default_context(cafile=cacert) if cacert else None),
    ):
        if context is None:
            continue
        try:
            _leaf(host, port, context)
            report.ok(label)
        except ssl.SSLError as exc:
            say = report.warn if "system" in label else report.fail
            say(f"not {label}: {exc.reason}")


def _headers(
    body: bytes, settings: Settings, secret: str | None, key: Path | None, kid: str, org: str
) -> dict[str, str]:
    headers = {"X-Request-Id": f"selftest-{int(time.time())}"}
    secret = secret or (settings.signature_secrets[0] if settings.signature_secrets else None)
    if secret:
        headers["X-Dt-Signature"] = sign_secret(body, secret)
    if key:
        headers[settings.asymmetric_header] = sign_asymmetric(
            body, key.read_bytes(), kid=kid, issuer=settings.dt_issuer, org_id=org
        )
    return headers


def check_file_sink(report: Report, settings: Settings, event_id: str) -> None:
    path = settings.file_path
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4 * 1024 * 1024))
            tail = f.read()
    except OSError as exc:
        report.warn(f"file sink {path} not readable from here: {exc}")
        return
    if f'"eventId":"{event_id}"'.encode() in tail:
        report.ok(f"file sink: the event is in {path}")
    else:
        report.fail(f"file sink: eventId {event_id} not found in {path}")


@click.command()
@click.option("--url", help="Ingest URL (default: from DCON_HOST/PORT/PATH/TLS).")
@click.option("--cacert", type=click.Path(exists=True, dir_okay=False), help="CA to trust.")
@click.option(
    "--secret",
    envvar="DCON_SEND_SECRET",
    help="Secret to sign with (default: the first of DCON_SIGNATURE_SECRETS).",
)
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="EC key for DT-Asymmetric-Signature (rehearsal with a pinned dev JWKS).",
)
@click.option("--kid", default="local", show_default=True)
@click.option("--org-id", help="sub for --key (default: DCON_DT_ORG_ID).")
@click.option(
    "--type", "event_type", default="touch", show_default=True, help="Event type to send."
)
def selftest(
    url: str | None,
    cacert: str | None,
    secret: str | None,
    key: Path | None,
    kid: str,
    org_id: str | None,
    event_type: str,
) -> None:
    """Send one signed event through a running receiver and report what DT would see.

    The event is a normal DT event from project "dcon-selftest", so downstream consumers
    can tell it apart.
    """
    try:
        settings = load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    url = url or settings.local_url(settings.path)
    report = Report()
    click.echo(f"selftest of {url}")
    click.echo(
        f"  signatures required: {'+'.join(settings.schemes) or 'none'}; "
        f"sinks: {', '.join(settings.sinks)}"
    )
    if url.startswith("https://"):
        check_tls(report, url, cacert)
    else:
        report.warn("plain HTTP: DT only posts to HTTPS, so a TLS proxy must sit in front")
    body = sample_body(event_type, project_id=SELFTEST_PROJECT)
    event_id = json.loads(body)["event"]["eventId"]
    headers = _headers(body, settings, secret, key, kid, org_id or settings.dt_org_id or "")
    trust = ssl.create_default_context(cafile=cacert)
    started = time.perf_counter()
    try:
        response = httpx.post(url, content=body, headers=headers, verify=trust, timeout=15)
    except httpx.HTTPError as exc:
        report.fail(f"POST {url}: {exc}")
        raise SystemExit(1) from None
    rtt = (time.perf_counter() - started) * 1000
    answer = response.json() if "json" in response.headers.get("content-type", "") else {}
    if response.status_code == 200:
        report.ok(
            f"signature accepted; every configured sink confirmed event {event_id} "
            f"({rtt:.0f} ms round trip)"
        )
        if "file" in [name for name, _ in settings.sink_routes]:
            check_file_sink(report, settings, event_id)
    elif response.status_code == 401:
        report.fail(
            f"signature refused: {answer.get('error')} ({answer.get('detail')}) "
            f"for scheme {answer.get('scheme')}"
        )
    else:
        report.fail(f"answered {response.status_code}: {response.text[:300]}")
    parts = urlsplit(url)
    ready = httpx.get(f"{parts.scheme}://{parts.netloc}/readyz", verify=trust, timeout=15)
    if ready.status_code == 200:
        report.ok("/readyz: ready")
    else:
        report.fail(f"/readyz: {ready.text[:300]}")
    click.echo("PASS" if not report.failed else f"FAIL ({report.failed} problem(s))")
    raise SystemExit(1 if report.failed else 0)
