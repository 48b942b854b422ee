"""`verify`: check a captured DT request offline, and say in plain words what fails.

Each scheme's verdict comes from the receiver's own classes (``SecretScheme``,
``AsymmetricScheme``), so ``verify`` never disagrees with the server. The lines above the
verdict explain every step with the same building blocks (``parse_token``,
``require_algorithm``, ``TokenAge``, ``check_checksum``) and, unlike the server, go on
after the first failure so that one run shows everything that is wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from app.asymmetric import ASYMMETRIC_HEADER, ES256, AsymmetricScheme, DTKeys, KeysUnavailable
from app.errors import SignatureError
from app.settings import DT_ISSUER, Settings
from app.signature import (
    HS256,
    SECRET_HEADER,
    Scheme,
    SecretScheme,
    Token,
    TokenAge,
    check_checksum,
    header_value,
    parse_token,
    require_algorithm,
)

PASS, FAIL, SKIP = "✓", "✗", "-"
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_REQUEST_LINE = re.compile(r"^[A-Z]+ \S+ HTTP/\d")
_DIGESTS: dict[str, Callable[[bytes], str]] = {
    "checksum_sha256": lambda body: hashlib.sha256(body).hexdigest(),
    "checksum": lambda body: hashlib.sha1(body, usedforsecurity=False).hexdigest(),
}


@dataclass(frozen=True, slots=True)
class Line:
    mark: str
    text: str
    more: tuple[str, ...] = ()


def utc(moment: float) -> str:
    try:
        return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{moment:.0f} (epoch seconds)"


def duration(seconds: float) -> str:
    """``3 h 12 min``, ``2 d 4 h``, ``45 s``: two units at most, rounded to the second."""
    total = round(abs(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    units = [(days, "d"), (hours, "h"), (minutes, "min"), (secs, "s")]
    first = next((i for i, (n, _) in enumerate(units) if n), len(units) - 1)
    shown = [f"{n} {unit}" for n, unit in units[first : first + 2] if n or first == 3]
    return " ".join(shown)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# --- the explanations, one step each --------------------------------------------------------


def explain_algorithm(token: Token, expected: str, scheme: str) -> Line:
    try:
        require_algorithm(token, expected, scheme)
    except SignatureError:
        alg = token.header.get("alg")
        if str(alg).lower() == "none":
            why = f"an unsigned token proves nothing; only {expected} is accepted"
        elif expected == "ES256" and str(alg).startswith("HS"):
            why = "HMAC keyed with DT's public key is the classic algorithm-confusion attack"
        else:
            why = (
                f"this scheme is {expected} only, fixed by the receiver, never read from the token"
            )
        return Line(FAIL, f"algorithm {alg!r} refused: {why}")
    return Line(PASS, f"algorithm {expected}")


def explain_secrets(token: Token, secrets: tuple[str, ...]) -> Line:
    if not secrets:
        return Line(SKIP, "signature: not checked, no --secret given")
    keys = [HS256.prepare_key(secret) for secret in secrets]
    matches = [HS256.verify(token.signing_input, key, token.signature) for key in keys]
    if True in matches:
        return Line(PASS, f"signature matches secret #{matches.index(True) + 1} of {len(keys)}")
    return Line(
        FAIL,
        f"signature matches none of the {len(keys)} secret(s) given: a wrong or rotated "
        "secret, or a token made by another Data Connector",
    )


def explain_age(token: Token, age: TokenAge, scheme: str) -> Line:
    try:
        age.check(token.claims, scheme)
        error = None
    except SignatureError as exc:
        if exc.code == "malformed_signature":
            return Line(FAIL, f"age: {exc.detail}")
        error = exc
    now = age.clock()
    iat, exp = _number(token.claims.get("iat")), _number(token.claims.get("exp"))
    said = [f"issued {utc(iat)}" if iat is not None else "no iat"]
    said.append(f"exp {utc(exp)}" if exp is not None else "no exp")
    if error is not None and error.code != "expired_signature" and iat is not None:
        return Line(
            FAIL,
            f"age: issued {duration(iat - now)} in the future ({utc(iat)}): check the clock "
            "of the machine that signed or captured it, or pass --now",
        )
    deadline = max(t for t in (exp, None if iat is None else iat + age.max_age) if t is not None)
    until = deadline + age.leeway
    limits = ["exp"] if exp is not None else []
    if iat is not None and (age.max_age or exp is None):
        limits.append(f"iat + {duration(age.max_age)}")
    rule = limits[0] if len(limits) == 1 else f"max({', '.join(limits)})"
    accepted = f"accepted until {utc(until)} = {rule} + {age.leeway} s leeway"
    if error is not None:
        return Line(
            FAIL, f"age: {', '.join(said)}; expired {duration(now - until)} ago ({accepted})"
        )
    note = ""
    if exp is not None and now > exp:
        note = (
            f"; its exp passed {duration(now - exp)} ago, still accepted because DT retries "
            "for up to 12 h (--max-token-age)"
        )
    return Line(
        PASS,
        f"age: {', '.join(said)}; valid for another {duration(until - now)} ({accepted}){note}",
    )


def _variants(body: bytes) -> Iterator[tuple[str, bytes]]:
    """Common capture mistakes, each with the body as DT would have sent it."""
    if body.endswith(b"\n"):
        yield (
            "the body file has a trailing newline that DT did not send (an editor or `echo` "
            "added it); without it the checksum matches",
            body.removesuffix(b"\n").removesuffix(b"\r"),
        )
    if body.startswith(b"\xef\xbb\xbf"):
        yield "the body file starts with a UTF-8 byte-order mark DT did not send", body[3:]
    if body.strip() != body:
        yield "the body file has whitespace around the JSON that DT did not send", body.strip()
    try:
        document = json.loads(body)
    except ValueError:
        return
    for ascii_only in (False, True):
        yield (
            "the body file is re-formatted JSON (pretty-printed or re-serialised): its compact "
            "form matches, but the receiver checks the exact bytes DT sent",
            json.dumps(document, separators=(",", ":"), ensure_ascii=ascii_only).encode(),
        )


def _hint(name: str, claimed: str, body: bytes) -> str:
    for description, candidate in _variants(body):
        if hmac.compare_digest(_DIGESTS[name](candidate), claimed):
            return description
    return "no simple fix of the body file matches: this token was made for other bytes"


def explain_checksum(token: Token, body: bytes, scheme: str, *, allow_sha1: bool) -> list[Line]:
    claims = token.claims
    # The same choice check_checksum makes: SHA-256 whenever the token carries it.
    name = "checksum_sha256" if "checksum_sha256" in claims else "checksum"
    algorithm = "SHA-256" if name == "checksum_sha256" else "SHA-1"
    try:
        check_checksum(claims, body, scheme, allow_sha1=allow_sha1)
    except SignatureError as exc:
        if exc.code != "checksum_mismatch":
            why = "" if allow_sha1 or "checksum" not in claims else " (SHA-1 is not accepted here)"
            return [Line(FAIL, f"checksum: {exc.detail}{why}")]
        claimed = str(claims[name]).lower()
        return [
            Line(
                FAIL,
                f"{name} does not match the {algorithm} of the body file ({len(body)} bytes)",
                (
                    f"token claims  {claimed}",
                    f"body {algorithm:<7}  {_DIGESTS[name](body)}",
                    f"hint: {_hint(name, claimed, body)}",
                ),
            )
        ]
    legacy = " (a legacy token from before 2022)" if name == "checksum" else ""
    return [Line(PASS, f"{name} matches the {algorithm} of the body file{legacy}")]


def explain_key(token: Token, keys: DTKeys | None) -> list[Line]:
    kid = token.header.get("kid")
    if keys is None:
        return [Line(SKIP, f"kid {kid!r}: signature not checked, no --jwks given")]
    if not isinstance(kid, str) or not kid:
        return [Line(FAIL, "kid: the token header has none, so no key can check it")]
    key = keys.lookup(kid)
    held = ", ".join(repr(k) for k in keys.status().kids)
    if key is None:
        return [
            Line(FAIL, f"kid {kid!r} is not in the JWKS (it holds {held}): fetch DT's current keys")
        ]
    if not ES256.verify(token.signing_input, key, token.signature):
        return [
            Line(PASS, f"kid {kid!r} found in the JWKS"),
            Line(FAIL, f"signature does not match key {kid!r}: altered, or signed by another key"),
        ]
    return [
        Line(PASS, f"kid {kid!r} found in the JWKS"),
        Line(PASS, f"signature matches key {kid!r}"),
    ]


def explain_origin(claims: Mapping[str, Any], issuer: str, org_id: str | None) -> list[Line]:
    iss, sub = claims.get("iss"), claims.get("sub")
    lines = [
        Line(PASS, f"issuer {iss!r}")
        if iss == issuer
        else Line(FAIL, f"issuer {iss!r} is not {issuer!r}")
    ]
    if org_id is None:
        lines.append(Line(SKIP, f"organization (sub) {sub!r}: not checked, no --org-id given"))
    elif sub == org_id:
        lines.append(Line(PASS, f"organization (sub) {sub!r} is --org-id"))
    else:
        lines.append(Line(FAIL, f"organization (sub) {sub!r} is not --org-id {org_id!r}"))
    return lines


# --- one report per scheme ------------------------------------------------------------------


Steps = Callable[[Token], list[Line]]


@dataclass(frozen=True, slots=True)
class Report:
    title: str
    lines: list[Line]
    scheme: Scheme | None
    """The receiver's own scheme, which judges; ``None`` when no key was given."""


