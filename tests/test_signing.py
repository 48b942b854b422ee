"""The emulator signs exactly as DT does, so what it sends is what DT would send."""

from __future__ import annotations

import base64
import hashlib
import json

from app.samples import EVENT_TYPES, sample_body, xid
from app.signing import sign_secret


def segment(token: str, index: int) -> bytes:
    part = token.split(".")[index]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_secret_token_has_dts_header_and_claims_in_dts_order() -> None:
    body = sample_body("touch")
    token = sign_secret(body, "test-secret", now=1_700_000_000)
    assert segment(token, 0) == b'{"alg":"HS256","typ":"JWT"}'
    claims = json.loads(segment(token, 1))
    assert list(claims) == ["checksum", "checksum_sha256", "exp", "iat", "jti"]
    assert claims["checksum"] == hashlib.sha1(body).hexdigest()
    assert claims["checksum_sha256"] == hashlib.sha256(body).hexdigest()
    assert claims["exp"] == claims["iat"] + 3600 == 1_700_003_600


def test_samples_cover_all_19_types_as_compact_json_with_fresh_ids() -> None:
    assert len(EVENT_TYPES) == 19
    ids = set()
    for event_type in EVENT_TYPES:
        body = sample_body(event_type)
        doc = json.loads(body)
        assert body == json.dumps(doc, separators=(",", ":")).encode()
        assert doc["event"]["eventType"] == event_type
        ids.add(doc["event"]["eventId"])
    assert len(ids) == 19


def test_xid_shape_matches_dt_ids() -> None:
    """20 characters of base32hex whose first four bytes are the creation second."""
    value = xid(1_644_496_933)
    assert len(value) == 20
    assert set(value) <= set("0123456789abcdefghijklmnopqrstuv")
    assert value[:6] == "c82gg9"  # the prefix of DT's real eventIds from that second
