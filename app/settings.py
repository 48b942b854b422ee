"""All settings in one pydantic-settings class: ``DCON_*`` environment variables, then an
optional TOML file named by ``DCON_CONFIG``. Validated before the port opens."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from app.errors import ConfigError

DT_OIDC_URL = (
    "https://identity.disruptive-technologies.com/data-connector/.well-known/openid-configuration"
)
DT_ISSUER = "https://identity.disruptive-technologies.com/data-connector"
TWELVE_HOURS = 12 * 3600
# Beyond the sink deadline: reading the body, verifying and the dedup claim.
SHUTDOWN_MARGIN = 5.0

VerifyMode = Literal["auto", "secret", "asymmetric", "both", "off"]
CommaList = Annotated[list[str], NoDecode]


MASK = "***"
# Everything between "://" and the last "@" is user info. Taking the *last* "@" over-masks a
# URL with "@" in its path, which is the safe way to be wrong.
_USER_INFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>.*)@")


def url_password(url: str) -> str | None:
    """The password in a service URL's user info, if it has one."""
    match = _USER_INFO.match(url)
    if match is None:
        return None
    _, colon, password = match["info"].partition(":")
    return password if colon and password else None


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    match = _USER_INFO.match(url)
    if match is None or url_password(url) is None:
        return url
    user = match["info"].partition(":")[0]
    return f"{match['scheme']}{user}:{MASK}@{url[match.end() :]}"