def explain(
    raw: str | None, header: str, expected: str, signature: Steps, claims: Steps
) -> list[Line]:
    """Every step of one scheme; the signature steps only once the algorithm is accepted."""
    if not raw:
        return [Line(FAIL, f"{header}: no such header in the capture")]
    try:
        token = parse_token(raw, header)
    except SignatureError as exc:
        return [Line(FAIL, f"token: {exc.detail}")]
    shown = json.dumps(token.header, separators=(",", ":"))
    algorithm = explain_algorithm(token, expected, header)
    lines = [Line(PASS, f"token: header {shown}; claims {', '.join(token.claims)}"), algorithm]
    if algorithm.mark == PASS:
        lines += signature(token)
    else:
        lines.append(Line(SKIP, "signature: not checked, the algorithm is refused"))
    return lines + claims(token)


def verdict(report: Report, body: bytes, headers: Mapping[str, str]) -> tuple[bool | None, str]:
    """The receiver's own answer: (passed, what it says); ``None`` when not judged."""
    if report.scheme is None:
        return None, "not judged: no key given to check it with"
    try:
        passed = report.scheme.verify(body, headers)
    except SignatureError as exc:
        return False, f"the receiver answers 401 {exc.code}: {exc.detail}"
    return True, f"the receiver accepts it ({passed.key})"


