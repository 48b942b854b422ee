"""``dcon-receiver``: serve the receiver, emulate DT, manage certificates and keys."""

from __future__ import annotations

import click

from app import __version__
from app.cli.config import config
from app.cli.keys import certs, dev_keys
from app.cli.replay import replay
from app.cli.selftest import selftest
from app.cli.send import send
from app.cli.serve import healthcheck, serve
from app.cli.verify import verify


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dcon-receiver")
def main() -> None:
    """Receiver for Disruptive Technologies Data Connectors."""


for command in (serve, send, replay, selftest, certs, dev_keys, healthcheck, verify, config):
    main.add_command(command)
