"""Configuration: attrs classes, read from TOML, overridden by the environment.

Every role's config is one attrs tree. A file is structured by a cattrs
converter that forbids unknown keys; environment variables named
``CORTEX_<SECTION>_<KEY>`` (``CORTEX_NEURON_LISTEN``,
``CORTEX_GATEWAY_API_KEYS``) override single keys of a section. A bad file
or value raises ``ConfigError`` whose message is one line naming the file,
the key and the reason.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import cattrs

from cortex.errors import ConfigError

ENV_PREFIX = "CORTEX_"

T = TypeVar("T")


def parse_listen(value: str, *, default_port: int) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``[v6]:PORT``, ``:PORT``, ``HOST``) into its parts.

    A HOST alone takes ``default_port`` (the role's own).
    """
    host, sep, port = value.rpartition(":")
    if not sep or "]" in port:
        host, port = value, str(default_port)
    if ":" in host and not host.startswith("["):
        # "::1" would read as host ":" and port 1.
        raise ConfigError(f"invalid listen address {value!r}: write IPv6 as [ADDRESS]:PORT")
    host = host.strip("[]") or "0.0.0.0"
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"invalid listen address {value!r}: port must be a number")
    if not 0 <= number <= 65535:
        raise ConfigError(f"invalid listen address {value!r}: port out of range")
    return host, number


class InvalidValue(ValueError):
    """A field's value is not one it can take; ``reason`` says why, ``field`` whose."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def validate_listen(instance: object, attribute: attrs.Attribute, value: str) -> None:
    try:
        parse_listen(value, default_port=0)
    except ConfigError as exc:
        raise InvalidValue(attribute.name, exc.message) from None


def _shown(value: float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def in_range(*, gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
    """A validator: the value (each item of a list; None passes) within the bounds, finite.

    Its ``bounds`` ("> 0", ">= 0 and <= 100") is what the man page states.
    """
    parts = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else ""]
    parts.append(f"<= {le:g}" if le is not None else "")
    bounds = " and ".join(p for p in parts if p)

    def check(instance: object, attribute: attrs.Attribute, value: Any) -> None:
        for item in value if isinstance(value, list) else [] if value is None else [value]:
            if (
                (isinstance(item, float) and not math.isfinite(item))
                or (gt is not None and not item > gt)
                or (ge is not None and not item >= ge)
                or (le is not None and not item <= le)
            ):
                raise InvalidValue(attribute.name, f"must be {bounds}, got {_shown(item)}")

    check.bounds = bounds  # type: ignore[attr-defined]
    return check


#: The ranges numeric settings take (a value that is out of them is a config error).
POSITIVE = in_range(gt=0)
NON_NEGATIVE = in_range(ge=0)


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#@\s]+", re.IGNORECASE)


def validate_origins(instance: object, attribute: attrs.Attribute, value: list[str]) -> None:
    """Each item ``*`` or an origin as browsers send it: ``SCHEME://HOST[:PORT]``."""
    for item in value:
        if item != "*" and not _ORIGIN.fullmatch(item):
            raise InvalidValue(
                attribute.name,
                f"{item!r} is not an origin: write SCHEME://HOST[:PORT] "
                '(no path, no trailing slash), or "*" for any',
            )


# -- neuron ---------------------------------------------------------------------------


