"""`dcon-receiver certs`: a local CA and a server certificate a client can verify."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, Subject, VerificationError

from app.cli import main

FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem")


def certs(directory: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["certs", "--dir", str(directory), *args])


@pytest.fixture
def made(tmp_path: Path) -> Path:
    """A certs directory made with two extra names, one DNS and one IP."""
    directory = tmp_path / "certs"
    result = certs(directory, "--name", "receiver.example", "--name", "10.0.0.7")
    assert result.exit_code == 0, result.output
    return directory


def chain(directory: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((directory / "server.pem").read_bytes())


def ca(directory: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())


def verify(leaf: x509.Certificate, trusted: x509.Certificate, name: Subject) -> None:
    """Verify as a web client would (cryptography's verifier), or raise VerificationError."""
    PolicyBuilder().store(Store([trusted])).build_server_verifier(name).verify(leaf, [])


def test_writes_the_four_files_with_private_keys_0600(made: Path) -> None:
    """All four files exist, and only their owner can read the two keys."""
    assert sorted(p.name for p in made.iterdir()) == sorted(FILES)
    for key in ("ca-key.pem", "server-key.pem"):
        assert stat.S_IMODE((made / key).stat().st_mode) == 0o600, key


def test_server_pem_is_the_full_chain_leaf_first(made: Path) -> None:
    """server.pem holds the server certificate, then the CA exactly as in ca.pem."""
    leaf, issuer = chain(made)
    assert issuer == ca(made)
    assert leaf.issuer == issuer.subject
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_key_belongs_to_the_leaf(made: Path) -> None:
    """server-key.pem is the private key of the first certificate in server.pem."""
    key = serialization.load_pem_private_key((made / "server-key.pem").read_bytes(), None)
    leaf = chain(made)[0]
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*public) == leaf.public_key().public_bytes(*public)


def test_names_cover_localhost_and_every_extra_name(made: Path) -> None:
    """SANs: localhost, 127.0.0.1 and ::1 always; --name entries as DNS or IP by their form."""
    san = chain(made)[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "receiver.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.0.0.7"),
    }


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("localhost"),
        x509.DNSName("receiver.example"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.IPAddress(ipaddress.ip_address("10.0.0.7")),
    ],
    ids=lambda n: str(n.value),
)
def test_leaf_verifies_against_ca_pem_for_each_name(made: Path, name: Subject) -> None:
    """A client trusting ca.pem accepts the server certificate under each of its names."""
    verify(chain(made)[0], ca(made), name)


def test_leaf_does_not_verify_for_another_name_or_another_ca(made: Path, tmp_path: Path) -> None:
    """The verification above means something: wrong name or another local CA is refused."""
    leaf = chain(made)[0]
    with pytest.raises(VerificationError):
        verify(leaf, ca(made), x509.DNSName("elsewhere.example"))
    other = tmp_path / "other"
    assert certs(other).exit_code == 0
    with pytest.raises(VerificationError):
        verify(leaf, ca(other), x509.DNSName("localhost"))


def test_refuses_to_overwrite_without_force(made: Path) -> None:
    """A second run keeps the existing CA (clients trust it); --force replaces it."""
    before = {name: (made / name).read_bytes() for name in FILES}
    refused = certs(made)
    assert refused.exit_code != 0
    assert "--force" in refused.output
    assert {name: (made / name).read_bytes() for name in FILES} == before
    forced = certs(made, "--force")
    assert forced.exit_code == 0, forced.output
    assert (made / "ca.pem").read_bytes() != before["ca.pem"]
    assert (made / "ca-key.pem").read_bytes() != before["ca-key.pem"]
