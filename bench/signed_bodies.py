"""Distinct, validly signed DT requests for the HTTP benchmarks, made before a run.

A bodies file has one request per line, ``<token>\\t<compact JSON body>``: realistic bodies
of all 19 DT event types in turn (``app.samples``), each with a fresh ``eventId``, signed
exactly as DT signs (``app.signing``). ``bench/post.lua`` and ``bench/openloop.py`` read it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from app.samples import EVENT_TYPES, sample_body
from app.settings import DT_ISSUER
from app.signing import sign_asymmetric, sign_secret

SECRET = "bench-data-connector-secret-0123456789"  # noqa: S105 - a benchmark's own secret
SECRET_HEADER = "X-Dt-Signature"  # noqa: S105 - a header name
ASYMMETRIC_HEADER = "DT-Asymmetric-Signature"
ORG_ID = "bench-org"
KID = "bench"
DEVICES = tuple(f"emubench{n:012d}" for n in range(64))
CHUNK = 5000


@dataclass(frozen=True)
class Signer:
    """How requests are signed: DT's secret scheme, or its asymmetric one with a local key."""

    header: str = SECRET_HEADER
    secret: str = SECRET
    private_pem: bytes | None = None

    def sign(self, body: bytes) -> str:
        if self.private_pem is None:
            return sign_secret(body, self.secret)
        return sign_asymmetric(body, self.private_pem, kid=KID, issuer=DT_ISSUER, org_id=ORG_ID)


def asymmetric_signer(directory: Path) -> tuple[Signer, Path]:
    """A fresh EC P-256 key and its pinned JWKS file (as ``dcon-receiver dev-keys`` makes)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwks = directory / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**public, "kid": KID, "use": "sig", "alg": "ES256"}]}))
    return Signer(header=ASYMMETRIC_HEADER, private_pem=pem), jwks


def signed_line(signer: Signer, n: int) -> str:
    body = sample_body(EVENT_TYPES[n % len(EVENT_TYPES)], device_id=DEVICES[n % len(DEVICES)])
    return f"{signer.sign(body)}\t{body.decode()}\n"


def _chunk(job: tuple[Signer, int, int]) -> str:
    signer, start, count = job
    return "".join(signed_line(signer, n) for n in range(start, start + count))


def _use_every_cpu(cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)


def write_bodies(path: Path, signer: Signer, count: int, cpus: set[int]) -> None:
    """Write ``count`` signed requests to ``path``, signing on every CPU in ``cpus``.

    Call it only while nothing is being measured: it keeps those CPUs busy.
    """
    jobs = [(signer, start, min(CHUNK, count - start)) for start in range(0, count, CHUNK)]
    context = multiprocessing.get_context("fork")
    with (
        context.Pool(len(cpus), _use_every_cpu, (cpus,)) as pool,
        path.open("w", encoding="ascii") as out,
    ):
        for text in pool.imap(_chunk, jobs):
            out.write(text)