@attrs.define
class NeuronSection:
    listen: str = attrs.field(default="0.0.0.0:13131", validator=validate_listen)
    #: Shared secret the gateway sends as ``Authorization: Bearer``; None: open.
    token: str | None = None
    #: Leave /health and /metrics open when a token is set.
    open_health: bool = True
    #: Memory models may use on a CPU-only host; None: 90% of RAM.
    memory_budget_mb: int | None = attrs.field(default=None, validator=POSITIVE)
    #: Cap on a model's context length (its trained length is the default).
    n_ctx_max: int = attrs.field(default=32768, validator=POSITIVE)
    #: Tokens a reply may have when the request names no limit (finish
    #: reason ``length`` when reached); an explicit max_tokens is kept.
    default_max_tokens: int = attrs.field(default=4096, validator=POSITIVE)
    #: Engine plugins (entry point names) that must not be loaded.
    blocked_harnesses: list[str] = attrs.field(factory=list)
    #: Directories that hold models; relative sources resolve against them.
    model_dirs: list[str] = attrs.field(factory=list)
    #: Seconds between device samples for /health.
    sample_interval: float = attrs.field(default=2.0, validator=POSITIVE)
    #: Seconds in-flight requests get to finish on shutdown.
    grace_period: float = attrs.field(default=30.0, validator=NON_NEGATIVE)
    #: Requests waiting for one model beyond this are refused with 429.
    queue_limit: int = attrs.field(default=64, validator=NON_NEGATIVE)
    max_body_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=POSITIVE)


@attrs.define
class NeuronModel:
    """A model a neuron loads at start (``[[models]]`` in neuron.toml)."""

    id: str
    source: str
    harness: str | None = None
    chat_format: str | None = None
    devices: list[int] | None = attrs.field(default=None, validator=NON_NEGATIVE)
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class NeuronConfig:
    neuron: NeuronSection = attrs.field(factory=NeuronSection)
    models: list[NeuronModel] = attrs.field(factory=list)


# -- gateway --------------------------------------------------------------------------


@attrs.define
class GatewaySection:
    listen: str = attrs.field(default="0.0.0.0:31313", validator=validate_listen)
    metrics_listen: str = attrs.field(default="0.0.0.0:31314", validator=validate_listen)
    #: Client keys accepted as ``Authorization: Bearer`` or ``x-api-key``; empty: open.
    #: Read at start only.
    api_keys: list[str] = attrs.field(factory=list)
    #: A file with one key per line, added to api_keys. Re-read by SIGHUP and
    #: POST /admin/reload, all or nothing with the models file: one that cannot
    #: be read or has no key in it keeps the old keys and the old catalogue. At
    #: start it is an error (exit status 2).
    api_keys_file: str | None = None
    #: Seconds between /health and /models polls of each neuron.
    poll_interval: float = attrs.field(default=10.0, validator=POSITIVE)
    #: Seconds between /discovery polls.
    discovery_interval: float = attrs.field(default=60.0, validator=POSITIVE)
    connect_timeout: float = attrs.field(default=5.0, validator=POSITIVE)
    #: Seconds to wait for a neuron's first byte: cold loads of big models
    #: take minutes, and so does a long prompt on a CPU host (Claude Code's
    #: ~28k tokens: about 10 minutes on 2 cores). A neuron that stops
    #: answering its polls is left long before (its requests fail over).
    first_byte_timeout: float = attrs.field(default=1800.0, validator=POSITIVE)
    #: Seconds a model may have requests running on a neuron without its
    #: engine making progress (``stalled_secs`` in the neuron's /models)
    #: before the gateway routes nothing more to it there and fails over the
    #: requests waiting there for their first byte; 0: never. Longer than
    #: the longest single step of an engine that is working (a prompt chunk
    #: on a slow CPU host) and than the neuron's 120 s wait for a client
    #: that stopped reading.
    stall_timeout: float = attrs.field(default=300.0, validator=NON_NEGATIVE)
    #: Seconds allowed between two chunks of a stream.
    idle_timeout: float = attrs.field(default=120.0, validator=POSITIVE)
    #: Seconds a request waits for a model load before giving up.
    load_timeout: float = attrs.field(default=900.0, validator=POSITIVE)
    grace_period: float = attrs.field(default=30.0, validator=NON_NEGATIVE)
    #: max_tokens filled into OpenAI chat and Responses requests that name
    #: none; None leaves them to the neuron's own default_max_tokens.
    default_max_tokens: int | None = attrs.field(default=None, validator=POSITIVE)
    max_body_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=POSITIVE)
    #: Origins whose browser pages may call the API (CORS), as
    #: ``SCHEME://HOST[:PORT]``; ``"*"``: any. Empty: no CORS headers, and
    #: browsers refuse pages of other origins.
    cors_origins: list[str] = attrs.field(factory=list, validator=validate_origins)


