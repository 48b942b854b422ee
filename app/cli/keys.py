"""`certs` and `dev-keys`: local TLS certificates and a local DT-style signing key."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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


@click.command("dev-keys")
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
