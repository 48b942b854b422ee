"""Logging: JSON lines for machines, a readable line for people.

``DCON_LOG_FORMAT=auto`` picks text when stderr is a terminal and JSON otherwise, so a
laptop shows readable lines and a container feeds a log shipper. The access log is one
line per ingest request (logger ``dcon.access``) with its fields as JSON keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
# uvicorn adds "color_message" to its own records: the message again, with terminal
# colour codes for its own formatter; as a field it only repeats the message in escapes.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
}


# json.dumps with these arguments builds a new encoder per call: one line per request.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)
_ENCODE = _ENCODER.encode


def _flat_encoder() -> Callable[[Mapping[str, object]], str]:
    """``_ENCODE`` for the access log's own lines: a flat mapping of strings, numbers and
    None, which cannot hold a cycle. ``JSONEncoder.encode`` makes a new C encoder (and a
    closure) on every call, a third of what encoding the line cost; this one is made once,
    without the check for cycles (a test holds its lines equal to ``_ENCODE``'s)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python built without the _json accelerator
        return _ENCODE
    encoder = _ENCODER
    iterencode = make(
        None, encoder.default,
        json.encoder.encode_basestring_ascii if encoder.ensure_ascii
        else json.encoder.encode_basestring,
        None, encoder.key_separator, encoder.item_separator, encoder.sort_keys,
        encoder.skipkeys, encoder.allow_nan,
    )  # fmt: skip

    def encode(line: Mapping[str, object]) -> str:
        return "".join(iterencode(line, 0))

    return encode


_ENCODE_FLAT = _flat_encoder()


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


# The date and time of the last whole second a timestamp was made for, as text: most lines
# fall in the same second as the one before, and formatting a datetime per line cost a
# microsecond, a tenth of an access line.
_last_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """``created`` (seconds since the epoch) in ISO 8601, UTC, to the microsecond, with a Z."""
    global _last_second
    second = int(created)
    micro = round((created - second) * 1_000_000)  # to the nearest, as datetime rounds
    if micro == 1_000_000:
        second, micro = second + 1, 0
    last, text = _last_second
    if second != last:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return f"{text}.{micro:06d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extra(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _ENCODE(line)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _extra(record)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return text


class AccessLog:
    """Writes the access log: one info line per ingest request, on logger ``dcon.access``.

    Through ``logging``, each line is a LogRecord, a walk over the loggers and handlers, and
    a formatter that sifts the record's attributes for the fields: about 1,100 interpreted
    opcodes, half as many again as the rest of the request (measured in-process). When
    logging is set up as ``configure_logging`` leaves it in JSON (the logger has no
    handlers or filters of its own and ``dcon``'s one handler is a StreamHandler with
    ``JsonFormatter``), the line that formatter would give is built here and written to
    that handler's stream directly. Any other setup, a changed one included, gets an
    ordinary logging call.

    Direct lines are written once per turn of the event loop, all of that turn's lines in
    one write: a group commit answers dozens of requests in one turn, and a write (a
    system call, with a flush) per line cost the default configuration about 9% of its
    throughput. A process killed outright can lose the last turn's lines, never more.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        # Direct lines not yet written, and the handler and loop they were written under.
        self._lines: list[str] = []
        self._handler: logging.StreamHandler[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def write(self, message: str, fields: Mapping[str, object]) -> None:
        """Log ``message`` with ``fields`` as its JSON keys (``extra`` of a logging call)."""
        handler = self._direct_handler()
        if handler is None:
            self.logger.info("%s", message, extra=fields)
            return
        line: dict[str, object] = {
            "ts": _timestamp(time.time()),
            "level": "info",
            "logger": self.logger.name,
            "msg": message,
        }
        line.update(fields)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # none to come back to it: written at once, below
        if self._lines and (handler is not self._handler or loop is not self._loop):
            # Logging was set up anew, or these lines were left by a loop that stopped
            # before its turn ended: they go first.
            self.flush()
        self._handler, self._loop = handler, loop
        self._lines.append(_ENCODE_FLAT(line) + handler.terminator)
        if loop is None:
            self.flush()
        elif len(self._lines) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the direct lines not yet written (the loop calls it once per turn)."""
        handler, lines = self._handler, self._lines
        if handler is None or not lines:
            return
        self._lines = []
        with handler.lock:  # type: ignore[union-attr]  # set by Handler.createLock
            try:
                handler.stream.write("".join(lines))
                handler.stream.flush()
            except Exception:  # as StreamHandler.emit does: report it and go on
                handler.handleError(logging.makeLogRecord({"msg": lines[0], "args": None}))

    def _direct_handler(self) -> logging.StreamHandler[Any] | None:
        logger = self.logger
        parent = logger.parent
        if logger.handlers or logger.filters or not logger.propagate or parent is None:
            return None
        handlers = parent.handlers
        if len(handlers) != 1 or parent.filters or parent.propagate:
            return None
        handler = handlers[0]
        if (
            type(handler) is logging.StreamHandler
            and type(handler.formatter) is JsonFormatter
            and not handler.filters
            and handler.level <= logging.INFO
        ):
            return handler
        return None


def use_json(log_format: str) -> bool:
    return log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """A dictConfig for our loggers and uvicorn's, all through one formatter on stderr."""
    formatter = "json" if use_json(log_format) else "text"
    handler = {
        "class": "logging.StreamHandler",
        "formatter": formatter,
        "stream": "ext://sys.stderr",
    }
    logger = {"handlers": ["stderr"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": JsonFormatter},
            "text": {"()": TextFormatter},
        },
        "handlers": {"stderr": handler},
        "loggers": {
            "dcon": logger,
            "uvicorn": logger,
            "uvicorn.error": {"level": level.upper()},
            # Broker drivers log a traceback per dropped connection; the sink already reports
            # each failure once (503 + an error line naming the sink), so keep only theirs.
            "aiormq": {"level": "CRITICAL"},
            "aio_pika": {"level": "CRITICAL"},
        },
    }


def configure_logging(level: str, log_format: str = "auto") -> None:
    logging.config.dictConfig(logging_config(level, log_format))
    # Neither format shows the thread, process or source line of a record, so the logging
    # module need not look them up for every line (its HOWTO's advice for speed): at
    # level info that is one access line per request.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # the HOWTO's own switch
