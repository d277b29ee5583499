"""The ``cortex`` command: one parser for every role (it also feeds the man page)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TextIO

import trio

import cortex
from cortex import config as cfg
from cortex.errors import ConfigError

log = logging.getLogger("cortex")

#: Loggers kept at warning unless ``--log-level trace``.
QUIET_LOGGERS = ("httpx", "httpcore")

ROLES = ("neuron", "gateway", "standalone")


def _pair(value: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {value!r}")
    return name, rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cortex",
        description="One OpenAI + Anthropic API in front of a fleet of GPU hosts.",
    )
    parser.add_argument("--version", action="version", version=f"cortex {cortex.__version__}")
    parser.add_argument(
        "--role",
        choices=ROLES,
        help="run as a neuron (GPU host), a gateway (the API), or both in one process",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config (neuron.toml or cortex.toml)")
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="API address; a HOST alone takes the role's port (neuron default 0.0.0.0:13131, "
        "gateway 0.0.0.0:31313, standalone 127.0.0.1:31313)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("trace", "debug", "info", "warning", "error"),
        help="log verbosity (default: info); trace is debug plus the HTTP client's "
        "own traces (httpx, httpcore), which debug leaves out",
    )
    neuron = parser.add_argument_group("neuron")
    neuron.add_argument(
        "--model",
        metavar="ID=SOURCE",
        type=_pair,
        action="append",
        default=[],
        help="load this model at start (a .gguf path, a directory, hf:ORG/REPO/FILE, or demo);"
        " repeatable",
    )
    gateway = parser.add_argument_group("gateway")
    gateway.add_argument("--models", metavar="FILE", help="model catalogue (models.toml)")
    gateway.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="metrics address; a HOST alone takes port 31314 (default 0.0.0.0:31314; "
        "standalone 127.0.0.1:31314)",
    )
    gateway.add_argument(
        "--neuron",
        metavar="NAME=URL",
        type=_pair,
        action="append",
        default=[],
        help="a neuron to route to; repeatable (default local=http://127.0.0.1:13131)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="print the fleet as a gateway sees it",
        description="Ask a gateway for its fleet: neurons, devices, models, aliases.",
    )
    status.add_argument(
        "--gateway",
        metavar="URL",
        default="http://127.0.0.1:31313",
        help="the gateway to ask (default http://127.0.0.1:31313)",
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument(
        "--api-key", metavar="KEY", help="a gateway API key (default $CORTEX_API_KEY)"
    )
    return parser


#: The options a role does not take, by argparse dest, and what to say (exit status 2).
NOT_FOR_ROLE = {
    "neuron": {
        "models": "--models: the neuron role reads no catalogue (the gateway does)",
        "neuron": "--neuron: the neuron role routes to no neurons (the gateway does)",
        "metrics_listen": "--metrics-listen: the neuron role serves /metrics on --listen",
    },
    "gateway": {
        "model": "--model: the gateway role loads no models (give --model to a neuron, "
        "or list the model in --models)",
    },
    "standalone": {"neuron": "--neuron: the standalone role has its own local neuron"},
}


def reject_other_roles_options(args: argparse.Namespace, role: str) -> None:
    """Refuse options ``role`` would ignore: a silently dropped option is a surprise later.

    Raises:
      ConfigError: one line naming the option and the role.
    """
    for dest, message in NOT_FOR_ROLE[role].items():
        if getattr(args, dest):
            raise ConfigError(message)


def listen_option(flag: str, value: str, *, default_port: int) -> str:
    """``value`` of ``flag`` once it is an address this host can bind.

    Raises:
      ConfigError: naming ``flag``: not HOST:PORT, or a host that does not resolve.
    """
    try:
        host, port = cfg.parse_listen(value, default_port=default_port)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc.message}") from None
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"{flag} {value}: unknown host {host!r} ({exc.strerror})") from None
    return value


def neuron_config(args: argparse.Namespace) -> cfg.NeuronConfig:
    reject_other_roles_options(args, "neuron")
    config = cfg.load(cfg.NeuronConfig, args.config)
    if args.listen:
        config.neuron.listen = listen_option("--listen", args.listen, default_port=13131)
    for model_id, source in args.model:
        config.models.append(cfg.NeuronModel(id=model_id, source=source))
    return config


def _override_gateway_addresses(section: cfg.GatewaySection, args: argparse.Namespace) -> None:
    if args.listen:
        section.listen = listen_option("--listen", args.listen, default_port=31313)
    if args.metrics_listen:
        section.metrics_listen = listen_option(
            "--metrics-listen", args.metrics_listen, default_port=31314
        )


def gateway_config(args: argparse.Namespace) -> tuple[cfg.GatewayConfig, cfg.ModelsFile]:
    from cortex.gateway.context import DEFAULT_NEURON

    reject_other_roles_options(args, "gateway")
    config = cfg.load(cfg.GatewayConfig, args.config)
    _override_gateway_addresses(config.gateway, args)
    for name, url in args.neuron:
        if name in {n.name for n in config.neurons}:
            raise ConfigError(
                f"--neuron {name}={url}: a neuron named {name!r} is already configured"
            )
        try:
            config.neurons.append(cfg.NeuronEndpoint(name=name, endpoint=url))
        except cfg.InvalidValue as exc:
            raise ConfigError(f"--neuron {name}={url}: {exc.reason}") from None
    models = cfg.load_models(args.models)
    names = [n.name for n in config.neurons or [DEFAULT_NEURON]]
    cfg.check_pins(models, names, source=str(args.models))
    return config, models


def standalone_config(args: argparse.Namespace) -> tuple[Any, cfg.ModelsFile]:
    from cortex.standalone import LOCAL_NEURON, StandaloneConfig

    reject_other_roles_options(args, "standalone")
    config = cfg.load(StandaloneConfig, args.config)
    _override_gateway_addresses(config.gateway, args)
    for model_id, source in args.model:
        config.models.append(cfg.NeuronModel(id=model_id, source=source))
    models = cfg.load_models(args.models)
    cfg.check_pins(models, [LOCAL_NEURON], source=str(args.models))
    return config, models


async def run_until_signal(
    run: Callable[..., Awaitable[Any]],
    *,
    reload: Callable[[Any], Awaitable[Any]] | None = None,
) -> None:
    """Run ``run(shutdown, task_status=...)`` and handle signals around it.

    The first SIGINT/SIGTERM sets ``shutdown`` (drain, then exit); a second
    one stops at once. SIGHUP calls ``reload`` with what ``run`` reported as
    started, or is logged and ignored when the role has nothing to reload.
    """
    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(*, task_status: trio.TaskStatus[Any]) -> None:
                await run(shutdown, task_status=task_status)
                nursery.cancel_scope.cancel()

            handle = await nursery.start(serve)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    if reload is None:
                        log.info("SIGHUP: this role has nothing to reload")
                        continue
                    try:
                        await reload(handle)
                    except ConfigError:
                        pass  # logged by the reload; the old config stays
                elif shutdown.is_set():
                    log.warning("second signal: stopping now")
                    nursery.cancel_scope.cancel()
                else:
                    log.info("%s: draining, then exiting", signal.Signals(signum).name)
                    shutdown.set()


async def _run_neuron(run: Any, config: Any, shutdown: trio.Event, **kwargs: Any) -> None:
    await run(config, shutdown=shutdown, **kwargs)


async def _run_gateway(
    run: Any, config: Any, models: Any, shutdown: trio.Event, **kwargs: Any
) -> None:
    await run(config, models, shutdown=shutdown, **kwargs)


async def _reload(handle: Any) -> None:
    # The gateway knows its --models file and its api_keys_file.
    await handle.reload()


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside nested single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _lasting_stderr() -> TextIO:
    """A stream on a copy of file descriptor 2, for the log and crash reports.

    llama-cpp-python points descriptors 1 and 2 at /dev/null while it loads
    a model, for the whole process: log lines from other threads written in
    that time ("listening on" among them) vanished, and so would the stacks
    of a crash inside a load. A copy made before any load keeps reaching
    the real stderr (the journal under systemd).
    """
    try:
        copy = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return sys.stderr  # no descriptor to copy (an embedding host's stream)
    return os.fdopen(copy, "w", buffering=1, encoding="utf-8", errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "status":
        from cortex.status import main as status_main

        return status_main(args)
    if args.role is None:
        parser.error("choose a role: --role neuron|gateway|standalone")
    stderr = _lasting_stderr()
    trace = args.log_level == "trace"
    logging.basicConfig(
        level=logging.DEBUG if trace else args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=stderr,
    )
    if not trace:
        # One line per proxied request is the gateway's job, not its HTTP
        # client's: at debug, the polls' traces would be nearly every line.
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.role in ("neuron", "standalone"):
        # An engine runs in this process: a crash in its native code (a
        # segfault in a llama.cpp kernel) would otherwise leave nothing in the
        # journal. faulthandler writes every thread's Python stack to stderr,
        # then lets the signal kill the process so systemd restarts it.
        faulthandler.enable(file=stderr, all_threads=True)
    try:
        if args.role == "neuron":
            from cortex.neuron.app import run_neuron

            neuron = neuron_config(args)
            trio.run(partial(run_until_signal, partial(_run_neuron, run_neuron, neuron)))
        elif args.role == "gateway":
            from cortex.gateway.app import run_gateway

            gateway, models = gateway_config(args)
            trio.run(
                partial(
                    run_until_signal,
                    partial(_run_gateway, run_gateway, gateway, models, models_path=args.models),
                    reload=_reload,
                )
            )
        else:
            from cortex.standalone import run_standalone

            standalone, models = standalone_config(args)
            trio.run(
                partial(
                    run_until_signal,
                    partial(
                        _run_gateway, run_standalone, standalone, models, models_path=args.models
                    ),
                    reload=_reload,
                )
            )
    except BaseException as raised:
        # Errors from inside trio.run arrive wrapped in exception groups.
        exc = _leaf(raised)
        if isinstance(exc, ConfigError):
            print(f"cortex: {exc.message}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError):
            # Most often: the listen address is taken or not ours.
            print(f"cortex: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if isinstance(exc, KeyboardInterrupt):
            return 130
        raise
    return 0
