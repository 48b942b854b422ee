"""`dcon-receiver selftest` against a real receiver over HTTPS."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_serve import ROOT, base_env, ca_file, free_port, running

pytestmark = pytest.mark.slow


def selftest(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "selftest", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_selftest_passes_and_reports_certificate_signature_and_sinks(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(
        tmp_path, DCON_PORT=str(port), DCON_VERIFY_MODE="secret", DCON_SIGNATURE_SECRETS="st"
    )
    with running([sys.executable, "-m", "app", "serve"], env, port):
        done = selftest(env, "--cacert", ca_file(env))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "TLSv1.3" in out or "TLSv1.2" in out
    assert "days left" in out
    assert "not publicly trusted" in out  # a local CA: DT would refuse it, and we say so
    assert "signature accepted; every configured sink confirmed" in out
    assert "file sink: the event is in" in out
    assert out.rstrip().endswith("PASS")
    assert "dcon-selftest" in (tmp_path / "data" / "events.jsonl").read_text()


def test_selftest_fails_on_a_wrong_secret_and_names_the_reason(tmp_path: Path) -> None:
    port = free_port()
    env = base_env(
        tmp_path, DCON_PORT=str(port), DCON_VERIFY_MODE="secret", DCON_SIGNATURE_SECRETS="st"
    )
    with running([sys.executable, "-m", "app", "serve"], env, port):
        done = selftest(env, "--cacert", ca_file(env), "--secret", "not-it")
    assert done.returncode == 1
    assert "signature refused: invalid_signature" in done.stdout
    assert "FAIL" in done.stdout
