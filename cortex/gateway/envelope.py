"""An error as an HTTP answer in the caller's dialect.

The body comes from the dialect's one envelope maker
(``openai.error_body``, ``anthropic.error_body``); this adds the status and
the headers every error answer carries: Retry-After where the error has
one, and the request id.
"""

from __future__ import annotations

import json

from cortex.errors import CortexError
from cortex.wire import anthropic, openai


def id_headers(request_id: str, anthropic_dialect: bool) -> list[tuple[str, str]]:
    """``x-request-id``, and Anthropic's own ``request-id`` under its dialect."""
    headers = [("x-request-id", request_id)]
    if anthropic_dialect:
        headers.append(("request-id", request_id))
    return headers


def error_parts(
    exc: CortexError, *, anthropic_dialect: bool, request_id: str
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """(status, JSON body, headers besides content-type) answering ``exc``."""
    if anthropic_dialect:
        body, status = anthropic.error_body(exc), anthropic.status_for(exc)
    else:
        body, status = openai.error_body(exc), exc.status
    headers: list[tuple[str, str]] = []
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers.append(("retry-after", str(retry_after)))
    return status, json.dumps(body).encode(), headers + id_headers(request_id, anthropic_dialect)
