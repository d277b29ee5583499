"""An error as an HTTP answer in the caller's dialect, for both roles.

The body comes from the dialect's one envelope maker
(``openai.error_body``, ``anthropic.error_body``); this adds the status
(Anthropic's own for "try later": 529) and the headers every error answer
carries: Retry-After where the error has one, and the request id where the
caller sets it. The neuron answers in the OpenAI dialect; the gateway in
the dialect of the route that was called.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from cortex.errors import CortexError, MethodNotAllowed, NotFound, error_for_status
from cortex.wire import anthropic, openai

OPENAI = "openai"
ANTHROPIC = "anthropic"


def id_headers(request_id: str, dialect: str) -> list[tuple[str, str]]:
    """``x-request-id``, and Anthropic's own ``request-id`` in its dialect."""
    headers = [("x-request-id", request_id)]
    if dialect == ANTHROPIC:
        headers.append(("request-id", request_id))
    return headers


def error_parts(
    exc: CortexError, *, dialect: str = OPENAI, request_id: str | None = None
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """(status, JSON body, headers besides content-type) answering ``exc``.

    Args:
      exc: the error.
      dialect: ``OPENAI`` or ``ANTHROPIC``.
      request_id: the request's id for the id headers; None: none added.
    """
    if dialect == ANTHROPIC:
        body, status = anthropic.error_body(exc), anthropic.status_for(exc)
    else:
        body, status = openai.error_body(exc), exc.status
    headers: list[tuple[str, str]] = []
    if exc.retry_after is not None:
        headers.append(("retry-after", str(exc.retry_after)))
    if request_id is not None:
        headers += id_headers(request_id, dialect)
    return status, json.dumps(body).encode(), headers


def route_error(
    status: int,
    method: str,
    path: str,
    *,
    allowed: Iterable[str] = (),
    description: str | None = None,
) -> CortexError:
    """The error for a request no route takes, saying which request it was.

    A 404 reads ``no route POST /v1/embeddings``; a 405 ``GET is not allowed
    on /v1/chat/completions (allowed: POST)``: the web framework's generic
    sentences say neither. Another status keeps ``description``.
    """
    if status == 404:
        return NotFound(f"no route {method} {path}")
    if status == 405:
        takes = sorted(set(allowed) - {"HEAD", "OPTIONS"})
        suffix = f" (allowed: {', '.join(takes)})" if takes else ""
        return MethodNotAllowed(f"{method} is not allowed on {path}{suffix}")
    return error_for_status(status, description or f"{method} {path} failed")


def framework_error(exc: Any, method: str, path: str) -> CortexError:
    """``route_error`` for the web framework's own ``HTTPException`` (Werkzeug's)."""
    return route_error(
        exc.code or 500,
        method,
        path,
        allowed=getattr(exc, "valid_methods", None) or (),
        description=exc.description or exc.name,
    )
