"""DT signature checks: pure functions over the raw body and the request headers.

Each signature scheme is one small strategy with a ``verify(body, headers)`` method that
returns a :class:`SchemePass` or raises :class:`~app.errors.SignatureError`. A
:class:`Verifier` runs the configured schemes in order and requires every one of them.

Nothing here imports web code or re-serialises the body: checksums are computed over the
exact bytes DT signed.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from jwt.algorithms import HMACAlgorithm
from pydantic_core import from_json

from app.errors import SignatureError

SECRET_HEADER = "x-dt-signature"  # noqa: S105 - a header name, not a secret
HS256 = HMACAlgorithm(HMACAlgorithm.SHA256)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class SchemePass:
    """One scheme accepted the request; ``key`` says which key, never the key itself."""

    scheme: str
    key: str
    subject: str | None = None


@dataclass(frozen=True, slots=True)
class Verification:
    """What the verifier concluded about one request."""

    passes: tuple[SchemePass, ...]
    # ``secret`` / ``asymmetric`` / ``asymmetric+secret`` or ``unverified``: worked out
    # once, since every stored event and its metrics read it.
    label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        label = "+".join([p.scheme for p in self.passes]) or "unverified"
        object.__setattr__(self, "label", label)  # frozen: set once, here

    @property
    def verified(self) -> bool:
        return bool(self.passes)


UNVERIFIED = Verification(passes=())


class Scheme(Protocol):
    """A signature scheme: accept the request or raise ``SignatureError``."""

    name: str

    def verify(self, body: bytes, headers: Mapping[str, str]) -> SchemePass: ...


@dataclass(frozen=True, slots=True)
class Token:
    """A compact JWS split into its parts; nothing about it is trusted yet."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """Look a header up case-insensitively (frameworks differ in what they keep)."""
    value = headers.get(name)
    if value is not None:
        return value
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None


def _b64(segment: str) -> bytes:
    """Decode one base64url segment, refusing anything but its one canonical spelling.

    Non-canonical encodings (stray padding bits, padding, characters outside the
    alphabet) are refused, so that no altered token decodes to the same bytes and still
    passes: the decoded bytes must encode back to exactly ``segment``.
    """
    # binascii straight, as base64.urlsafe_b64decode does beneath three Python calls.
    raw = segment.encode("ascii")
    decoded = binascii.a2b_base64(raw.translate(_FROM_URLSAFE) + b"=" * (-len(raw) % 4))
    if _b64url(decoded) != raw:
        raise ValueError("non-canonical base64url")
    return decoded


def _b64_json(segment: str) -> dict[str, Any]:
    # pydantic-core's parser: a fifth of json.loads's time on a token's claims.
    decoded = from_json(_b64(segment))
    if not isinstance(decoded, dict):
        raise TypeError("not a JSON object")
    return decoded


# A sender signs every token with the same header, so its segment repeats from request
# to request: decoding it once per distinct segment saves a base64 and a JSON decode per
# request. Bounded, so that a flood of made-up headers cannot grow it.
_header_json = functools.lru_cache(maxsize=64)(_b64_json)


@functools.lru_cache(maxsize=64)
def _is_hs256_header(segment: bytes) -> bool:
    """Whether a token header segment is well formed and names HS256 (cached likewise)."""
    try:
        return _header_json(segment.decode("ascii")).get("alg") == "HS256"
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        return False


def _b64url(raw: bytes) -> bytes:
    """The canonical base64url spelling of ``raw``, without padding."""
    return binascii.b2a_base64(raw, newline=False).translate(_TO_URLSAFE).rstrip(b"=")


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def parse_token(token: str, scheme: str) -> Token:
    """Split a compact JWS into header, claims and signature, or raise ``malformed_signature``."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise SignatureError(
            "malformed_signature", f"token has {len(parts)} parts, expected 3", scheme
        )
    head, payload, sig = parts
    try:
        # A copy: the cached dict is shared, and a Token's reader may change its own.
        header = dict(_header_json(head))
        claims = _b64_json(payload)
        signature = _b64(sig)
    except (ValueError, TypeError, binascii.Error, UnicodeError) as exc:
        raise SignatureError(
            "malformed_signature", f"token is not a valid JWS: {exc}", scheme
        ) from exc
    return Token(header, claims, f"{head}.{payload}".encode("ascii"), signature)


def require_algorithm(token: Token, expected: str, scheme: str) -> None:
    """The algorithm is ours to choose; the token header only has to agree with it."""
    alg = token.header.get("alg")
    if alg != expected:
        raise SignatureError(
            "invalid_signature", f"algorithm {alg!r} is not accepted, only {expected}", scheme
        )


