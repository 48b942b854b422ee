"""What DT users run today, for ``bench/http.py``: Flask + ``dtintegrations``.

    gunicorn -w 1 -k sync --chdir bench baseline_flask:app

DT's documented receiver: ``HttpPush.from_provider`` checks ``X-Dt-Signature`` (HS256 and
the body's SHA-256) and builds DT's event object; each event is then appended as one JSON
line (buffered write + flush, no fsync) to ``BASELINE_JSONL``. The secret comes from
``DT_SIGNATURE_SECRET``. It runs in ``bench/.venv-baseline``, never in the project's venv.
"""

from __future__ import annotations

import json
import os
from typing import Any

import disruptive  # type: ignore[import-not-found, unused-ignore]
from dtintegrations import data_connector, provider  # type: ignore[import-not-found, unused-ignore]
from flask import Flask, request  # type: ignore[import-not-found, unused-ignore]

SECRET = os.environ["DT_SIGNATURE_SECRET"]
OUT = open(os.environ["BASELINE_JSONL"], "ab")  # noqa: SIM115 - open for the worker's life


def events() -> Any:
    try:
        payload = data_connector.HttpPush.from_provider(
            request=request, provider=provider.FLASK, secret=SECRET
        )
    except disruptive.errors.ConfigurationError as exc:
        return {"error": str(exc)}, 401
    event = payload.event
    meta = {"eventId": event.event_id, "eventType": event.event_type, "deviceId": event.device_id}
    head = json.dumps(meta, separators=(",", ":"))
    OUT.write(head[:-1].encode() + b',"body":' + request.get_data() + b"}\n")
    OUT.flush()
    return {"status": "accepted", "eventId": event.event_id}


app = Flask(__name__)
app.add_url_rule("/events", view_func=events, methods=["POST"])
