"""DT's side of the asymmetric scheme, for tests: key pairs, tokens and a JWKS server.

Tokens are signed the way DT signs them (dt-data-connector.md §2.4): header
``{"alg": "ES256", "typ": "JWT", "kid": ...}``, claims ``iss``, ``sub`` (the organization
ID), ``iat``, ``exp = iat + 3600``, ``jti`` and ``checksum_sha256``. :class:`JwksServer`
plays DT's identity server on 127.0.0.1 and counts the requests it answers.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from jwt.utils import base64url_encode

from app.settings import DT_ISSUER

ORG_ID = "cvinmt9aq9sc73c5fqa0"
DISCOVERY_PATH = "/data-connector/.well-known/openid-configuration"
JWKS_PATH = "/data-connector/jwks.json"


@dataclass(frozen=True)
class SigningKey:
    """One of DT's key pairs: the private half signs, the public half goes in the JWKS."""

    kid: str
    private: ec.EllipticCurvePrivateKey
    alg: str = "ES256"

    @classmethod
    def generate(cls, kid: str, curve: ec.EllipticCurve | None = None) -> SigningKey:
        """A fresh P-256 pair, or a pair on ``curve`` with the matching ES* algorithm."""
        curve = curve or ec.SECP256R1()
        alg = {256: "ES256", 384: "ES384", 521: "ES512"}[curve.key_size]
        return cls(kid, ec.generate_private_key(curve), alg)

    def jwk(self) -> dict[str, Any]:
        """The public JWK as DT publishes it."""
        public = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "use": "sig", "alg": self.alg}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def private_pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(
        self,
        body: bytes,
        *,
        iat: float | None = None,
        issuer: str = DT_ISSUER,
        org_id: str = ORG_ID,
        kid: str | None = None,
        **claims: Any,
    ) -> str:
        """A ``DT-Asymmetric-Signature`` for ``body``; ``claims`` add to or replace DT's."""
        payload = dt_claims(body, iat=iat, issuer=issuer, org_id=org_id) | claims
        header = {"kid": self.kid if kid is None else kid}
        return jwt.encode(payload, self.private, algorithm=self.alg, headers=header)


def dt_claims(
    body: bytes, *, iat: float | None = None, issuer: str = DT_ISSUER, org_id: str = ORG_ID
) -> dict[str, Any]:
    """The claims DT puts in an asymmetric token for ``body``."""
    issued = int(time.time() if iat is None else iat)
    return {
        "iss": issuer,
        "sub": org_id,
        "iat": issued,
        "exp": issued + 3600,
        "jti": secrets.token_hex(10),
        "checksum_sha256": hashlib.sha256(body).hexdigest(),
    }


def compact(
    header: dict[str, Any],
    claims: dict[str, Any],
    sign: Callable[[bytes], bytes] = lambda signing_input: b"",
) -> str:
    """A compact JWS assembled by hand, for tokens no honest library would produce.

    ``sign`` gets the signing input (``b64url(header).b64url(claims)``).
    """
    head = base64url_encode(json.dumps(header).encode())
    payload = base64url_encode(json.dumps(claims).encode())
    signing_input = head + b"." + payload
    return (signing_input + b"." + base64url_encode(sign(signing_input))).decode()


def jwks(keys: Iterable[SigningKey]) -> dict[str, Any]:
    return {"keys": [key.jwk() for key in keys]}


@dataclass
class JwksServer:
    """DT's identity server on 127.0.0.1: a discovery document and a JWKS, both counted.

    Change ``keys`` to rotate; set ``discovery_status`` to make discovery fail.
    """

    keys: list[SigningKey] = field(default_factory=list)
    issuer: str = DT_ISSUER
    discovery_status: int = 200
    requests: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "the server is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def oidc_url(self) -> str:
        return self.base_url + DISCOVERY_PATH

    @property
    def jwks_fetches(self) -> int:
        with self._lock:
            return self.requests[JWKS_PATH]

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        """What the server sends for ``path`` (called on the server's threads)."""
        with self._lock:
            self.requests[path] += 1
        if path == DISCOVERY_PATH and self.discovery_status == 200:
            return 200, {
                "issuer": self.issuer,
                "jwks_uri": self.base_url + JWKS_PATH,
                "id_token_signing_alg_values_supported": ["ES256"],
            }
        if path == JWKS_PATH:
            return 200, jwks(list(self.keys))
        status = self.discovery_status if path == DISCOVERY_PATH else 404
        return status, {"error": HTTPStatus(status).phrase}

    def __enter__(self) -> JwksServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll keeps shutdown() (and so each test's teardown) quick.
        serve = functools.partial(self._server.serve_forever, poll_interval=0.01)
        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        assert self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_for(server: JwksServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, document = server.answer(self.path)
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the counts are what tests look at."""

    return Handler
