"""Cross-origin requests (CORS): what lets a browser page call the API directly.

A page may read an answer from another origin only if the answer names the
page's origin (``Access-Control-Allow-Origin``); before a POST with JSON or
an API key header the browser asks first, with a preflight: ``OPTIONS``
with ``Access-Control-Request-Method``, no key and no body. ``[gateway]
cors_origins`` lists the origins allowed (``"*"``: any). Empty, the gateway
sends no CORS headers and browsers refuse every other origin's page, by
design: a gateway on localhost, open with no keys, would otherwise be
usable by any site its user visits.

The pipeline (``cortex.gateway.exchange``) answers preflights from allowed
origins itself, on every route, and has :meth:`CorsPolicy.tag` add the
headers to every other answer to them, whichever app sent it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs

Send = Callable[[dict[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

#: The answer headers a page may read besides the simple ones: the request
#: id (both dialects'), and when to retry a 503 / 429 / 529.
EXPOSED = b"x-request-id, request-id, retry-after"
#: Seconds a browser may keep a preflight's answer (Chromium keeps it 7200 at most).
MAX_AGE = b"7200"

_ASKED = (b"origin", b"access-control-request-method", b"access-control-request-headers")


@attrs.frozen
class Preflight:
    """What a request from an allowed origin asks: its origin, and for a preflight the rest."""

    origin: bytes
    #: The method a preflight asks for; None: not a preflight.
    method: bytes | None
    #: The headers a preflight asks for, as sent (a comma-separated list).
    headers: bytes | None


@attrs.frozen
class CorsPolicy:
    """The origins allowed, from ``[gateway] cors_origins``."""

    origins: frozenset[str]
    any_origin: bool

    @classmethod
    def from_config(cls, origins: Sequence[str]) -> CorsPolicy | None:
        """The policy, or None for an empty list: CORS off."""
        if not origins:
            return None
        # Browsers send scheme and host in lower case.
        return cls(frozenset(o.lower() for o in origins if o != "*"), "*" in origins)

    def allowed(self, scope: dict[str, Any]) -> Preflight | None:
        """What the request asks, if it comes from an allowed origin; else None."""
        found: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in _ASKED and name not in found:
                found[name] = value
        origin = found.get(b"origin")
        if origin is None:
            return None
        if not self.any_origin and origin.decode("latin-1").lower() not in self.origins:
            return None
        method = found.get(b"access-control-request-method")
        if scope["method"] != "OPTIONS":
            method = None
        return Preflight(origin, method, found.get(b"access-control-request-headers"))

    @staticmethod
    def answer_headers(origin: bytes) -> Headers:
        """The headers of every answer to an allowed origin."""
        return [
            (b"access-control-allow-origin", origin),
            (b"vary", b"Origin"),
            (b"access-control-expose-headers", EXPOSED),
        ]

    @staticmethod
    def preflight_headers(asked: Preflight, methods: Sequence[str]) -> Headers:
        """The headers of a preflight's answer: the route's ``methods``, the headers asked."""
        headers = [
            (b"access-control-allow-origin", asked.origin),
            (b"vary", b"Origin"),
            (b"access-control-allow-methods", ", ".join(methods).encode("latin-1")),
            (b"access-control-max-age", MAX_AGE),
        ]
        if asked.headers:
            headers.append((b"access-control-allow-headers", asked.headers))
        return headers

    def tag(self, send: Send, origin: bytes) -> Send:
        """``send`` that adds ``answer_headers(origin)`` to the response head."""
        added = self.answer_headers(origin)

        async def tagged(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *added]}
            await send(message)

        return tagged