def is_url_field(name: str) -> bool:
    return name.lower().endswith(("_url", "_dsn"))


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="DCON_",
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    # --- serving -------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8443, ge=1, le=65535, description="Port to listen on.")
    path: str = Field("/events", description="URL path DT posts to (the Data Connector URL).")
    max_body_bytes: int = Field(
        256 * 1024, ge=1024, description="Largest request body accepted; larger gets 413."
    )
    tls: bool = Field(
        True, description="Serve HTTPS. false = plain HTTP behind a TLS-terminating proxy."
    )
    tls_certfile: Path = Field(
        Path("certs/server.pem"), description="Certificate chain (PEM, server first)."
    )
    tls_keyfile: Path = Field(Path("certs/server-key.pem"), description="Its private key (PEM).")
    tls_self_signed: bool = Field(
        True,
        description="Create a local CA and certificate at those paths when both are missing "
        "(local use only: DT refuses self-signed certificates).",
    )
    tls_reload_interval: float = Field(
        30, ge=0, description="Seconds between checks for renewed certificate files; 0 = off."
    )
    proxy_headers: bool = Field(
        False, description="Trust X-Forwarded-For/-Proto from DCON_FORWARDED_ALLOW_IPS."
    )
    forwarded_allow_ips: str = Field(
        "127.0.0.1", description="Comma-separated proxy addresses (or *) whose headers count."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the receiver and uvicorn."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Log lines as JSON or text; auto = text on a terminal, else JSON."
    )

    # --- verification --------------------------------------------------------------------
    verify_mode: VerifyMode = Field(
        "auto",
        description="Which DT signatures are required: auto, asymmetric, secret, both or off. "
        "auto = asymmetric, plus secret when secrets are configured.",
    )
    signature_secrets: CommaList = Field(
        default_factory=list,
        validation_alias=AliasChoices(
            "signature_secrets", "DCON_SIGNATURE_SECRETS", "DT_SIGNATURE_SECRET"
        ),
        description="Data Connector signature secrets, comma-separated; several at once for "
        "rotation. DT_SIGNATURE_SECRET is accepted too.",
    )
    max_token_age: int = Field(
        TWELVE_HOURS + 3600,
        ge=0,
        description="Seconds after iat a token is still accepted (tokens live until "
        "max(exp, iat + this)). 0 = honour exp only.",
    )
    token_leeway: int = Field(60, ge=0, le=600, description="Clock skew allowed, in seconds.")
    dt_oidc_url: str = Field(DT_OIDC_URL, description="DT's discovery document for its keys.")
    dt_issuer: str = Field(DT_ISSUER, description="Required iss of the asymmetric token.")
    dt_org_id: str | None = Field(
        None, description="Your DT organization ID; required sub of the asymmetric token."
    )
    dt_jwks_file: Path | None = Field(
        None, description="Pin DT's JWKS from this file instead of fetching it."
    )
    dt_jwks_refresh: int = Field(
        900, ge=10, description="Seconds between background refreshes of DT's keys."
    )
    dt_jwks_min_interval: int = Field(
        60, ge=1, description="At most one key refresh per this many seconds on an unknown kid."
    )
    asymmetric_header: str = Field(
        "DT-Asymmetric-Signature", description="Header carrying DT's asymmetric signature."
    )

    # --- dedup ---------------------------------------------------------------------------
    dedup_window: int = Field(
        TWELVE_HOURS + 3600,
        ge=0,
        description="Seconds an eventId is remembered; covers DT's 12 h retry horizon.",
    )
    dedup_max_entries: int = Field(
        500_000,
        ge=1,
        description="Most eventIds remembered in memory (about 150 bytes each); the oldest "
        "go first. 500,000 cover 13 h at 10 events/s.",
    )
    dedup_store: Literal["auto", "memory", "sqlite", "redis"] = Field(
        "auto",
        description="Where eventIds are remembered: memory (one process), sqlite (one host, "
        "survives restarts), redis (all replicas). auto = memory with one worker and no "
        "spool, else sqlite.",
    )
    dedup_warm_bytes: int = Field(
        16 * 2**20,
        ge=0,
        description="With the memory store and the file sink: at start-up, remember the "
        "eventIds in the newest this-many bytes of the sink's files, so that events stored "
        "just before a crash or restart are known when DT sends them again (0: off).",
    )
    dedup_path: Path = Field(
        Path("data/dedup.sqlite3"),
        description="SQLite file of the sqlite dedup store (auto in spool mode: "
        "DCON_SPOOL_DIR/dedup.db).",
    )
    dedup_redis_url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis server of the redis dedup store."
    )
    dedup_redis_prefix: str = Field(
        "dcon:dedup:",
        min_length=1,
        description="Key prefix of the redis dedup store; receivers sharing a prefix share "
        "one window.",
    )
    workers: int = Field(1, ge=1, le=64, description="Worker processes of `dcon-receiver serve`.")

    # --- delivery ------------------------------------------------------------------------
    sinks: CommaList = Field(
        default_factory=lambda: ["log", "file"],
        description="Sinks, comma-separated: log, file, queue, redis, nats, rabbitmq, mqtt, "
        "postgres. NAME:type+type routes only those event types to a sink.",
    )
    sink_timeout: float = Field(
        5.0, gt=0, le=9, description="Deadline in seconds for all sinks; past it, 503."
    )
    shutdown_timeout: float | None = Field(
        None,
        gt=0,
        description="Seconds SIGTERM/SIGINT waits for in-flight requests before cancelling "
        "them; at least DCON_SINK_TIMEOUT. Unset = DCON_SINK_TIMEOUT + 5.",
    )
    retry_after: int = Field(30, ge=1, description="Retry-After seconds sent with a 503.")
    file_path: Path = Field(Path("data/events.jsonl"), description="JSON Lines file of events.")
    file_fsync: bool = Field(True, description="fsync before answering 200 (group commit).")
    file_max_bytes: int = Field(
        100 * 1024 * 1024, ge=0, description="Rotate the file past this size; 0 = never."
    )
    queue_maxsize: int = Field(10_000, ge=1, description="Capacity of the in-process queue.")

    # --- spool mode (see the README's "Spool mode") -----------------------------------------
    spool: bool = Field(
        False,
        description="Answer 200 once the event is fsynced in a local spool; a background "
        "forwarder delivers it to the sinks, retrying until they take it.",
    )
    spool_dir: Path = Field(
        Path("data/spool"),
        description="Spool files, forwarding position, dead letters and (with "
        "DCON_DEDUP_STORE=auto) the dedup window.",
    )
    spool_max_bytes: int = Field(
        1024**3,
        ge=1024,
        description="Most bytes held in the spool not yet forwarded; past it, 503 spool_full.",
    )
    spool_segment_bytes: int = Field(
        64 * 1024**2,
        ge=4096,
        description="Start a new spool file past this size; forwarded files are deleted.",
    )
    spool_retry_max: float = Field(
        60, gt=0, description="Longest wait in seconds between retries of a failing sink."
    )
    spool_concurrency: int = Field(
        64, ge=1, le=1024, description="Events the forwarder delivers at once."
    )

    # --- broker and database sinks (each needs its extra: pip install "dcon-receiver[redis]")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis server for `redis`.")
    redis_stream: str = Field(
        "dt:events", description="Stream name (template: {projectId}, {eventType}, ...)."
    )
    redis_maxlen: int = Field(
        1_000_000, ge=0, description="Approximate MAXLEN trim per stream; 0 = never trim."
    )
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server for `nats`.")
    nats_stream: str = Field("DT_EVENTS", description="JetStream stream, created if missing.")
    nats_subject: str = Field(
        "dt.{projectId}.{deviceType}.{eventType}", description="Subject template."
    )
    nats_duplicate_window: float = Field(
        TWELVE_HOURS + 3600,
        gt=0,
        description="Seconds JetStream remembers Nats-Msg-Id for dedup (covers DT's retries).",
    )
    rabbitmq_url: str = Field(
        "amqp://guest:guest@127.0.0.1:5672/", description="AMQP server for `rabbitmq`."
    )
    rabbitmq_exchange: str = Field("dt.events", description="Durable topic exchange.")
    rabbitmq_routing_key: str = Field(
        "{projectId}.{deviceType}.{eventType}", description="Routing key template."
    )
    mqtt_url: str = Field(
        "mqtt://127.0.0.1:1883",
        description="MQTT broker for `mqtt` (mqtt:// or mqtts://, user:password@ allowed).",
    )
    mqtt_topic: str = Field("dt/{projectId}/{deviceId}/{eventType}", description="Topic template.")
    mqtt_retain: bool = Field(False, description="Retain: each topic keeps its latest event.")
    postgres_dsn: str = Field(
        "postgresql://127.0.0.1:5432/postgres", description="PostgreSQL for `postgres`."
    )
    postgres_table: str = Field("dt_events", description="Table, created on first use.")

    @field_validator("signature_secrets", "sinks", mode="before")
    @classmethod
    def _commas(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @field_validator("sinks")
    @classmethod
    def _sinks(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one sink is required")
        names = [route.partition(":")[0] for route in value]
        if len(set(names)) != len(names):
            raise ValueError("a sink is listed twice")
        for route in value:
            name, _, types = route.partition(":")
            if not name.isidentifier() or (":" in route and not all(types.split("+"))):
                raise ValueError(f"{route!r} is not NAME or NAME:type+type")
        return value

    @property
    def sink_routes(self) -> list[tuple[str, frozenset[str] | None]]:
        """Each sink's name and the event types routed to it (None = every event)."""
        routes = []
        for route in self.sinks:
            name, sep, types = route.partition(":")
            routes.append((name, frozenset(types.split("+")) if sep else None))
        return routes

    @model_validator(mode="after")
    def _mode_has_secret(self) -> Settings:
        if self.verify_mode in ("secret", "both") and not self.signature_secrets:
            raise ValueError(
                f"DCON_VERIFY_MODE={self.verify_mode} needs DCON_SIGNATURE_SECRETS "
                "(or DT_SIGNATURE_SECRET)"
            )
        return self

    @model_validator(mode="after")
    def _shutdown_outlasts_sinks(self) -> Settings:
        # A request still storing its event when the wait ends is cancelled without an
        # answer; waiting at least one sink deadline lets each one end with 200 or 503.
        if self.shutdown_timeout is not None and self.shutdown_timeout < self.sink_timeout:
            raise ValueError(
                f"DCON_SHUTDOWN_TIMEOUT={self.shutdown_timeout:g} is shorter than "
                f"DCON_SINK_TIMEOUT={self.sink_timeout:g}: requests in flight at shutdown "
                "would be cut off without an answer"
            )
        return self

    @property
    def graceful_shutdown_seconds(self) -> float:
        """How long a stopping receiver lets in-flight requests finish."""
        if self.shutdown_timeout is not None:
            return self.shutdown_timeout
        return self.sink_timeout + SHUTDOWN_MARGIN

    @model_validator(mode="after")
    def _safe_with_workers(self) -> Settings:
        names = [name for name, _ in self.sink_routes]
        reason = unsafe_with_workers(self.workers, self.dedup_store, names)
        if reason is not None:
            raise ValueError(reason)
        return self

    def local_url(self, path: str) -> str:
        """``path`` on this receiver as seen from the same host (for health and self tests)."""
        wildcard = self.host in ("0.0.0.0", "::", "")  # noqa: S104 - compared, not bound
        host = "127.0.0.1" if wildcard else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

    @property
    def dedup_kind(self) -> str:
        """The dedup store in use once ``auto`` is resolved."""
        if self.dedup_store == "auto":
            # The spool outlives a restart, so its dedup window must too.
            return "memory" if self.workers == 1 and not self.spool else "sqlite"
        return self.dedup_store

    @property
    def schemes(self) -> tuple[str, ...]:
        """The signature schemes every request must pass, in the order they are checked."""
        mode = self.verify_mode
        if mode == "auto":
            mode = "both" if self.signature_secrets else "asymmetric"
        return {
            "asymmetric": ("asymmetric",),
            "secret": ("secret",),
            "both": ("asymmetric", "secret"),
            "off": (),
        }[mode]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config = os.environ.get("DCON_CONFIG")
        if config:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config)))
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """The effective settings with every secret hidden, for logs and ``config``."""
        data = self.model_dump(mode="json")
        data["signature_secrets"] = [f"***({len(s)} chars)" for s in self.signature_secrets]
        for key, value in data.items():
            if is_url_field(key) and isinstance(value, str):
                data[key] = mask_url(value)
        return data


def unsafe_with_workers(workers: int, dedup_store: str, sink_names: Iterable[str]) -> str | None:
    """Why these settings cannot run as ``workers`` processes, or None if they can."""
    if workers == 1:
        return None
    if dedup_store == "memory":
        return (
            f"DCON_DEDUP_STORE=memory remembers eventIds in each process, so with {workers} "
            "workers a copy reaching another worker would be stored again; use sqlite (one "
            "host, the default for several workers) or redis (several hosts)"
        )
    if "queue" in sink_names:
        return (
            f"DCON_SINKS: the queue sink is a queue inside one process, so {workers} workers "
            f"would fill {workers} separate queues; run one worker, or use a broker sink"
        )
    return None


def env_name(field: str) -> str:
    return f"DCON_{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and TOML), or raise ``ConfigError`` naming the
    setting that is wrong."""
    config = os.environ.get("DCON_CONFIG")
    if config and not Path(config).is_file():
        raise ConfigError(f"DCON_CONFIG: no such file {config!r}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        name = env_name(loc[0]) if loc else "settings"
        got = error.get("input")
        shown = "" if loc and "secret" in loc[0] else f" (got {got!r})"
        lines.append(f"{name}: {error['msg']}{shown if loc else ''}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
