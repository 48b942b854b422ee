"""HTTPS as we serve it: TLS 1.2 and 1.3 only, AEAD cipher suites only, certificates that
can be renewed on disk without a restart."""

from __future__ import annotations

import logging
import ssl
import threading
from pathlib import Path
from typing import Any

import uvicorn

log = logging.getLogger("dcon.tls")

# TLS 1.2 suites with forward secrecy and authenticated encryption; TLS 1.3 suites are all
# AEAD already. Python's default list still offers CBC suites for TLS 1.2.
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(AEAD_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE


class CertificateWatcher(threading.Thread):
    """Reload the certificate chain into the live context when its files change.

    New handshakes use the new certificate; open connections keep theirs. A half-written
    renewal (new certificate, old key) fails to load and is simply tried again later.
    """

    def __init__(self, context: ssl.SSLContext, cert: Path, key: Path, interval: float) -> None:
        super().__init__(name="tls-cert-watcher", daemon=True)
        self.context = context
        self.cert = cert
        self.key = key
        self.interval = interval
        self.stopped = threading.Event()
        self._stamp = self._files_stamp()
        self.current = context
        context.sni_callback = self._select

    def _select(
        self, conn: ssl.SSLObject | ssl.SSLSocket, name: str | None, context: ssl.SSLContext
    ) -> None:
        # OpenSSL calls this for every handshake, with or without SNI: serve the newest pair.
        current = self.current
        if current is not context:
            conn.context = current

    def _files_stamp(self) -> tuple[float, float] | None:
        try:
            return (self.cert.stat().st_mtime, self.key.stat().st_mtime)
        except OSError:
            return None

    def check(self) -> bool:
        """Reload if the files changed since the last load; say whether it reloaded."""
        stamp = self._files_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        # A fresh context, swapped in whole: loading into the live one would drop its key on a
        # half-written renewal, and keep an old certificate of another key type forever.
        fresh = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        harden(fresh)
        try:
            fresh.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            log.warning("renewed certificate not loaded yet (%s); will retry", exc)
            return False
        self.current = fresh
        self._stamp = stamp
        log.info("loaded renewed certificate from %s", self.cert)
        return True

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.check()


class ServerConfig(uvicorn.Config):
    """uvicorn's config with our TLS policy applied to the context it builds."""

    def __init__(self, app: Any, *, reload_interval: float = 0, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.reload_interval = reload_interval
        self.watcher: CertificateWatcher | None = None

    def load(self) -> None:
        super().load()
        if self.ssl is None:
            return
        harden(self.ssl)
        cert, key = self.ssl_certfile, self.ssl_keyfile
        if self.reload_interval > 0 and self.watcher is None and cert and key:
            self.watcher = CertificateWatcher(self.ssl, Path(cert), Path(key), self.reload_interval)
            self.watcher.start()
