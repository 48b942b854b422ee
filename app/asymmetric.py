"""``DT-Asymmetric-Signature``: ES256 tokens signed by DT, checked against DT's published keys.

:class:`DTKeys` owns the keys. It loads DT's JWKS through the discovery document (or from a
pinned file), refreshes it in the background and answers ``lookup(kid)`` from memory.
:class:`AsymmetricScheme` is the check itself, a pure function of body and headers like the
secret scheme. It never does I/O: an unknown ``kid`` fails at once and only *schedules* a
rate-limited refresh, so that DT's retry of the same event passes once the new key is in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm
from jwt.exceptions import PyJWTError

from app.errors import ConfigError, SignatureError
from app.settings import DT_ISSUER
from app.signature import (
    Clock,
    SchemePass,
    Token,
    TokenAge,
    check_checksum,
    header_value,
    parse_token,
    require_algorithm,
)

if TYPE_CHECKING:
    from app.settings import Settings

ASYMMETRIC_HEADER = "DT-Asymmetric-Signature"
ES256 = ECAlgorithm(ECAlgorithm.SHA256)
FETCH_TIMEOUT = 5.0

Sleep = Callable[[float], Awaitable[object]]
KeyMap = dict[str, EllipticCurvePublicKey]

log = logging.getLogger("dcon.asymmetric")


class KeysUnavailable(Exception):
    """DT's keys could not be read or fetched, or held no usable ES256 key."""


@dataclass(frozen=True, slots=True)
class KeysStatus:
    """What a readiness check reports about DT's keys."""

    ready: bool
    source: str
    kids: tuple[str, ...]
    last_refresh: float | None
    """Wall-clock time (epoch seconds) of the last successful load."""
    last_error: str | None
    """Why the latest load failed; ``None`` once a load succeeds."""

    @property
    def count(self) -> int:
        return len(self.kids)


def _shown(kid: str) -> str:
    # A kid comes from an unverified header: keep what ends up in logs and answers short.
    return repr(kid[:64])


def _unusable(entry: Mapping[str, Any]) -> str | None:
    kid = entry.get("kid")
    if not isinstance(kid, str) or not kid:
        return "it has no kid"
    if (entry.get("kty"), entry.get("crv")) != ("EC", "P-256"):
        return f"kty {entry.get('kty')!r} crv {entry.get('crv')!r} is not EC P-256"
    if entry.get("alg", "ES256") != "ES256":
        return f"alg {entry.get('alg')!r} is not ES256"
    if entry.get("use", "sig") != "sig":
        return f"use {entry.get('use')!r} is not sig"
    return None


def _es256_key(entry: dict[str, Any]) -> EllipticCurvePublicKey | str:
    """The prepared public key of a JWK entry, or why it is skipped."""
    reason = _unusable(entry)
    if reason is not None:
        return reason
    try:
        key = PyJWK(entry, algorithm="ES256").key
    except PyJWTError as exc:
        return str(exc)
    # A JWK with "d" yields a private key; DT never publishes one, so it is not DT's key set.
    return key if isinstance(key, EllipticCurvePublicKey) else "it is not a public key"