def _numeric_claim(claims: Mapping[str, Any], name: str, scheme: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SignatureError("malformed_signature", f"claim {name!r} is not a number", scheme)
    return float(value)


_NUMBERS = (int, float)  # exact types: bool, a subclass of int, is not a number here


@dataclass(frozen=True, slots=True)
class TokenAge:
    """When a token is too old or too new.

    DT signs tokens with ``exp = iat + 1 h`` but retries a failed delivery for up to
    12 h, and it is not known whether a retry is re-signed. A token is therefore accepted
    until ``max(exp, iat + max_age)``; with ``max_age = 0`` this is plain JWT expiry.
    ``leeway`` absorbs clock skew in both directions.
    """

    max_age: int
    leeway: int = 60
    clock: Clock = time.time

    def check(self, claims: Mapping[str, Any], scheme: str) -> None:
        now = self.clock()
        iat: Any = claims.get("iat")
        exp: Any = claims.get("exp")
        # The usual token, both claims numbers and well in time, in one comparison; every
        # other case goes through the checks below, which name what is wrong.
        if (
            type(iat) in _NUMBERS
            and type(exp) in _NUMBERS
            and iat <= now + self.leeway
            and now <= max(exp, iat + self.max_age) + self.leeway
        ):
            return
        iat = _numeric_claim(claims, "iat", scheme)
        exp = _numeric_claim(claims, "exp", scheme)
        if iat is None and exp is None:
            raise SignatureError("malformed_signature", "token has neither iat nor exp", scheme)
        if iat is not None and iat > now + self.leeway:
            raise SignatureError(
                "invalid_signature",
                f"token issued {iat - now:.0f} s in the future; check the clock",
                scheme,
            )
        limits = [t for t in (exp, None if iat is None else iat + self.max_age) if t is not None]
        deadline = max(limits)
        if now > deadline + self.leeway:
            raise SignatureError(
                "expired_signature",
                f"token expired {now - deadline:.0f} s ago "
                f"(accepted until max(exp, iat + {self.max_age} s))",
                scheme,
            )


def check_checksum(
    claims: Mapping[str, Any], body: bytes, scheme: str, *, allow_sha1: bool
) -> None:
    """Compare the signed body digest with the raw bytes, in constant time.

    SHA-256 wins whenever the token carries it; DT tokens from before 2022 carry only the
    SHA-1 ``checksum``, which the secret scheme still accepts.
    """
    if "checksum_sha256" in claims:
        name, digest = "checksum_sha256", hashlib.sha256(body).hexdigest()
    elif allow_sha1 and "checksum" in claims:
        name, digest = "checksum", hashlib.sha1(body, usedforsecurity=False).hexdigest()
    else:
        raise SignatureError("malformed_signature", "token carries no body checksum", scheme)
    claimed = claims[name]
    if not isinstance(claimed, str):
        raise SignatureError("malformed_signature", f"claim {name!r} is not a string", scheme)
    if not hmac.compare_digest(digest, claimed.lower()):
        raise SignatureError(
            "checksum_mismatch", f"{name} of the body does not match the token", scheme
        )


def _mac(keyed: hmac.HMAC, message: bytes) -> bytes:
    mac = keyed.copy()
    mac.update(message)
    return mac.digest()


class SecretScheme:
    """``X-Dt-Signature``: HS256 with a shared secret (deprecated by DT, still common).

    Several secrets may be configured at once so that a rotation never drops an event;
    the one that matched is reported by position.
    """

    name = "secret"

    def __init__(self, secrets: Sequence[str], age: TokenAge) -> None:
        if not secrets:
            raise ValueError("the secret scheme needs at least one secret")
        # Keyed once; copying one costs half of hmac.digest, which keys afresh each time.
        self._macs = [hmac.new(HS256.prepare_key(secret), digestmod="sha256") for secret in secrets]
        self._passes = [SchemePass(self.name, f"secret #{n + 1}") for n in range(len(secrets))]
        self._age = age

    def verify(self, body: bytes, headers: Mapping[str, str]) -> SchemePass:
        raw = header_value(headers, SECRET_HEADER)
        if not raw:
            raise SignatureError(
                "missing_signature", "X-Dt-Signature header is required", self.name
            )
        signed = self._signed_claims(raw)
        if signed is None:
            # The step-by-step way accepts exactly what the short way does, and names
            # what is wrong with everything else.
            token = parse_token(raw, self.name)
            require_algorithm(token, "HS256", self.name)
            signed = token.claims, self._matching_key(token)
        claims, index = signed
        self._age.check(claims, self.name)
        check_checksum(claims, body, self.name, allow_sha1=True)
        return self._passes[index]

    def _signed_claims(self, raw: str) -> tuple[dict[str, Any], int] | None:
        """The claims of a well-formed HS256 token signed with one of our secrets, and
        which secret; None for any other token.

        The short way for the usual token (measured at about half the time of
        ``parse_token`` and its checks): the header's verdict is cached by segment, and the
        signature is compared in its base64url spelling, so it is not decoded. Comparing
        against the canonical spelling of our digest also refuses non-canonical ones.
        """
        try:
            token = raw.strip().encode("ascii")
        except UnicodeEncodeError:
            return None
        head, _, rest = token.partition(b".")
        payload, dot2, signature = rest.partition(b".")
        if not dot2 or b"." in signature or not _is_hs256_header(head):
            return None
        signing_input = token[: len(head) + 1 + len(payload)]
        # Every key is tried, as in _matching_key: timing must not tell which one matched.
        matches = [
            hmac.compare_digest(_b64url(_mac(keyed, signing_input)), signature)
            for keyed in self._macs
        ]
        if True not in matches:
            return None
        try:
            claims = _b64_json(payload.decode("ascii"))
        except (ValueError, TypeError, binascii.Error):
            return None
        return claims, matches.index(True)

    def _matching_key(self, token: Token) -> int:
        # Every key is tried even after a match would be possible to short-circuit; the
        # position of the secret must not be learnable from timing.
        matches = [
            hmac.compare_digest(_mac(keyed, token.signing_input), token.signature)
            for keyed in self._macs
        ]
        if True not in matches:
            raise SignatureError(
                "invalid_signature", "signature matches none of the configured secrets", self.name
            )
        return matches.index(True)


class Verifier:
    """Requires every configured scheme; with none configured, marks events unverified."""

    def __init__(self, schemes: Sequence[Scheme]) -> None:
        self.schemes = tuple(schemes)

    @property
    def enabled(self) -> bool:
        return bool(self.schemes)

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Verification:
        return _verification(tuple([s.verify(body, headers) for s in self.schemes]))


# A verdict is immutable and made of a handful of passes (one per configured key, and per
# Data Connector for the asymmetric scheme), so one is kept per distinct combination
# rather than built, label and all, for every request. Bounded all the same.
_verification = functools.lru_cache(maxsize=256)(Verification)
