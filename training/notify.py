"""Telling people: a log line always, and a JSON POST to a webhook when one is configured.

Used for the events an ML engineer must hear about without watching: a gate that refuses a
candidate, a publish rolled back, a failed DAG task (through the DAGs' failure callback). A
webhook that fails is logged and never fails the step that notifies.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from training.config import Config

__all__ = ["notify"]

log = logging.getLogger("leukoflow.notify")


def notify(cfg: Config, event: str, message: str, **details: Any) -> dict[str, Any]:
    """Log ``event`` and POST it to ``pipeline.webhook_url`` if set; returns the payload sent."""
    payload = {"event": event, "message": message, "time": datetime.now(UTC).isoformat(),
               **details}
    log.warning("leukoflow %s: %s", event, message)
    url = cfg.pipeline.webhook_url
    if url:
        import httpx

        try:
            httpx.post(url, json=payload, timeout=cfg.pipeline.webhook_timeout_s,
                       ).raise_for_status()
        except httpx.HTTPError as exc:
            log.error("webhook %s did not take the %s event: %s", url, event, exc)
    return payload
