"""Notifications reach a real webhook on loopback; a webhook that is down never fails a step."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from tests.integration.conftest import free_port
from training.notify import notify


def test_event_is_posted_to_the_webhook(cfg) -> None:
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg.pipeline.webhook_url = f"http://127.0.0.1:{server.server_port}/hook"
        notify(cfg, "gate_refused", "leukemia-classifier v3 was not promoted", version="3")
    finally:
        server.shutdown()
    assert len(received) == 1
    event = received[0]
    assert event["event"] == "gate_refused" and event["version"] == "3"
    assert "not promoted" in event["message"] and event["time"]


def test_a_down_webhook_is_logged_not_raised(cfg, caplog: pytest.LogCaptureFixture) -> None:
    cfg.pipeline.webhook_url = f"http://127.0.0.1:{free_port()}/hook"
    with caplog.at_level(logging.WARNING, logger="leukoflow.notify"):
        payload = notify(cfg, "publish_failed", "boom")
    assert payload["event"] == "publish_failed"
    messages = [r.getMessage() for r in caplog.records]
    assert any("leukoflow publish_failed: boom" in m for m in messages)
    assert any("did not take the publish_failed event" in m for m in messages)
