"""The neuron API as the gateway calls it: JSON calls and error mapping.

Requests (inference, and the tokenize calls of Anthropic's prompt counts)
are proxied by ``cortex.gateway.proxy``; the fleet's own calls (discovery,
health, models, load, unload) go through :class:`NeuronAPI`. Both turn a
neuron's error answers back into the ``CortexError`` they stand for
(:func:`error_from_response`), so either dialect can render them.

:class:`NeuronLink` is the narrow part of it the loader and the pollers use
to observe and act on neurons. ``NeuronAPI`` is the one over HTTP;
``cortex.sim`` has one in process (fake neurons in virtual time), so the
simulation runs the gateway's own router, loader, evictor and queue.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import cattrs
import httpx

from cortex.errors import (
    CortexError,
    NeuronUnreachable,
    UpstreamError,
    UpstreamTimeout,
    error_for_status,
)
from cortex.fleet import Discovery, Health, ModelStatus
from cortex.gateway.state import NeuronState

log = logging.getLogger(__name__)


def retry_after(headers: Mapping[str, str]) -> int | None:
    """The Retry-After seconds of an answer; None when absent or not a number."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        return None


def error_from_response(status: int, body: bytes, headers: Mapping[str, str]) -> CortexError:
    """The CortexError a neuron's error answer stands for.

    The neuron sends OpenAI envelopes; message, param and code are kept and
    the class comes from ``error_for_status``, so each dialect renders it as
    its own kind. Two answers are the fleet's fault, not the client's, and
    read as a bad gateway: a refused token (401, 403), and a neuron's own
    server error (a 5xx other than 503 and 504).
    """
    message, param, code = f"neuron answered {status}", None, None
    try:
        error = json.loads(body)["error"]
        message = str(error.get("message") or message)
        param, code = error.get("param"), error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    if status in (401, 403):
        return UpstreamError(f"neuron refused the gateway's token: {message}")
    if status >= 500 and status not in (503, 504):
        status = UpstreamError.status
    return error_for_status(
        status,
        message,
        code=code if isinstance(code, str) else None,
        param=param if isinstance(param, str) else None,
        retry_after=retry_after(headers),
    )


def transport_error(neuron: NeuronState, exc: Exception) -> CortexError:
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"neuron {neuron.name} did not answer in time")
    return NeuronUnreachable(f"neuron {neuron.name} unreachable: {type(exc).__name__}: {exc}")


class NeuronLink(Protocol):
    """What routing does to a neuron: observe it, load and unload models.

    Requests themselves are sent by whoever holds the route that
    ``Router.acquire`` gives out (the proxy over HTTP; the simulation's
    clients in process) and end with ``Router.release``.

    Every method raises ``CortexError`` for a neuron that refuses or cannot
    be reached: ``ModelNotFound`` when unloading a model it does not have.
    """

    async def discovery(self, neuron: NeuronState) -> Discovery: ...

    async def health(self, neuron: NeuronState) -> Health: ...

    async def models(self, neuron: NeuronState) -> list[ModelStatus]: ...

    async def load(self, neuron: NeuronState, body: dict[str, Any]) -> ModelStatus | None:
        """Load ``body["model_id"]``; returns once it is loaded (its status, if told)."""
        ...

    async def unload(self, neuron: NeuronState, model_id: str) -> None:
        """Unload ``model_id`` once its requests in flight have finished."""
        ...


@attrs.define(eq=False)
class NeuronAPI:
    """JSON calls to neurons over one shared client."""

    client: httpx.AsyncClient
    converter: cattrs.Converter
    #: Read timeout of the small calls (discovery, health, models).
    call_timeout: httpx.Timeout
    #: Read timeout of a load (the neuron answers when the model is loaded).
    load_timeout: httpx.Timeout

    def headers(self, neuron: NeuronState, request_id: str | None = None) -> dict[str, str]:
        # A fresh connection per call: a neuron that drains (SIGTERM) closes
        # its listener but keeps serving, then stalls, a kept-alive one
        # until its grace period ends; refused at once, the poll marks it
        # down and no new request goes there while it finishes the rest.
        # The calls are few (a poll, a load), so the connects cost nothing.
        headers = {"connection": "close"}
        if neuron.token:
            headers["authorization"] = f"Bearer {neuron.token}"
        if request_id:
            headers["x-request-id"] = request_id
        return headers

    async def call(
        self,
        neuron: NeuronState,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        http_timeout: httpx.Timeout | None = None,
        request_id: str | None = None,
    ) -> Any:
        """One JSON call; returns the decoded body.

        Raises:
          CortexError: the neuron's error answer, mapped by status.
          UpstreamError, UpstreamTimeout: it could not be reached or answered
            junk, its endpoint is not an http(s) URL, or a GET found no such
            path (not a neuron's URL).
        """
        scheme = urlsplit(neuron.base_url).scheme.lower()
        if scheme not in ("http", "https"):
            raise UpstreamError(
                f"neuron {neuron.name}'s endpoint {neuron.endpoint!r} is not an http:// "
                "or https:// URL (write it as http://HOST:PORT)"
            )
        try:
            response = await self.client.request(
                method,
                neuron.base_url + path,
                json=json_body,
                headers=self.headers(neuron, request_id),
                timeout=http_timeout or self.call_timeout,
            )
        except httpx.HTTPError as exc:
            raise transport_error(neuron, exc) from exc
        if response.status_code == 404 and method == "GET":
            # Every neuron serves the status paths: this is some other server,
            # or the endpoint has a path too many (``/v1``).
            raise UpstreamError(
                f"neuron {neuron.name} answered 404 to GET {neuron.base_url + path}: "
                f"{neuron.endpoint} does not look like a cortex neuron (its endpoint is "
                "the neuron's base URL, http://HOST:PORT, with no path such as /v1)"
            )
        if response.status_code >= 400:
            raise error_from_response(response.status_code, response.content, response.headers)
        try:
            return response.json()
        except ValueError:
            raise UpstreamError(f"neuron {neuron.name} answered {path} with invalid JSON")

    def _structure(self, data: Any, cls: type, neuron: NeuronState, path: str) -> Any:
        try:
            return self.converter.structure(data, cls)
        except Exception as exc:  # cattrs raises groups and plain errors alike
            raise UpstreamError(f"neuron {neuron.name} answered {path} with bad data: {exc}")

    async def discovery(self, neuron: NeuronState) -> Discovery:
        return self._structure(
            await self.call(neuron, "GET", "/discovery"), Discovery, neuron, "/discovery"
        )

    async def health(self, neuron: NeuronState) -> Health:
        return self._structure(await self.call(neuron, "GET", "/health"), Health, neuron, "/health")

    async def models(self, neuron: NeuronState) -> list[ModelStatus]:
        data = await self.call(neuron, "GET", "/models")
        return self._structure(data, list[ModelStatus], neuron, "/models")

    async def load(self, neuron: NeuronState, body: dict[str, Any]) -> ModelStatus | None:
        data = await self.call(
            neuron, "POST", "/models/load", json_body=body, http_timeout=self.load_timeout
        )
        model = data.get("model") if isinstance(data, dict) else None
        return self._structure(model, ModelStatus, neuron, "/models/load") if model else None

    async def unload(self, neuron: NeuronState, model_id: str) -> None:
        await self.call(
            neuron,
            "POST",
            "/models/unload",
            json_body={"model_id": model_id, "cancel": False},
            http_timeout=self.load_timeout,
        )