@attrs.define
class EvictionSection:
    strategy: Literal["lru", "priority"] = "lru"


@attrs.define
class RoutingSection:
    """How the router chooses a route; see ``cortex.gateway.scheduler``."""

    #: "predictive": the smallest predicted time to first token, a queue per
    #: model, scale-out; "fixed": loaded > loading > cold load evicting per
    #: [eviction] (LocalAI's order); "static": each model on one home neuron,
    #: swapped in on demand (llama-swap's behaviour).
    policy: Literal["predictive", "fixed", "static"] = "predictive"
    #: Requests one model may have waiting at the gateway; beyond: 503 + Retry-After.
    queue_limit: int = attrs.field(default=64, validator=POSITIVE)
    #: Seconds a request may wait at the gateway for room before it gets a 503.
    max_wait: float = attrs.field(default=300.0, validator=POSITIVE)
    #: Predicted wait (seconds) on a model's replicas above which a further
    #: replica is loaded where there is room ...
    scale_out_wait: float = attrs.field(default=10.0, validator=NON_NEGATIVE)
    #: ... once it has stayed above it for this many seconds.
    scale_out_after: float = attrs.field(default=5.0, validator=NON_NEGATIVE)
    #: Seconds an added replica may stay idle before it is unloaded.
    scale_in_idle: float = attrs.field(default=300.0, validator=POSITIVE)
    #: How long a request waits before evicting models it will likely bring
    #: back, as a share of the reload seconds the eviction is predicted to
    #: cost later: 0 evicts at once (lowest latency), 1 waits the whole
    #: penalty (fewest cold loads); requests for the model wait together.
    patience: float = attrs.field(default=0.0, validator=NON_NEGATIVE)
    #: ... but never so long that its first token, after the load, comes
    #: later than this many seconds after it arrived. Unset: the time to
    #: first token of the slowest 1% of requests not held (at least 10 s).
    patience_limit: float | None = attrs.field(default=None, validator=NON_NEGATIVE)
    #: ... the percentile of those requests' times to first token that is
    #: the limit when patience_limit is unset: held requests then end no
    #: later than the slowest (100 - patience_tail)% of the others. 97 keeps
    #: the p99 at or below the fixed order's where 99 may not (README).
    patience_tail: float = attrs.field(default=99.0, validator=in_range(gt=0, le=100))
    #: Seconds a model that thrashed (reloaded within thrash_window of its
    #: eviction) counts three times its reload when evicting it is weighed.
    min_residency: float = attrs.field(default=60.0, validator=NON_NEGATIVE)
    #: An eviction followed by a reload within this many seconds counts as thrash.
    thrash_window: float = attrs.field(default=600.0, validator=NON_NEGATIVE)
    #: Session affinity (``cortex.gateway.affinity``): the predictive policy
    #: counts the prompt a replica is expected to hold in cache. False: it
    #: ignores it (affinity is still counted in ``cortex_affinity_total``).
    affinity: bool = True
    #: With affinity: evicting a model counts the prompt cache it holds for
    #: sessions still going on (their prompts' re-processing, weighed by the
    #: chance each comes back), and a request waits up to that many seconds
    #: for something cheaper to free. False: only reloads are weighed.
    weigh_caches: bool = True
    #: A conversation that sends no session key is recognised by its prompts
    #: (a turn repeating the last one's messages) and routed and weighed as
    #: a keyed session is. False: the prefix index alone knows it, and
    #: evictions do not weigh its cache.
    conversations: bool = True
    #: An answer that calls a tool (OpenAI finish_reason tool_calls, Responses
    #: function_call, Anthropic tool_use) keeps its model where it is until
    #: the client sends the tool's result: evicting it then counts its whole
    #: reload and prompt cache, and it goes last among victims. The wait is
    #: learned (the 99th percentile of the gaps measured; 60 s until 20
    #: were). False: answers that call tools are treated like any other.
    follow_ups: bool = True
    #: ... for at most this many seconds after the answer (tools that run
    #: minutes, a build or a test suite, need more).
    follow_up_limit: float = attrs.field(default=300.0, validator=NON_NEGATIVE)
    #: A model pinned on a neuron (models.toml ``pinned_on``) is loaded there
    #: whenever that neuron is up and does not have it (at start, when the
    #: neuron comes back or restarts, after a reload adds the pin), into
    #: free memory only: a preload evicts nothing. False: pinned models are
    #: loaded on demand like the others.
    preload_pinned: bool = True


