"""Configuration: environment, TOML, aliases, and errors that name the setting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import ConfigError
from app.main import create_app
from app.settings import Settings, load_settings
from app.sinks import SinkConfigError, build_sinks


def test_defaults_are_the_embedded_setup() -> None:
    s = load_settings()
    assert s.sinks == ["log", "file"]
    assert s.file_path == Path("data/events.jsonl")
    assert s.path == "/events"
    assert s.max_body_bytes == 256 * 1024
    assert s.dedup_window >= 12 * 3600
    assert s.max_token_age >= 12 * 3600


def test_comma_separated_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCON_SIGNATURE_SECRETS", "old-secret, new-secret")
    monkeypatch.setenv("DCON_SINKS", "log,queue")
    s = load_settings()
    assert s.signature_secrets == ["old-secret", "new-secret"]
    assert s.sinks == ["log", "queue"]


def test_dt_signature_secret_is_accepted_as_dt_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DT_SIGNATURE_SECRET", "from-dt-docs")
    assert load_settings().signature_secrets == ["from-dt-docs"]


def test_verify_mode_auto_follows_what_is_configured() -> None:
    """auto = DT's asymmetric scheme, plus the secret one once a secret is set."""
    assert Settings().schemes == ("asymmetric",)
    assert Settings(signature_secrets=["s"]).schemes == ("asymmetric", "secret")
    assert Settings(verify_mode="secret", signature_secrets=["s"]).schemes == ("secret",)
    assert Settings(verify_mode="off").schemes == ()


def test_toml_file_with_environment_taking_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "dcon.toml"
    config.write_text('port = 9001\nsinks = ["log"]\nsignature_secrets = ["toml-secret"]\n')
    monkeypatch.setenv("DCON_CONFIG", str(config))
    monkeypatch.setenv("DCON_PORT", "9002")
    s = load_settings()
    assert s.port == 9002
    assert s.sinks == ["log"]
    assert s.signature_secrets == ["toml-secret"]


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("DCON_PORT", "eighty", "DCON_PORT"),
        ("DCON_PATH", "events", "DCON_PATH"),
        ("DCON_VERIFY_MODE", "maybe", "DCON_VERIFY_MODE"),
        ("DCON_SINK_TIMEOUT", "30", "DCON_SINK_TIMEOUT"),
        ("DCON_MAX_TOKEN_AGE", "-1", "DCON_MAX_TOKEN_AGE"),
        ("DCON_SINKS", "log,log", "DCON_SINKS"),
    ],
)
def test_invalid_setting_names_itself(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, named: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=named):
        load_settings()


def test_secret_mode_without_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCON_VERIFY_MODE", "secret")
    with pytest.raises(ConfigError, match="DCON_SIGNATURE_SECRETS"):
        load_settings()


def test_secret_values_never_appear_in_errors_or_masked_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DCON_SIGNATURE_SECRETS", "hunter2")
    assert "hunter2" not in str(load_settings().masked())


def test_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DCON_CONFIG", "/nonexistent/dcon.toml")
    with pytest.raises(ConfigError, match="DCON_CONFIG"):
        load_settings()


def test_unknown_sink_fails_before_serving_and_lists_the_known_ones() -> None:
    with pytest.raises(SinkConfigError, match=r"available: .*file.*log.*queue"):
        create_app(Settings(sinks=["kafka"]))
    assert [s.name for s in build_sinks(Settings(sinks=["queue", "log"]))] == ["queue", "log"]


def test_cli_refuses_a_bad_setting_with_a_clear_message(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "DCON_PORT": "not-a-port", "HOME": str(tmp_path)}
    for command in (
        [sys.executable, "-m", "app", "serve"],
        [sys.executable, "-m", "uvicorn", "app.main:app"],
    ):
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode != 0
        assert "DCON_PORT" in done.stderr
        assert "Traceback" not in done.stderr


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for field in Settings.model_fields:
        assert f"`DCON_{field.upper()}`" in readme, field


def test_passwords_in_service_urls_are_masked() -> None:
    s = Settings(
        rabbitmq_url="amqp://guest:s3cr3t@127.0.0.1:5672/",
        postgres_dsn="postgresql://dcon:pg-pass@db/dt",
    )
    shown = str(s.masked())
    assert "s3cr3t" not in shown
    assert "pg-pass" not in shown
    assert "amqp://guest:***@127.0.0.1:5672/" in shown
