"""Structured logs: one JSON object per line, each with the request id of the request it
belongs to.

- `RequestId` (ASGI middleware): takes the request's `X-Request-ID` (1 to 128 printable
  characters) or makes one (32 hex digits), keeps it in a context variable for the
  request's duration and returns it in the `X-Request-ID` response header.
- `JsonFormatter`: `{"time", "level", "logger", "message", "pid", "request_id", ...}`;
  uvicorn's access lines add `client`, `method`, `path`, `status`; an exception adds
  `exc_info` (the traceback as text).
- `log_config(level, fmt)`: the `logging.config.dictConfig` of the server, for uvicorn's
  `log_config` (its own loggers and ours alike); `fmt="text"` keeps plain lines.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: the id of the request being served in this context ("-" outside requests)
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
HEADER = "X-Request-ID"
_HEADER_KEY = HEADER.lower().encode()
_VALID = re.compile(rb"[\x21-\x7e]{1,128}")


class RequestId:
    """ASGI middleware: a request id for every HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == _HEADER_KEY), None)
        rid = given.decode() if given is not None and _VALID.fullmatch(given) else None
        rid = rid or uuid.uuid4().hex
        token = REQUEST_ID.set(rid)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != _HEADER_KEY]
                headers.append((_HEADER_KEY, rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
            "request_id": REQUEST_ID.get(),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            args = record.args
            if len(args) == 5:
                entry.update(client=args[0], method=args[1], path=args[2], status=int(str(args[4])))
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def log_config(level: str, fmt: str = "json") -> dict[str, Any]:
    """The server's logging configuration (uvicorn's `log_config`)."""
    name = level.upper()
    name = "DEBUG" if name == "TRACE" else name
    formatter: dict[str, Any] = (
        {"()": f"{__name__}.JsonFormatter"}
        if fmt == "json"
        else {"format": "%(levelname)s:     %(name)s: [%(request_id)s] %(message)s"}
    )
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "stream": "ext://sys.stderr",
        "filters": ["request_id"],
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{__name__}.RequestIdFilter"}},
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": name, "propagate": False},
            "uvicorn.error": {"level": name},
            "uvicorn.access": {"handlers": ["default"], "level": name, "propagate": False},
            "optserve": {"handlers": ["default"], "level": name, "propagate": False},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }


class RequestIdFilter(logging.Filter):
    """Puts the request id on every record (`%(request_id)s` in the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


__all__ = ["HEADER", "REQUEST_ID", "JsonFormatter", "RequestId", "RequestIdFilter", "log_config"]