def validate_endpoint(instance: object, attribute: attrs.Attribute, value: str) -> None:
    """A neuron's base URL: ``http://HOST:PORT`` or ``https://...``, its scheme included."""
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.strip("/"):
        raise InvalidValue(
            attribute.name, f"{value!r} is not an http:// or https:// URL (http://HOST:PORT)"
        )


@attrs.define
class NeuronEndpoint:
    name: str
    endpoint: str = attrs.field(validator=validate_endpoint)
    token: str | None = None


def _unique_names(instance: object, attribute: attrs.Attribute, value: list[Any]) -> None:
    names = [n.name for n in value]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidValue(attribute.name, f"duplicate names {duplicates}")


@attrs.define
class GatewayConfig:
    gateway: GatewaySection = attrs.field(factory=GatewaySection)
    eviction: EvictionSection = attrs.field(factory=EvictionSection)
    routing: RoutingSection = attrs.field(factory=RoutingSection)
    #: Names are unique: metrics, logs and pinned_on tell neurons apart by them.
    neurons: list[NeuronEndpoint] = attrs.field(factory=list, validator=_unique_names)


SAMPLING_KEYS = frozenset({"temperature", "top_p", "top_k", "min_p", "repeat_penalty"})


@attrs.define
class CatalogModel:
    """A model the fleet may serve (``[[models]]`` in models.toml)."""

    id: str
    source: str | None = None
    harness: str | None = None
    quant: str | None = None
    vram_mb: int = attrs.field(default=0, validator=NON_NEGATIVE)
    min_devices: int = attrs.field(default=1, validator=POSITIVE)
    min_device_vram_mb: int = attrs.field(default=0, validator=NON_NEGATIVE)
    #: Neurons this model is pinned on: never evicted there, and loaded there
    #: whenever the neuron is up and has room ([routing] preload_pinned).
    #: Each must be a configured neuron's name (standalone: local).
    pinned_on: list[str] = attrs.field(factory=list)
    priority: int = 0
    chat_format: str | None = None
    #: Engine options passed through on load (n_ctx, n_gpu_layers, ...).
    options: dict[str, Any] = attrs.field(factory=dict)
    #: Default sampling when a request leaves it out.
    sampling: dict[str, float] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        unknown = set(self.sampling) - SAMPLING_KEYS
        if unknown:
            raise ValueError(f"unknown sampling keys {sorted(unknown)}")


#: An alias names one model, or a list of them (a tier): the router picks a
#: member, one already loaded and healthy before cold-loading any.
AliasTarget = str | list[str]


@attrs.define
class ModelsFile:
    models: list[CatalogModel] = attrs.field(factory=list)
    aliases: dict[str, AliasTarget] = attrs.field(factory=dict)


# -- loading --------------------------------------------------------------------------


def _structure_alias(value: Any, _: Any) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError("must be a model id or a non-empty list of model ids")


def _strict(kind: type, accepts: tuple[type, ...]) -> Any:
    """A structure hook that takes only ``accepts`` (never bool for numbers)."""
    name = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}[kind]

    def structure(value: Any, _: type) -> Any:
        if not isinstance(value, accepts) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"expected {name}, got {value!r}")
        return kind(value)

    return structure


