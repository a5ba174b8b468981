"""How the long-running services (`dr watch run`, `dr serve`, `dr scheduler run`) log: text lines for
people (the default) or one JSON object per line for a log collector (``--log-format json``). In JSON,
`dr run` and `dr drill run` log too, in place of their live progress and tables.

Ids come from the record itself: code that handles a run, an incident or a step passes them as
``extra={"run_id": ..., "incident_id": ..., "step_id": ...}`` (the engine does for every run and
step start and end). No context variable: the engine runs steps on reused threads, where a context
set elsewhere would be missing or stale.

Standard library only; imports nothing of the project but the ``secrets`` leaf.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from dr_orchestrator import secrets

LOG_FORMATS = ("text", "json")
ID_FIELDS = ("run_id", "incident_id", "step_id")
# A record's structured figures (a service's RTO against its target, say): ``extra={"data": {...}}``.
DATA_FIELD = "data"
# A line per HTTP request or SSH packet would bury what the services decide (the watch probes dozens
# of times a second).
CHATTY_LOGGERS = ("httpx", "httpcore", "paramiko")


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: ``time`` (UTC, milliseconds), ``level``, ``logger``, ``message``,
    the ids the record carries, its ``data`` (figures) when it has some, and ``exception`` (the
    traceback) when there is one.

    Every value goes through the redactor last: the process's record factory masks messages and
    tracebacks, but ``extra`` fields are set on a record after the factory has run."""

    def __init__(self, redactor: secrets.Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or secrets.PROCESS

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = str(value)
        data = getattr(record, DATA_FIELD, None)
        if isinstance(data, dict):
            entry[DATA_FIELD] = data
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(self.redactor.redact_data(entry), default=str)


def log_to_terminal(log_format: str, text_format: str, level: int = logging.INFO) -> None:
    """Records of ``level`` and above on stderr, as ``text_format`` lines or JSON objects, with the
    chatty libraries held at WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(text_format))
    logging.basicConfig(level=level, handlers=[handler])
    for chatty in CHATTY_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)