def parse_jwks(jwks: object, source: str) -> KeyMap:
    """The ES256 verification keys of a JWKS, by kid; other keys are logged and skipped."""
    entries = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(entries, list):
        raise KeysUnavailable(f"{source}: not a JWKS (no 'keys' list)")
    keys: KeyMap = {}
    for entry in entries:
        key = _es256_key(entry) if isinstance(entry, dict) else "it is not a JSON object"
        if isinstance(key, str):
            log.warning("%s: skipping a key: %s", source, key)
        else:
            keys[entry["kid"]] = key
    if not keys:
        raise KeysUnavailable(f"{source}: no usable EC P-256 key among {len(entries)}")
    return keys


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class DTKeys:
    """DT's signing keys by ``kid``: loaded at start, refreshed in the background.

    ``lookup`` answers from memory. An unknown kid schedules one refresh, at most once per
    ``min_interval`` seconds of ``clock``, so a flood of bogus kids cannot become a flood
    of fetches. Keys pinned from a file (``from_file``) are never fetched or refreshed.
    """

    def __init__(
        self,
        oidc_url: str | None,
        *,
        issuer: str = DT_ISSUER,
        refresh_every: float = 900,
        min_interval: float = 60,
        timeout: float = FETCH_TIMEOUT,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._url = oidc_url
        self._issuer = issuer
        self._refresh_every = refresh_every
        self._min_interval = min_interval
        self._timeout = timeout
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._source = oidc_url or "no source"
        self._keys: KeyMap = {}
        self._last_refresh: float | None = None
        self._last_error: str | None = None
        self._last_demand: float | None = None
        # verify() may run on worker threads; the lock keeps the rate limit exact.
        self._demand_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: httpx.AsyncClient | None = None
        self._background: asyncio.Task[None] | None = None
        self._on_demand: asyncio.Task[bool] | None = None

    @classmethod
    def from_jwks(cls, jwks: object, source: str = "pinned JWKS") -> DTKeys:
        """Keys pinned from a JWKS already in memory."""
        keys = cls(None)
        keys._install(parse_jwks(jwks, source), source)
        return keys

    @classmethod
    def from_file(cls, path: Path) -> DTKeys:
        """Keys pinned from a JWKS file, for hosts that cannot reach DT's identity server."""
        try:
            jwks = json.loads(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise KeysUnavailable(f"{path}: {exc}") from exc
        return cls.from_jwks(jwks, source=str(path))

    @classmethod
    def from_settings(cls, settings: Settings) -> DTKeys:
        """Pinned keys when ``dt_jwks_file`` is set, otherwise DT's discovery document."""
        if settings.dt_jwks_file is not None:
            try:
                return cls.from_file(settings.dt_jwks_file)
            except KeysUnavailable as exc:
                raise ConfigError(f"DCON_DT_JWKS_FILE: {exc}") from exc
        return cls(
            settings.dt_oidc_url,
            issuer=settings.dt_issuer,
            refresh_every=settings.dt_jwks_refresh,
            min_interval=settings.dt_jwks_min_interval,
        )

    @property
    def pinned(self) -> bool:
        return self._url is None

    @property
    def ready(self) -> bool:
        """True once at least one key is loaded."""
        return bool(self._keys)

    def status(self) -> KeysStatus:
        return KeysStatus(
            ready=self.ready,
            source=self._source,
            kids=tuple(sorted(self._keys)),
            last_refresh=self._last_refresh,
            last_error=self._last_error,
        )

    def lookup(self, kid: str) -> EllipticCurvePublicKey | None:
        """The key for ``kid``, from memory; an unknown kid schedules a refresh."""
        key = self._keys.get(kid)
        if key is None and self._claim_refresh():
            log.info("unknown kid %s: refreshing DT's keys", _shown(kid))
            self._schedule_refresh()
        return key

    def _claim_refresh(self) -> bool:
        if self.pinned:
            return False
        with self._demand_lock:
            now = self._clock()
            if self._last_demand is not None and now - self._last_demand < self._min_interval:
                return False
            self._last_demand = now
            return True

    def _schedule_refresh(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            log.warning("DT's keys are not started; an unknown kid cannot trigger a refresh")
        elif _running_loop() is loop:
            self._spawn_refresh()
        else:
            loop.call_soon_threadsafe(self._spawn_refresh)

    def _spawn_refresh(self) -> None:
        running = self._on_demand is not None and not self._on_demand.done()
        if self._loop is not None and not running:
            self._on_demand = self._loop.create_task(self.refresh(), name="dt-keys-on-demand")

    async def wait_for_refresh(self) -> None:
        """Wait for the refresh an unknown kid scheduled, if any (for tests and tools)."""
        if self._on_demand is not None:
            await self._on_demand

    async def load(self) -> None:
        """Fetch the discovery document and the JWKS, then swap the key map in one step.

        Raises ``KeysUnavailable``; the keys in use stay in place when a load fails.
        """
        if self._url is None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            keys, jwks_uri = await self._fetch(self._url)
        except KeysUnavailable as exc:
            self._last_error = str(exc)
            raise
        self._install(keys, jwks_uri)

    async def refresh(self) -> bool:
        """Like ``load`` but logs a failure instead of raising; says whether it worked."""
        try:
            await self.load()
        except KeysUnavailable as exc:
            log.warning("refreshing DT's keys failed, keeping %d key(s): %s", len(self._keys), exc)
            return False
        return True

    async def start(self) -> None:
        """Load the keys and start the background refresher. A failed load is logged, not
        raised: the receiver still starts, and DT retries what it refuses meanwhile."""
        self._loop = asyncio.get_running_loop()
        if self.pinned:
            return
        try:
            await self.load()
        except KeysUnavailable as exc:
            log.error(
                "COULD NOT LOAD DT'S SIGNING KEYS (%s). Every DT-Asymmetric-Signature is "
                "answered 401 unknown_key until they load; retrying in the background.",
                exc,
            )
        self._background = asyncio.create_task(self._refresh_forever(), name="dt-keys-refresh")

    async def close(self) -> None:
        """Stop refreshing and release the HTTP client."""
        self._loop = None
        tasks = [t for t in (self._background, self._on_demand) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _refresh_forever(self) -> None:
        while True:
            # Without keys every event is refused, so retry at the on-demand pace until then.
            await self._sleep(self._refresh_every if self.ready else self._min_interval)
            await self.refresh()

    async def _fetch(self, url: str) -> tuple[KeyMap, str]:
        discovery = await self._get_json(url)
        if discovery.get("issuer") != self._issuer:
            log.warning(
                "%s announces issuer %r, but tokens must carry iss %r; check DCON_DT_ISSUER",
                url,
                discovery.get("issuer"),
                self._issuer,
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri:
            raise KeysUnavailable(f"{url}: the discovery document has no jwks_uri")
        return parse_jwks(await self._get_json(jwks_uri), jwks_uri), jwks_uri

    async def _get_json(self, url: str) -> dict[str, Any]:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self._timeout)
        try:
            response = await self._http.get(url, headers={"accept": "application/json"})
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise KeysUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise KeysUnavailable(f"{url}: HTTP {response.status_code}")
        try:
            document = response.json()
        except ValueError as exc:
            raise KeysUnavailable(f"{url}: not JSON: {exc}") from exc
        if not isinstance(document, dict):
            raise KeysUnavailable(f"{url}: not a JSON object")
        return document

    def _install(self, keys: KeyMap, source: str) -> None:
        changed = keys.keys() != self._keys.keys()
        # One assignment: a concurrent lookup sees the old map or the new one, never a mix.
        self._keys = keys
        self._source = source if self.pinned else f"{self._url} -> {source}"
        self._last_refresh = self._wall_clock()
        self._last_error = None
        log.log(
            logging.INFO if changed else logging.DEBUG,
            "DT signing keys from %s: %s",
            source,
            ", ".join(sorted(keys)),
        )


class AsymmetricScheme:
    """``DT-Asymmetric-Signature``: ES256 signed by DT with the key its ``kid`` names.

    The algorithm is pinned here, never taken from the token, and the signature is checked
    before any claim is believed. With an organization configured, ``sub`` must match it.
    """

    name = "asymmetric"

    def __init__(
        self,
        keys: DTKeys,
        age: TokenAge,
        *,
        issuer: str = DT_ISSUER,
        org_id: str | None = None,
        header: str = ASYMMETRIC_HEADER,
    ) -> None:
        self.keys = keys
        self._age = age
        self._issuer = issuer
        self._org_id = org_id or None
        self._header = header
        # header_value's fallback scan compares lowercased names.
        self._header_key = header.lower()

    @classmethod
    def from_settings(
        cls, settings: Settings, age: TokenAge, keys: DTKeys | None = None
    ) -> AsymmetricScheme:
        """The scheme as configured; ``keys`` defaults to ``DTKeys.from_settings``.

        The caller owns the keys' lifecycle: ``await scheme.keys.start()`` / ``close()``.
        """
        return cls(
            keys if keys is not None else DTKeys.from_settings(settings),
            age,
            issuer=settings.dt_issuer,
            org_id=settings.dt_org_id,
            header=settings.asymmetric_header,
        )

    def verify(self, body: bytes, headers: Mapping[str, str]) -> SchemePass:
        raw = header_value(headers, self._header_key)
        if not raw:
            raise SignatureError(
                "missing_signature", f"{self._header} header is required", self.name
            )
        token = parse_token(raw, self.name)
        require_algorithm(token, "ES256", self.name)
        kid = self._check_signature(token)
        subject = self._check_origin(token.claims)
        self._age.check(token.claims, self.name)
        check_checksum(token.claims, body, self.name, allow_sha1=False)
        return SchemePass(self.name, f"kid {kid}", subject=subject)

    def _check_signature(self, token: Token) -> str:
        kid = token.header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise SignatureError("unknown_key", "token header has no kid", self.name)
        key = self.keys.lookup(kid)
        if key is None:
            raise SignatureError("unknown_key", self._unknown(kid), self.name)
        if not ES256.verify(token.signing_input, key, token.signature):
            raise SignatureError(
                "invalid_signature", f"signature does not match DT key {_shown(kid)}", self.name
            )
        return kid

    def _unknown(self, kid: str) -> str:
        if not self.keys.ready:
            return "DT's signing keys are not loaded yet"
        return f"kid {_shown(kid)} is not among DT's current signing keys"

    def _check_origin(self, claims: Mapping[str, Any]) -> str | None:
        if claims.get("iss") != self._issuer:
            raise SignatureError(
                "wrong_issuer", f"iss {claims.get('iss')!r} is not {self._issuer!r}", self.name
            )
        sub = claims.get("sub")
        if self._org_id is not None and sub != self._org_id:
            raise SignatureError(
                "wrong_organization", f"sub {sub!r} is not DCON_DT_ORG_ID", self.name
            )
        return sub if isinstance(sub, str) else None