def secret_report(raw: str | None, secrets: tuple[str, ...], body: bytes, age: TokenAge) -> Report:
    lines = explain(
        raw,
        "X-Dt-Signature",
        "HS256",
        lambda token: [explain_secrets(token, secrets)],
        lambda token: [
            explain_age(token, age, "secret"),
            *explain_checksum(token, body, "secret", allow_sha1=True),
        ],
    )
    scheme = SecretScheme(secrets, age) if secrets else None
    return Report("secret scheme (X-Dt-Signature)", lines, scheme)


def asymmetric_report(
    raw: str | None,
    keys: DTKeys | None,
    body: bytes,
    age: TokenAge,
    *,
    issuer: str,
    org_id: str | None,
    header: str,
) -> Report:
    lines = explain(
        raw,
        header,
        "ES256",
        lambda token: explain_key(token, keys),
        lambda token: [
            *explain_origin(token.claims, issuer, org_id),
            explain_age(token, age, "asymmetric"),
            *explain_checksum(token, body, "asymmetric", allow_sha1=False),
        ],
    )
    scheme = None
    if keys is not None:
        scheme = AsymmetricScheme(keys, age, issuer=issuer, org_id=org_id, header=header)
    return Report(f"asymmetric scheme ({header})", lines, scheme)


def _put(headers: dict[str, str], name: str, value: str) -> None:
    """Set a header, replacing any spelling of it already there."""
    for key in [k for k in headers if k.lower() == name.lower()]:
        del headers[key]
    headers[name] = value


