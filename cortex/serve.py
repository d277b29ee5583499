"""Serving an ASGI app with hypercorn on trio, with a graceful drain."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio

from cortex.config import parse_listen
from cortex.errors import ConfigError

log = logging.getLogger(__name__)

#: Bound on a request's header block; hypercorn answers 431/400 beyond it.
MAX_HEADER_BYTES = 32 * 1024


def hypercorn_config(
    listen: str, *, default_port: int, grace_period: float
) -> hypercorn.config.Config:
    host, port = parse_listen(listen, default_port=default_port)
    config = hypercorn.config.Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = grace_period
    config.h11_max_incomplete_size = MAX_HEADER_BYTES
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    return config


def bound_url(listen: str, url: str, *, default_port: int) -> str:
    """``url`` (what ``serve`` reported) as the address it bound: ``0.0.0.0`` stays."""
    host, _ = parse_listen(listen, default_port=default_port)
    if host == "0.0.0.0":
        return url.replace("://127.0.0.1:", "://0.0.0.0:")
    return url


def is_loopback(listen: str, *, default_port: int) -> bool:
    """Whether ``listen`` binds only this host (127.0.0.0/8, ::1, localhost)."""
    host, _ = parse_listen(listen, default_port=default_port)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it reaches beyond this host


def keep_alive_safe(app: Any) -> Any:
    """``app`` with the last message of each answer sent shielded from cancellation.

    hypercorn re-arms a keep-alive connection's idle timer inside that send;
    quart-trio (and the gateway's exchange) cancel the request's tasks as
    soon as it is sent, which cancelled the re-arming. The connection was
    then never closed: not after ``keep_alive_timeout``, and not at
    shutdown, where an idle client held the server for all of its grace
    period. The socket write in there is shielded by hypercorn already.
    """

    async def shielded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_last_shielded(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await app(scope, receive, send_last_shielded)

    return shielded


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def serve(
    app: Any,
    listen: str,
    *,
    default_port: int,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    grace_period: float = 30.0,
    name: str = "listen",
    stopped: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` until ``shutdown_trigger`` returns.

    Reports the first bound URL (``http://127.0.0.1:PORT``; port 0 resolved)
    through ``task_status``. After the trigger, no new connections are
    accepted and in-flight requests get ``grace_period`` seconds to finish;
    then ``stopped``, if given, is set (however serving ended).

    Raises:
      OSError: the address cannot be bound (taken, not this host's); the
        message names ``name`` (the setting) and the address.
      ConfigError: the host does not resolve.
    """
    config = hypercorn_config(listen, default_port=default_port, grace_period=grace_period)
    bound = False
    try:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                partial(
                    hypercorn.trio.serve,
                    keep_alive_safe(app),
                    config,
                    shutdown_trigger=shutdown_trigger,
                )
            )
            bound = True
            # The address bound, in the log; one to connect to, for the caller.
            log.info("listening on %s", urls[0])
            task_status.started(urls[0].replace("://0.0.0.0:", "://127.0.0.1:"))
    except BaseException as exc:
        # hypercorn's bind error arrives wrapped in a group per nursery; a
        # role serves two addresses, and the operator must know which failed.
        failed = _leaf(exc)
        if bound or not isinstance(failed, OSError):
            raise
        if isinstance(failed, socket.gaierror):
            raise ConfigError(f"{name} {listen}: unknown host ({failed.strerror})") from exc
        raise OSError(failed.errno, f"{name} {listen}: {failed.strerror}") from exc
    finally:
        if stopped is not None:
            stopped.set()
