"""HTTPS as a client meets it: real handshakes against a real `dcon-receiver serve`.

Every refusal is checked twice: the same client succeeds against a deliberately permissive
server holding the same certificate, so a refusal means our policy, not a client that
could never connect anywhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from app.certs import CertPaths, write_local_certs
from app.samples import sample_body
from app.tls import CertificateWatcher
from tests.test_serve import ROOT, base_env, free_port, running, send, stored

SECRET = "tls-secret"
MODERN = {"TLSv1.2", "TLSv1.3"}
CBC_SUITES = "AES128-SHA:AES256-SHA:ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"
AEAD_MARKS = ("GCM", "CHACHA20", "CCM")
SERVE = [sys.executable, "-m", "app", "serve"]


@dataclass(frozen=True)
class Receiver:
    """A running receiver and the files it was started with."""

    url: str
    port: int
    root: Path
    ca: Path
    cert: Path
    key: Path


# --- clients and servers ------------------------------------------------------------------


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def legacy_client(ca: Path, version: ssl.TLSVersion, ciphers: str) -> ssl.SSLContext:
    """A client that really offers ``version`` and ``ciphers``.

    @SECLEVEL=0 lifts OpenSSL's own floor, which would otherwise refuse TLS 1.1 and SHA-1
    suites on the client side and make a refusal test pass for the wrong reason.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(ca))
    with warnings.catch_warnings():
        # Python deprecates TLS 1.1; offering it is the point of this client.
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    return context


def handshake(port: int, context: ssl.SSLContext) -> tuple[str, str]:
    """Connect to 127.0.0.1:port as "localhost"; the negotiated protocol and cipher suite."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        version, cipher = tls.version(), tls.cipher()
    assert version is not None
    assert cipher is not None
    return version, cipher[0]


def _answer_handshakes(
    listener: socket.socket, context: ssl.SSLContext, stop: threading.Event
) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            if stop.is_set():
                return
            conn.settimeout(10)
            # A client failing its handshake is the test's business; this server carries on.
            with suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)  # hold the connection until the client hangs up


@contextmanager
def permissive_server(cert: Path, key: Path) -> Iterator[int]:
    """A plain Python TLS server on a free port accepting TLS 1.1 and CBC suites: the control."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    context.load_cert_chain(cert, key)
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port: int = listener.getsockname()[1]
        thread = threading.Thread(
            target=_answer_handshakes, args=(listener, context, stop), daemon=True
        )
        thread.start()
        try:
            yield port
        finally:
            stop.set()
            socket.create_connection(("127.0.0.1", port), timeout=10).close()  # wake accept()
            thread.join(timeout=10)


