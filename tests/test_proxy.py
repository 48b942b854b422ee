"""Behind a TLS-terminating proxy: X-Forwarded-For counts only from a trusted proxy."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from app.samples import sample_body
from app.signing import sign_secret
from tests.test_serve import base_env, free_port, running

pytestmark = pytest.mark.slow

SPOOFED = "203.0.113.9"
SECRET = "proxy-secret"


def logged_client(tmp_path: Path, **settings: str) -> str:
    """Serve plain HTTP, post one signed event claiming to be forwarded for SPOOFED, and
    return the client address the access log shows for that request."""
    port = free_port()
    env = base_env(
        tmp_path,
        DCON_TLS="false",
        DCON_PORT=str(port),
        DCON_LOG_FORMAT="json",
        DCON_VERIFY_MODE="secret",
        DCON_SIGNATURE_SECRETS=SECRET,
        **settings,
    )
    request_id = uuid.uuid4().hex[:16]
    body = sample_body()
    headers = {
        "X-Dt-Signature": sign_secret(body, SECRET),
        "X-Forwarded-For": SPOOFED,
        "X-Request-Id": request_id,
    }
    with running([sys.executable, "-m", "app", "serve"], env, port):
        url = f"http://127.0.0.1:{port}/events"
        response = httpx.post(url, content=body, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    lines = (tmp_path / "server.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    [access] = [r for r in records if r.get("requestId") == request_id]
    client: str = access["client"]
    return client


def test_trusted_proxy_forwarded_client_is_logged(tmp_path: Path) -> None:
    """DCON_PROXY_HEADERS=true and the proxy's address allowed: the forwarded client is logged."""
    client = logged_client(
        tmp_path, DCON_PROXY_HEADERS="true", DCON_FORWARDED_ALLOW_IPS="127.0.0.1"
    )
    assert client == SPOOFED


def test_forwarded_header_is_ignored_by_default(tmp_path: Path) -> None:
    """Without DCON_PROXY_HEADERS, a spoofed X-Forwarded-For is ignored: the peer is logged."""
    assert logged_client(tmp_path) == "127.0.0.1"


def test_forwarded_header_is_ignored_when_proxy_headers_are_off(tmp_path: Path) -> None:
    """DCON_PROXY_HEADERS=false, even with 127.0.0.1 allowed: the peer is logged."""
    client = logged_client(
        tmp_path, DCON_PROXY_HEADERS="false", DCON_FORWARDED_ALLOW_IPS="127.0.0.1"
    )
    assert client == "127.0.0.1"


def test_forwarded_header_from_an_untrusted_address_is_ignored(tmp_path: Path) -> None:
    """DCON_PROXY_HEADERS=true but the peer is not in DCON_FORWARDED_ALLOW_IPS: peer logged."""
    client = logged_client(
        tmp_path, DCON_PROXY_HEADERS="true", DCON_FORWARDED_ALLOW_IPS="192.0.2.1"
    )
    assert client == "127.0.0.1"
