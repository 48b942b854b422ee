"""Per-request cost of each signature check, side by side in one run.

    python bench/signature.py [--iterations 2000] [--rounds 5]

Times ``verify`` of DT's secret scheme (HS256) and of its asymmetric scheme (ES256 with a
key prepared once), interleaved round by round, on the same realistic body. Prints the
median µs per call and the ES256/HS256 ratio; the ratio is the figure to quote.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from app.asymmetric import AsymmetricScheme, DTKeys
from app.samples import sample_body
from app.settings import DT_ISSUER
from app.signature import SecretScheme, TokenAge
from app.signing import sign_asymmetric, sign_secret


def checks() -> dict[str, Callable[[], object]]:
    body = sample_body("temperature")
    age = TokenAge(max_age=13 * 3600)
    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True) | {"kid": "k1", "alg": "ES256"}
    asymmetric = AsymmetricScheme(DTKeys.from_jwks({"keys": [jwk]}), age, org_id="org")
    secret = SecretScheme(["a-data-connector-secret"], age)
    es_headers = {
        "DT-Asymmetric-Signature": sign_asymmetric(
            body, pem, kid="k1", issuer=DT_ISSUER, org_id="org"
        )
    }
    hs_headers = {"X-Dt-Signature": sign_secret(body, "a-data-connector-secret")}
    return {
        "HS256 (X-Dt-Signature)": lambda: secret.verify(body, hs_headers),
        "ES256 (DT-Asymmetric-Signature)": lambda: asymmetric.verify(body, es_headers),
    }


def per_call_us(check: Callable[[], object], iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        check()
    return (time.perf_counter() - start) / iterations * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    timed = checks()
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.rounds):
        for name, check in timed.items():
            samples[name].append(per_call_us(check, args.iterations))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{'signature check':34} {'µs/request (median)':>20}")
    for name, value in medians.items():
        print(f"{name:34} {value:20.1f}")
    hs, es = medians.values()
    print(f"ES256 / HS256: {es / hs:.1f}x")


if __name__ == "__main__":
    main()