def bio_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """A handshake in memory, no sockets: the negotiated protocol, or the ssl error raised."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    pending = [
        client.wrap_bio(c_in, c_out, server_hostname="localhost"),
        server.wrap_bio(s_in, s_out, server_side=True),
    ]
    ours = pending[0]
    for _ in range(8):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if not pending:
            version = ours.version()
            assert version is not None
            return version
    raise AssertionError("handshake did not finish")


# --- certificates -------------------------------------------------------------------------


def certs_command(directory: Path) -> CertPaths:
    """Certificates from our own `dcon-receiver certs`."""
    subprocess.run(
        [sys.executable, "-m", "app", "certs", "--dir", str(directory)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return CertPaths.in_directory(directory)


def trustme_rsa(directory: Path) -> CertPaths:
    """An independent CA (trustme) with an RSA leaf, laid out as `certs` lays out its files."""
    authority = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = authority.issue_cert("localhost", "127.0.0.1", "::1", key_type=trustme.KeyType.RSA)
    paths = CertPaths.in_directory(directory)
    directory.mkdir(parents=True)
    authority.cert_pem.write_to_path(str(paths.ca))
    leaf.private_key_pem.write_to_path(str(paths.server_key))
    for pem in leaf.cert_chain_pems:
        pem.write_to_path(str(paths.server), append=True)
    return paths


def replace_atomically(source: Path, target: Path) -> None:
    """Copy ``source`` beside ``target``, then rename over it, as renewal tools do."""
    staging = target.with_name(f".{target.name}.new")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def receiver_env(root: Path, port: int, **extra: str) -> dict[str, str]:
    return base_env(
        root,
        DCON_PORT=str(port),
        DCON_VERIFY_MODE="secret",
        DCON_SIGNATURE_SECRETS=SECRET,
        DCON_TLS_SELF_SIGNED="false",  # serve exactly the files given, never make new ones
        **extra,
    )


@pytest.fixture(scope="module", params=["certs-command", "trustme-rsa"])
def receiver(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Receiver]:
    """One HTTPS receiver per certificate source, shared by the tests that only connect."""
    root = tmp_path_factory.mktemp(request.param)
    make = certs_command if request.param == "certs-command" else trustme_rsa
    paths = make(root / "certs")  # where base_env points DCON_TLS_CERTFILE/KEYFILE
    port = free_port()
    with running(SERVE, receiver_env(root, port), port) as url:
        yield Receiver(url, port, root, paths.ca, paths.server, paths.server_key)


# --- the policy ---------------------------------------------------------------------------


@pytest.mark.slow
def test_handshake_verifies_against_our_ca_with_tls_1_2_or_1_3(receiver: Receiver) -> None:
    """A client trusting only ca.pem connects, on TLS 1.3 (or 1.2); without it, it cannot."""
    version, _ = handshake(receiver.port, trusting(receiver.ca))
    assert version in MODERN
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(receiver.port, ssl.create_default_context())


@pytest.mark.slow
def test_tls_1_2_client_gets_an_aead_suite(receiver: Receiver) -> None:
    """A TLS 1.2 client with Python's default suite list is served an AEAD suite."""
    client = trusting(receiver.ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    version, cipher = handshake(receiver.port, client)
    assert version == "TLSv1.2"
    assert any(mark in cipher for mark in AEAD_MARKS), cipher


@pytest.mark.slow
def test_client_offering_only_tls_1_1_is_refused(receiver: Receiver) -> None:
    """TLS 1.1 is refused by our server, though the same client gets it from a lax one."""
    client = legacy_client(receiver.ca, ssl.TLSVersion.TLSv1_1, "DEFAULT")
    with permissive_server(receiver.cert, receiver.key) as control:
        try:
            version, _ = handshake(control, client)
        except ssl.SSLError as exc:
            pytest.skip(f"this OpenSSL cannot negotiate TLS 1.1 even at @SECLEVEL=0: {exc}")
    assert version == "TLSv1.1"
    with pytest.raises(ssl.SSLError):
        handshake(receiver.port, client)
    assert handshake(receiver.port, trusting(receiver.ca))[0] in MODERN


@pytest.mark.slow
def test_tls_1_2_client_offering_only_cbc_suites_is_refused(receiver: Receiver) -> None:
    """CBC suites are refused by our server, though the same client gets one from a lax one."""
    client = legacy_client(receiver.ca, ssl.TLSVersion.TLSv1_2, CBC_SUITES)
    with permissive_server(receiver.cert, receiver.key) as control:
        version, cipher = handshake(control, client)
    assert (version, cipher) in {("TLSv1.2", suite) for suite in CBC_SUITES.split(":")}
    with pytest.raises(ssl.SSLError):
        handshake(receiver.port, client)
    assert handshake(receiver.port, trusting(receiver.ca))[0] in MODERN


@pytest.mark.slow
def test_plain_http_to_the_tls_port_fails_cleanly(receiver: Receiver) -> None:
    """http:// gets no HTTP answer (no hang, no downgrade), and HTTPS goes on working."""
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.get(f"http://127.0.0.1:{receiver.port}/healthz", timeout=10)
    response = httpx.get(f"{receiver.url}/healthz", timeout=10, verify=trusting(receiver.ca))
    assert response.status_code == 200


@pytest.mark.slow
def test_signed_event_over_https_lands_in_the_file_sink(receiver: Receiver) -> None:
    """`send --cacert` over HTTPS: accepted and in the file; without the CA, nothing is sent."""
    event_id = uuid.uuid4().hex[:20]
    body = receiver.root / f"{event_id}.json"
    body.write_bytes(sample_body("touch", event_id=event_id))
    url = f"{receiver.url}/events"
    sent = send(str(body), "--url", url, "--cacert", str(receiver.ca), "--secret", SECRET)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert event_id in {event["eventId"] for event in stored(receiver.root)}
    untrusted = send(str(body), "--url", url, "--secret", SECRET)
    assert untrusted.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stdout + untrusted.stderr


# --- renewal without a restart ------------------------------------------------------------


@pytest.mark.slow
def test_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """Cert B from another CA, renamed into place, is served to new handshakes within 20 s."""
    old = certs_command(tmp_path / "a")
    new = certs_command(tmp_path / "b")
    live = CertPaths.in_directory(tmp_path / "certs")
    shutil.copytree(tmp_path / "a", tmp_path / "certs")
    port = free_port()
    env = receiver_env(tmp_path, port, DCON_TLS_RELOAD_INTERVAL="0.2")
    with running(SERVE, env, port):
        assert handshake(port, trusting(old.ca))[0] in MODERN
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(port, trusting(new.ca))
        replace_atomically(new.server_key, live.server_key)  # key first, then the certificate
        replace_atomically(new.server, live.server)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert handshake(port, trusting(new.ca))[0] in MODERN
                break
            except ssl.SSLError:
                assert time.monotonic() < deadline, "renewed certificate never served"
                time.sleep(0.1)
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(port, trusting(old.ca))


def stamp(path: Path, seconds: int) -> None:
    """Set an explicit mtime: the watcher compares mtimes, and this keeps clocks out of it."""
    os.utime(path, (seconds, seconds))


@pytest.fixture
def renewal(tmp_path: Path) -> tuple[CertPaths, CertPaths, CertPaths]:
    """Certificates A and B from different CAs, and live files holding A."""
    old, new = CertPaths.in_directory(tmp_path / "a"), CertPaths.in_directory(tmp_path / "b")
    write_local_certs(old)
    write_local_certs(new)
    shutil.copytree(tmp_path / "a", tmp_path / "live")
    live = CertPaths.in_directory(tmp_path / "live")
    stamp(live.server, 1_000)
    stamp(live.server_key, 1_000)
    return old, new, live


def served(live: CertPaths) -> tuple[ssl.SSLContext, CertificateWatcher]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(live.server, live.server_key)
    return context, CertificateWatcher(context, live.server, live.server_key, interval=60)


def test_watcher_loads_a_renewal_only_once_key_and_certificate_match(
    renewal: tuple[CertPaths, CertPaths, CertPaths],
) -> None:
    """New certificate with the old key: not loaded (False); once the key follows: True."""
    _, new, live = renewal
    context, watcher = served(live)
    assert watcher.check() is False  # nothing changed
    shutil.copyfile(new.server, live.server)
    stamp(live.server, 2_000)
    assert watcher.check() is False
    shutil.copyfile(new.server_key, live.server_key)
    stamp(live.server_key, 2_000)
    assert watcher.check() is True
    assert bio_handshake(context, trusting(new.ca)) in MODERN
    assert watcher.check() is False  # loaded once, not on every tick


@pytest.mark.parametrize(
    "half_written",
    ["key", "certificate"],
)
def test_half_written_renewal_keeps_serving_the_old_certificate(
    renewal: tuple[CertPaths, CertPaths, CertPaths], half_written: str
) -> None:
    """Only one of the two new files in place: the old certificate still completes handshakes."""
    old, new, live = renewal
    context, watcher = served(live)
    source, target = (
        (new.server_key, live.server_key) if half_written == "key" else (new.server, live.server)
    )
    shutil.copyfile(source, target)
    stamp(target, 2_000)
    assert watcher.check() is False
    assert bio_handshake(context, trusting(old.ca)) in MODERN


def test_renewal_to_another_key_type_is_served(
    renewal: tuple[CertPaths, CertPaths, CertPaths], tmp_path: Path
) -> None:
    """An ECDSA certificate renewed as RSA: new handshakes get the RSA one, not the old one."""
    _, _, live = renewal
    context, watcher = served(live)
    rsa = trustme_rsa(tmp_path / "rsa")
    shutil.copyfile(rsa.server_key, live.server_key)
    shutil.copyfile(rsa.server, live.server)
    stamp(live.server_key, 2_000)
    stamp(live.server, 2_000)
    assert watcher.check() is True
    assert bio_handshake(context, trusting(rsa.ca)) in MODERN


# --- start-up -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("present", "named"),
    [((), "DCON_TLS_CERTFILE"), (("server.pem",), "DCON_TLS_KEYFILE")],
    ids=["both-missing", "key-missing"],
)
def test_missing_certificate_files_stop_start_up_with_the_setting_named(
    tmp_path: Path, present: tuple[str, ...], named: str
) -> None:
    """DCON_TLS_SELF_SIGNED=false and a missing file: exit 1 naming the setting, no traceback."""
    write_local_certs(CertPaths.in_directory(tmp_path / "made"))
    (tmp_path / "certs").mkdir()
    for name in present:
        shutil.copyfile(tmp_path / "made" / name, tmp_path / "certs" / name)
    env = receiver_env(tmp_path, free_port())
    result = subprocess.run(
        SERVE, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert named in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "certs" / "ca.pem").exists()  # nothing made behind our back
