"""How `sidecar run` writes its log: text for a terminal, or one JSON object a line for a pipeline.

`--log-format json` gives each record as ``{"time", "level", "logger", "message"}`` (plus
``"exception"`` with the traceback when there is one, and ``"worker"`` under ``--workers``), so a
collector (Fluent Bit, Vector, Loki's promtail) needs no parsing rules. Nothing is added beyond
what the text format says: the sidecar logs no API key, token or secret in either format
(README, Security), and the JSON form keeps it that way by writing only the formatted message.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime

FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line; ``worker`` names the worker process under --workers."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        if self.worker is not None:
            document["worker"] = self.worker
        return json.dumps(document, ensure_ascii=False)


def configure(level: str, log_format: str) -> None:
    """Send the log to stderr at `level`, in `log_format` (text or json)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def name_worker(index: int) -> None:
    """In a forked worker: JSON lines carry the worker's index from here on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter(worker=index))
    logging.getLogger("sidecar").debug("worker %d is pid %d", index, os.getpid())
