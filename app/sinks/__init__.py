"""Sinks by name.

Built-in sinks are a table of import strings, imported only when selected, so a broker
driver that is not installed costs nothing until someone asks for its sink. Third-party
packages add sinks through the ``dcon_receiver.sinks`` entry-point group, pointing at a
class with ``from_settings(settings)``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from app.sinks.base import PermanentSinkError, Sink, SinkConfigError, SinkError

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = [
    "BUILTIN",
    "PermanentSinkError",
    "Sink",
    "SinkConfigError",
    "SinkError",
    "available",
    "build_sinks",
]

ENTRY_POINT_GROUP = "dcon_receiver.sinks"

# name -> (import string, optional extra that provides its driver)
BUILTIN: dict[str, tuple[str, str | None]] = {
    "log": ("app.sinks.log:LogSink", None),
    "file": ("app.sinks.file:FileSink", None),
    "queue": ("app.sinks.memory:QueueSink", None),
    "redis": ("app.sinks.redis:RedisSink", "redis"),
    "nats": ("app.sinks.nats:NatsSink", "nats"),
    "rabbitmq": ("app.sinks.rabbitmq:RabbitMQSink", "rabbitmq"),
    "mqtt": ("app.sinks.mqtt:MqttSink", "mqtt"),
    "postgres": ("app.sinks.postgres:PostgresSink", "postgres"),
}


def available() -> list[str]:
    plugins = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return sorted(set(BUILTIN) | plugins)


def _resolve(name: str) -> Any:
    if name in BUILTIN:
        target, extra = BUILTIN[name]
        module_name, _, attr = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            hint = f' (pip install "dcon-receiver[{extra}]")' if extra else ""
            raise SinkConfigError(f"sink {name!r} needs {exc.name}{hint}") from exc
        return getattr(module, attr)
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            return ep.load()
        except ImportError as exc:
            raise SinkConfigError(f"sink {name!r} ({ep.value}) cannot be imported: {exc}") from exc
    raise SinkConfigError(f"DCON_SINKS: unknown sink {name!r}; available: {', '.join(available())}")


def build_sinks(settings: Settings) -> list[Sink]:
    """Build (without any I/O) every sink named in ``settings.sinks``, in order."""
    sinks = []
    for name, _ in settings.sink_routes:
        factory = _resolve(name)
        if not callable(getattr(factory, "from_settings", None)):
            raise SinkConfigError(f"sink {name!r} does not implement the Sink interface")
        sink = factory.from_settings(settings)
        if not isinstance(sink, Sink):
            raise SinkConfigError(f"sink {name!r} does not implement the Sink interface")
        sinks.append(sink)
    return sinks