def _structure_strings(value: Any, _: Any) -> list[str]:
    # cattrs would take a string as the list of its characters: api_keys = "k1"
    # would accept the keys "k" and "1".
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return list(value)


def make_converter() -> cattrs.Converter:
    # cattrs' own hooks coerce (str(3) == "3", int(2.5) == 2); a config file
    # with the wrong type is an error, not something to guess about.
    converter = cattrs.Converter(forbid_extra_keys=True)
    converter.register_structure_hook(str, _strict(str, (str,)))
    converter.register_structure_hook(int, _strict(int, (int,)))
    converter.register_structure_hook(float, _strict(float, (int, float)))
    converter.register_structure_hook(bool, _strict(bool, (bool,)))
    converter.register_structure_hook_func(lambda t: t == AliasTarget, _structure_alias)
    converter.register_structure_hook_func(lambda t: t == list[str], _structure_strings)
    return converter


def _env_value(raw: str, field_type: Any) -> Any:
    """An environment string as the field's type: TOML syntax, else the raw text."""
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    origin = typing.get_origin(field_type)
    if origin is list and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if field_type in (str, str | None) and not isinstance(value, str):
        return raw
    return value


def _apply_env(cls: type, raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """Put the overrides of ``cls``'s sections into ``raw``.

    Returns the variable each overridden key came from, by ``section.key``.

    Raises:
      ConfigError: a variable names a section of ``cls`` but none of its keys
        (a misspelling would otherwise be ignored without a word).
    """
    hints = typing.get_type_hints(cls)
    used: dict[str, str] = {}
    for section in attrs.fields(cls):
        section_type = hints[section.name]
        if not attrs.has(section_type):
            continue
        section_hints = typing.get_type_hints(section_type)
        keys = {field.name for field in attrs.fields(section_type)}
        prefix = f"{ENV_PREFIX}{section.name}_".upper()
        for name in sorted(environ):
            if not name.startswith(prefix):
                continue
            key = name.removeprefix(prefix).lower()
            if key not in keys:
                known = ", ".join(sorted(keys))
                raise ConfigError(f"{name}: {section.name}: unknown key {key!r} (known: {known})")
            target = raw.setdefault(section.name, {})
            if isinstance(target, dict):
                target[key] = _env_value(environ[name], section_hints[key])
                used[f"{section.name}.{key}"] = name
    return used


def _format_error(exc: BaseException, type_: Any) -> str:
    if typing.get_origin(type_) is Literal:
        return f"must be one of {list(typing.get_args(type_))}"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown keys {sorted(exc.extra_fields)}"
    if isinstance(exc, InvalidValue):
        # An attrs validator runs in the class's __init__: cattrs' path ends
        # at the class, so the field goes after a mark _describe looks for.
        return f"{_FIELD_MARK}{exc.field}{_FIELD_MARK}{exc.reason}"
    if isinstance(exc, (ValueError, ConfigError)) and not isinstance(
        exc, cattrs.BaseValidationError
    ):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


_FIELD_MARK = "\x00"


def _describe(exc: Exception) -> list[tuple[str, str]]:
    """(key, reason) for each error in ``exc``; key "" when it names no key."""
    if not isinstance(exc, cattrs.BaseValidationError):
        return [("", str(exc))]
    found = []
    for message in cattrs.transform_error(exc, format_exception=_format_error):
        reason, _, where = message.rpartition(" @ ")
        key = where.removeprefix("$").removeprefix(".")
        if reason.startswith(_FIELD_MARK):
            field, _, reason = reason.removeprefix(_FIELD_MARK).partition(_FIELD_MARK)
            key = f"{key}.{field}" if key else field
        found.append((key, reason))
    return found


def structure(
    cls: type[T],
    raw: Mapping[str, Any],
    *,
    source: str,
    from_env: Mapping[str, str] | None = None,
) -> T:
    """``raw`` as ``cls``.

    Raises:
      ConfigError: one line naming where each bad value came from (``source``,
        or the variable ``from_env`` names for its key), the key and the reason.
    """
    try:
        return make_converter().structure(dict(raw), cls)
    except Exception as exc:  # cattrs raises validation groups and plain errors alike
        parts, last = [], None
        for key, reason in _describe(exc):
            origin = (from_env or {}).get(key, source)
            said = f"{key}: {reason}" if key else reason
            parts.append(said if origin == last else f"{origin}: {said}")
            last = origin
        raise ConfigError("; ".join(parts)) from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def load(
    cls: type[T], path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> T:
    """Read ``path`` (or nothing), apply environment overrides, structure as ``cls``.

    Raises:
      ConfigError: one line naming the file, the key and the reason.
    """
    raw = read_toml(path) if path is not None else {}
    from_env = _apply_env(cls, raw, os.environ if environ is None else environ)
    source = str(path) if path is not None else "environment"
    return structure(cls, raw, source=source, from_env=from_env)


def load_models(path: str | os.PathLike[str] | None) -> ModelsFile:
    """Read models.toml (None: no catalogue).

    A file with nothing in it (no bytes, or only whitespace) is refused: it
    is far more likely a file cut short while written than a catalogue
    meant to be empty, which says so with any content at all (a comment
    will do) and no ``[[models]]``.

    Raises:
      ConfigError: one line naming the file and the reason.
    """
    if path is None:
        return ModelsFile()
    raw = read_toml(path)
    if not raw and _blank(path):
        raise ConfigError(
            f"{path}: the file is empty (cut short while written?); an empty catalogue "
            "needs some content, such as a comment"
        )
    models = structure(ModelsFile, raw, source=str(path))
    ids = [m.id for m in models.models]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{path}: models: duplicate ids {duplicates}")
    for alias, target in models.aliases.items():
        if alias in ids:
            raise ConfigError(f"{path}: aliases.{alias}: alias shadows a model id")
        for member in [target] if isinstance(target, str) else target:
            if member not in ids:
                raise ConfigError(f"{path}: aliases.{alias}: unknown model {member!r}")
    return models


def _blank(path: str | os.PathLike[str]) -> bool:
    try:
        return not Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None


def check_pins(models: ModelsFile, neurons: Iterable[str], *, source: str) -> None:
    """Refuse a ``pinned_on`` that names no neuron the gateway routes to.

    The gateway's neurons are fixed at start (cortex.toml, --neuron; the
    standalone role's is "local"), so a name that is none of them is a typo.

    Raises:
      ConfigError: one line naming the file, the model and the neuron.
    """
    known = sorted(set(neurons))
    for index, model in enumerate(models.models):
        for name in model.pinned_on:
            if name not in known:
                raise ConfigError(
                    f"{source}: models[{index}].pinned_on: {model.id!r} is pinned on "
                    f"{name!r}, which is not a neuron (the neurons: {', '.join(known)})"
                )


def read_api_keys(section: GatewaySection) -> frozenset[str]:
    """``api_keys`` and the keys in ``api_keys_file`` (a line each, ``#`` comments).

    Raises:
      ConfigError: the file cannot be read, or holds no key: an empty or
        truncated keys file would leave the gateway open to anyone.
    """
    keys = {k for k in section.api_keys if k and not k.startswith("#")}
    if section.api_keys_file:
        try:
            text = Path(section.api_keys_file).read_text()
        except OSError as exc:
            raise ConfigError(f"{section.api_keys_file}: {exc.strerror}") from None
        found = {line.strip() for line in text.splitlines()}
        found = {k for k in found if k and not k.startswith("#")}
        if not found:
            raise ConfigError(f"{section.api_keys_file}: no API key in it")
        keys |= found
    return frozenset(keys)
