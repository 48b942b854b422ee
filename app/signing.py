"""Signing exactly as DT does, for the ``send`` emulator and for tests.

DT's secret token: header ``{"alg":"HS256","typ":"JWT"}``, claims ``checksum`` (SHA-1),
``checksum_sha256``, ``exp = iat + 3600``, ``iat`` and a fresh ``jti``. Its asymmetric
token is ES256 with a ``kid`` and adds ``iss`` and ``sub`` (the organization ID).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import warnings
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

TOKEN_LIFETIME = 3600


def _claims(body: bytes, now: float | None) -> dict[str, Any]:
    iat = int(time.time() if now is None else now)
    return {
        "checksum": hashlib.sha1(body, usedforsecurity=False).hexdigest(),
        "checksum_sha256": hashlib.sha256(body).hexdigest(),
        "exp": iat + TOKEN_LIFETIME,
        "iat": iat,
        "jti": secrets.token_hex(10),
    }


def sign_secret(body: bytes, secret: str, *, now: float | None = None) -> str:
    """An ``X-Dt-Signature`` value for ``body``."""
    with warnings.catch_warnings():
        # DT lets users pick short secrets; emulating DT must not nag about that.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(_claims(body, now), secret, algorithm="HS256")


def sign_asymmetric(
    body: bytes,
    private_key_pem: bytes,
    *,
    kid: str,
    issuer: str,
    org_id: str,
    now: float | None = None,
) -> str:
    """A ``DT-Asymmetric-Signature`` value for ``body``, signed with a local EC P-256 key."""
    claims = _claims(body, now)
    del claims["checksum"]
    claims.update(iss=issuer, sub=org_id)
    return jwt.encode(claims, private_key_pem, algorithm="ES256", headers={"kid": kid})
