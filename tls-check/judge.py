"""Judge testssl.sh's flat JSON (``--jsonfile``) against our TLS policy; print a summary.

Policy: SSLv2, SSLv3, TLS 1.0 and TLS 1.1 not offered; TLS 1.2 and TLS 1.3 offered; every
offered cipher suite authenticated encryption (GCM, ChaCha20-Poly1305 or CCM).
Exit status 0 when the policy holds, 1 otherwise.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PROTOCOLS = {  # testssl id -> name shown
    "SSLv2": "SSLv2",
    "SSLv3": "SSLv3",
    "TLS1": "TLS 1.0",
    "TLS1_1": "TLS 1.1",
    "TLS1_2": "TLS 1.2",
    "TLS1_3": "TLS 1.3",
}
REQUIRED = ("TLS1_2", "TLS1_3")
AEAD = ("_GCM_", "_CHACHA20_POLY1305_", "_CCM")
# e.g. id "cipher-tls1_2_xc02b", finding "TLS 1.2  xc02b  ECDHE-ECDSA-AES128-GCM-SHA256 ...
# TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" (the IANA name comes last).
CIPHER_ID = re.compile(r"^cipher-(ssl[23]|tls1(?:_[123])?)_x[0-9a-f]+$")
CIPHER_PROTOCOL = {"ssl2": "SSLv2", "ssl3": "SSLv3", "tls1": "TLS1"} | {
    f"tls1_{n}": f"TLS1_{n}" for n in (1, 2, 3)
}


def load(path: Path) -> list[dict[str, str]]:
    findings: list[dict[str, str]] = json.loads(path.read_text())
    return findings


def offered_protocols(findings: list[dict[str, str]]) -> dict[str, str]:
    return {f["id"]: f["finding"] for f in findings if f["id"] in PROTOCOLS}


def offered_suites(findings: list[dict[str, str]]) -> dict[str, list[str]]:
    """IANA suite names per protocol id, in testssl's order."""
    suites: dict[str, list[str]] = {}
    for finding in findings:
        match = CIPHER_ID.match(finding["id"])
        if match:
            protocol = CIPHER_PROTOCOL[match.group(1)]
            suites.setdefault(protocol, []).append(finding["finding"].split()[-1])
    return suites


def problems(protocols: dict[str, str], suites: dict[str, list[str]]) -> list[str]:
    found = []
    for protocol, name in PROTOCOLS.items():
        finding = protocols.get(protocol)
        if finding is None:
            found.append(f"{name}: testssl reported nothing")
        elif protocol in REQUIRED and not finding.startswith("offered"):
            found.append(f"{name} must be offered: {finding}")
        elif protocol not in REQUIRED and not finding.startswith("not offered"):
            found.append(f"{name} must not be offered: {finding}")
    for protocol in REQUIRED:
        if not suites.get(protocol):
            found.append(f"{PROTOCOLS[protocol]}: no cipher suite listed")
    for protocol, names in suites.items():
        found += [f"{PROTOCOLS[protocol]}: {s} is not AEAD" for s in names if not is_aead(s)]
    return found


def is_aead(suite: str) -> bool:
    return any(mark in suite for mark in AEAD)


def main(path: Path) -> int:
    findings = load(path)
    protocols, suites = offered_protocols(findings), offered_suites(findings)
    for protocol, name in PROTOCOLS.items():
        print(f"  {name:8} {protocols.get(protocol, '(no result)')}")
        for suite in suites.get(protocol, []):
            print(f"             {suite}")
    found = problems(protocols, suites)
    for problem in found:
        print(f"FAIL: {problem}")
    if not found:
        print("PASS: only TLS 1.2 and 1.3, only AEAD cipher suites")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
