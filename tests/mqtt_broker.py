"""Private MQTT brokers for the mqtt sink's tests; the shared Mosquitto is never touched.

``mosquitto`` runs a Mosquitto of our own on a free port, with an ACL file, to see what
a refusing broker does. ``MqttV311Broker`` is a tiny fake that refuses MQTT 5 and speaks
just enough 3.1.1 (CONNECT, PUBLISH at QoS 1, UNSUBSCRIBE, PINGREQ) to test the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise RuntimeError(f"private mosquitto did not start on port {port}")


def _write_config(directory: Path, port: int, acl: str) -> Path:
    # Mosquitto started as root drops to its own user before it reads the ACL file.
    directory.chmod(0o755)  # the files hold nothing secret
    (directory / "acl").write_text(acl)
    config = directory / "mosquitto.conf"
    config.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"acl_file {directory / 'acl'}\npersistence false\nlog_dest none\n"
    )
    for path in (config, directory / "acl"):
        path.chmod(0o644)
    return config


@contextlib.asynccontextmanager
async def mosquitto(acl: str) -> AsyncIterator[int]:
    """A private Mosquitto on a free port with this ACL; yields the port."""
    binary = shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin"
    )
    if not binary:
        pytest.skip("mosquitto is not installed")
    with tempfile.TemporaryDirectory(prefix="dcon-mqtt-") as tmp:
        port = free_port()
        config = _write_config(Path(tmp), port, acl)
        process = subprocess.Popen(  # noqa: ASYNC220 - a short, non-blocking spawn
            [binary, "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await _wait_listening(port, process)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class MqttV311Broker:
    """A fake broker that speaks MQTT 3.1.1 only and records every PUBLISH it acknowledges."""

    def __init__(self) -> None:
        self.port = 0
        self.protocols: list[int] = []  # the protocol level of every CONNECT
        self.published: list[tuple[str, bytes]] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> MqttV311Broker:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while packet := await self._packet(reader):
                kind, body = packet
                if not self._answer(kind, body, writer):
                    break
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _packet(self, reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
        head = await reader.read(1)
        if not head:
            return None
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return head[0], await reader.readexactly(length)

    def _answer(self, kind: int, body: bytes, writer: asyncio.StreamWriter) -> bool:
        packet_type = kind >> 4
        if packet_type == 1:  # CONNECT: 0x00 0x04 "MQTT" level ...
            level = body[6]
            self.protocols.append(level)
            writer.write(bytes([0x20, 0x02, 0x00, 0x00 if level == 4 else 0x01]))
            return level == 4
        if packet_type == 3:  # PUBLISH at QoS 1: topic, packet id, payload (no properties)
            size = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + size].decode()
            mid = body[2 + size : 4 + size]
            self.published.append((topic, body[4 + size :]))
            writer.write(bytes([0x40, 0x02]) + mid)
        elif packet_type == 10:  # UNSUBSCRIBE
            writer.write(bytes([0xB0, 0x02]) + body[:2])
        elif packet_type == 12:  # PINGREQ
            writer.write(bytes([0xD0, 0x00]))
        return packet_type != 14  # DISCONNECT ends the session