def read_headers(path: Path) -> dict[str, str]:
    """``Name: value`` lines (a request dump, ``curl -v`` output) or a JSON object."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise click.BadParameter(f"{path}: not JSON: {exc}", param_hint="--headers") from None
        if isinstance(document.get("headers"), dict):
            document = document["headers"]  # an entry of tests/payloads/signed-requests.json
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in document.items()}
    headers: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        line = "" if line in (">", "<") else line.removeprefix("> ").removeprefix("< ")
        if not line:
            if headers:
                break  # the blank line after the headers: a body or the response follows
            continue
        name, colon, value = line.partition(":")
        if colon and _HEADER_NAME.match(name) and not _REQUEST_LINE.match(line):
            headers[name] = value.strip()
    return headers


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        message = f"{value!r} is neither epoch seconds nor ISO 8601"
        raise click.BadParameter(message, ctx, param) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


@click.command()
@click.option(
    "--body",
    "body_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The request body exactly as received.",
)
@click.option(
    "--headers",
    "headers_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The request headers: 'Name: value' lines or a JSON object.",
)
@click.option("--token", help="An X-Dt-Signature value (instead of, or over, --headers).")
@click.option("--asymmetric-token", help="A DT-Asymmetric-Signature value.")
@click.option(
    "--secret",
    "secrets",
    multiple=True,
    help="Signature secret to check X-Dt-Signature with (repeatable, as during a rotation).",
)
@click.option(
    "--jwks",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JWKS file of DT's keys, to check DT-Asymmetric-Signature.",
)
@click.option("--org-id", help="Your DT organization ID: the required sub of the asymmetric token.")
@click.option("--issuer", default=DT_ISSUER, show_default=True, help="Required iss (asymmetric).")
@click.option(
    "--asymmetric-header",
    default=ASYMMETRIC_HEADER,
    show_default=True,
    help="Header of the asymmetric token (DCON_ASYMMETRIC_HEADER).",
)
@click.option(
    "--now",
    callback=_moment,
    metavar="EPOCH|ISO8601",
    help="Check as of this time instead of the current one.",
)
@click.option(
    "--max-token-age",
    type=click.IntRange(min=0),
    default=Settings.model_fields["max_token_age"].default,
    show_default=True,
    help="Seconds after iat a token is accepted (DCON_MAX_TOKEN_AGE).",
)
@click.option(
    "--leeway",
    type=click.IntRange(min=0),
    default=Settings.model_fields["token_leeway"].default,
    show_default=True,
    help="Clock skew allowed, in seconds (DCON_TOKEN_LEEWAY).",
)
def verify(
    body_file: Path,
    headers_file: Path | None,
    token: str | None,
    asymmetric_token: str | None,
    secrets: tuple[str, ...],
    jwks: Path | None,
    org_id: str | None,
    issuer: str,
    asymmetric_header: str,
    now: float | None,
    max_token_age: int,
    leeway: int,
) -> None:
    """Check a captured request offline and say exactly which check fails, and why.

    A scheme is judged when its key is given: X-Dt-Signature with --secret, the asymmetric
    signature with --jwks. A token without its key is decoded and explained, not judged.
    Exits 0 when every judged scheme passes, 1 otherwise.
    """
    headers = read_headers(headers_file) if headers_file else {}
    if token:
        _put(headers, "X-Dt-Signature", token)
    if asymmetric_token:
        _put(headers, asymmetric_header, asymmetric_token)
    secret_raw = header_value(headers, SECRET_HEADER)
    asymmetric_raw = header_value(headers, asymmetric_header.lower())
    if not (secret_raw or asymmetric_raw):
        raise click.UsageError(
            "no signature to check: give --headers (with X-Dt-Signature or "
            f"{asymmetric_header}), --token or --asymmetric-token"
        )
    body = body_file.read_bytes()
    moment = time.time() if now is None else now
    age = TokenAge(max_token_age, leeway, clock=lambda: moment)
    try:
        keys = DTKeys.from_file(jwks) if jwks else None
    except KeysUnavailable as exc:
        raise click.BadParameter(str(exc), param_hint="--jwks") from None
    reports = []
    if secret_raw or secrets:
        reports.append(secret_report(secret_raw, secrets, body, age))
    if asymmetric_raw or keys:
        reports.append(
            asymmetric_report(
                asymmetric_raw,
                keys,
                body,
                age,
                issuer=issuer,
                org_id=org_id,
                header=asymmetric_header,
            )
        )
    click.echo(f"body: {body_file}, {len(body)} bytes, SHA-256 {hashlib.sha256(body).hexdigest()}")
    click.echo(f"as of: {utc(moment)}{' (--now)' if now is not None else ''}")
    outcomes = [_show(report, body, headers) for report in reports]
    judged = [
        (report.title.split()[0], ok)
        for report, ok in zip(reports, outcomes, strict=True)
        if ok is not None
    ]
    failed = [name for name, ok in judged if not ok]
    if not judged:
        click.echo("verdict: NOT VERIFIED (give --secret or --jwks to judge a signature)")
    elif failed:
        click.echo(f"verdict: FAIL ({', '.join(failed)})")
    else:
        click.echo(f"verdict: PASS ({', '.join(name for name, _ in judged)})")
    raise SystemExit(0 if judged and not failed else 1)


def _show(report: Report, body: bytes, headers: Mapping[str, str]) -> bool | None:
    click.echo(f"{report.title}:")
    for line in report.lines:
        click.echo(f"  {line.mark} {line.text}")
        for more in line.more:
            click.echo(f"      {more}")
    passed, said = verdict(report, body, headers)
    click.echo(f"  → {said}")
    return passed
