"""`config` shows what `serve` would run with, never a secret, and refuses what it would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from app.cli import main
from app.cli.config import Redactor
from app.settings import mask_url
from tests.dt_keys import SigningKey, jwks

SECRETS = ("first-s3cret-value", "second-s3cret-value")
PASSWORDS = ("hunter2", "pa/ss", "p@ss")
ENV = {
    "DCON_SIGNATURE_SECRETS": ",".join(SECRETS),
    "DCON_RABBITMQ_URL": "amqp://guest:hunter2@mq.example/",
    "DCON_MQTT_URL": "mqtts://user:pa/ss@broker.example:8883",
    "DCON_POSTGRES_DSN": "postgresql://app:p@ss@db.example/events",
    "DCON_DT_ORG_ID": "my-org",
}


def config(*args: str, **env: str) -> Result:
    return CliRunner().invoke(main, ["config", *args], env=env)


def assert_nothing_secret(text: str) -> None:
    for secret in (*SECRETS, *PASSWORDS):
        assert secret not in text


@pytest.mark.parametrize("fmt", [(), ("--json",), ("--check",)], ids=["text", "json", "check"])
def test_no_secret_and_no_url_password_is_ever_printed(fmt: tuple[str, ...]) -> None:
    result = config(*fmt, **ENV)
    assert result.exit_code == 0, result.output
    assert_nothing_secret(result.output)


def test_the_text_names_schemes_sinks_and_where_values_came_from() -> None:
    result = config(DCON_SINKS="log,file:co2+temperature", **ENV)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "verification: asymmetric + secret (DCON_VERIFY_MODE=auto)" in out
    assert "secret: 2 secret(s)" in out
    assert "sub my-org" in out
    assert "  file: co2, temperature" in out
    assert "  log: every event" in out
    assert "DCON_MQTT_URL" in out
    assert "mqtts://user:***@broker.example:8883  [env]" in out
    assert "DCON_PORT                   8443  [default]" in out


def test_json_is_machine_readable() -> None:
    result = config("--json", DCON_VERIFY_MODE="secret", **ENV)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["valid"] is True
    assert report["verification"]["schemes"] == ["secret"]
    assert report["verification"]["secrets"] == 2
    assert report["sinks"] == [{"name": "log", "types": None}, {"name": "file", "types": None}]
    assert report["settings"]["signature_secrets"] == ["***(18 chars)", "***(19 chars)"]
    assert report["settings"]["rabbitmq_url"] == "amqp://guest:***@mq.example/"
    assert report["sources"]["signature_secrets"] == "env"
    assert report["sources"]["port"] == "default"
    assert report["warnings"] == []


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DCON_PORT": "99999"}, "DCON_PORT"),
        ({"DCON_SINKS": "log,nosuch"}, "DCON_SINKS"),
        ({"DCON_VERIFY_MODE": "secret"}, "DCON_SIGNATURE_SECRETS"),
        ({"DCON_SINK_TIMEOUT": "soon"}, "DCON_SINK_TIMEOUT"),
    ],
    ids=["port", "unknown-sink", "mode-without-secret", "not-a-number"],
)
def test_an_invalid_setting_exits_2_naming_it(env: dict[str, str], named: str) -> None:
    result = config(**env)
    assert result.exit_code == 2, result.output
    assert named in result.stderr


def test_an_invalid_setting_in_json_mode_is_json_too() -> None:
    result = config("--json", DCON_PORT="0")
    assert result.exit_code == 2
    assert "DCON_PORT" in json.loads(result.stdout)["error"]


def test_error_messages_are_redacted_with_the_raw_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Errors raised before settings exist (or by a sink echoing its URL) are masked too."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    redact = Redactor.from_environment()
    message = f"DCON_MQTT_URL: bad port (got {ENV['DCON_MQTT_URL']!r}); {SECRETS[1]}"
    shown = redact(message)
    assert_nothing_secret(shown)
    assert shown.startswith("DCON_MQTT_URL: bad port (got 'mqtts://user:***@broker.example")


def test_a_toml_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    toml = tmp_path / "dcon.toml"
    toml.write_text('port = 9443\nsinks = ["log"]\nsignature_secrets = ["toml-s3cret-value"]\n')
    result = config("--config", str(toml), "--json", DCON_PORT="9444")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config_file"] == str(toml)
    assert report["settings"]["port"] == 9444
    assert report["sources"]["port"] == "env"
    assert report["sources"]["sinks"] == "file"
    assert "toml-s3cret-value" not in result.stdout


def test_a_pinned_jwks_is_read_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "jwks.json"
    good.write_text(json.dumps(jwks([SigningKey.generate("k1")])))
    ok = config("--json", DCON_DT_JWKS_FILE=str(good))
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["verification"]["keys"]["kids"] == ["k1"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    refused = config(DCON_DT_JWKS_FILE=str(bad))
    assert refused.exit_code == 2
    assert "DCON_DT_JWKS_FILE" in refused.stderr


def test_warnings_are_said_before_the_receiver_starts() -> None:
    result = config(DCON_VERIFY_MODE="off")
    assert result.exit_code == 0, result.output
    assert "warning: SIGNATURE VERIFICATION IS OFF" in result.stdout


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@host/0", "redis://:***@host/0"),
        ("amqp://user:pa/ss@host/", "amqp://user:***@host/"),
        ("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x"),
        ("mqtt://user@host", "mqtt://user@host"),
    ],
)
def test_mask_url_hides_any_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown
