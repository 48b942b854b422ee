"""`send`: emulate a DT Data Connector, signing exactly as DT does."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import httpx

from app.samples import EVENT_TYPES, sample_body
from app.settings import DT_ISSUER
from app.signing import sign_asymmetric, sign_secret


@click.command()
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
