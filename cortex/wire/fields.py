"""Field rules shared by the dialect parsers (OpenAI, Responses, Anthropic).

Types and ranges are attrs validators: a request value declares them on its
fields (``SamplingOverrides``), and the readers below (``opt_int`` and the
rest) apply the very same validators to one key of a decoded body. Each
raises ``InvalidRequest`` naming the field as ``param``, so the client sees
which field was wrong.

Numbers reach the engines as C integers and floats: token counts and ids
are bounded to 32 bits, seeds to 64, and no float may be NaN or infinite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import attrs

from cortex.errors import InvalidRequest

#: The most tokens a request may ask for (the engines count in C ints).
MAX_TOKENS = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)
#: The most stop strings a request may hold (OpenAI's ``stop``, Anthropic's
#: ``stop_sequences``). OpenAI's API takes 4 and Anthropic's sets no limit;
#: the engine looks for each after every token, so some bound there is.
MAX_STOP = 64
#: OpenAI's range for one ``logit_bias`` value.
LOGIT_BIAS_RANGE = (-100.0, 100.0)


def whole(value: Any) -> Any:
    """Converter: an integral float (``16.0`` from a JavaScript client) to int; else as is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def real(value: Any) -> Any:
    """Converter: an int to float; else as is (the validator judges it)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def shown(value: Any) -> str:
    """A client's value as an error message quotes it, never as Python writes it.

    A string is quoted as the messages quote names (``'bot'``); anything else
    is JSON (``null``, ``true``, ``["text", "audio"]``), cut to 100 characters.
    """
    if isinstance(value, str):
        return repr(value)
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= 100 else text[:97] + "..."


def _name(attribute: attrs.Attribute) -> str:
    return attribute.alias or attribute.name


@attrs.frozen
class Integer:
    """Validator: an int (never a bool) in ``[low, high]``."""

    low: int | None = None
    high: int | None = None

    def __call__(self, instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        self.check(_name(attribute), value)

    def check(self, key: str, value: Any) -> int:
        # bool is an int subclass; `true` is not a token count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{key} must be an integer", param=key)
        if self.low is not None and value < self.low:
            raise InvalidRequest(f"{key} must be at least {self.low}, got {value}", param=key)
        if self.high is not None and value > self.high:
            got = value if value < 10**20 else f"{value:.6g}"  # 1e308 as a JSON integer
            raise InvalidRequest(f"{key} must be at most {self.high}, got {got}", param=key)
        return value


@attrs.frozen
class Number:
    """Validator: a finite float in ``[low, high]``."""

    low: float
    high: float | None = None

    def __call__(self, instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        self.check(_name(attribute), value)

    def check(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
            raise InvalidRequest(f"{key} must be a number", param=key)
        if value < self.low or (self.high is not None and value > self.high):
            if self.high is None:
                bound = f"at least {self.low:g}"
            else:
                bound = f"in [{self.low:g}, {self.high:g}]"
            raise InvalidRequest(f"{key} must be {bound}, got {value:g}", param=key)
        return value


def logit_bias(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """Validator: ``{"<token id>": bias}`` with biases in ``LOGIT_BIAS_RANGE``."""
    key = _name(attribute)
    low, high = LOGIT_BIAS_RANGE
    shape = f"{key} must be an object mapping token ids to numbers in [{low:g}, {high:g}]"
    if not isinstance(value, dict):
        raise InvalidRequest(shape, param=key)
    for token, bias in value.items():
        if not (token.isascii() and token.isdigit() and int(token) <= MAX_TOKENS):
            raise InvalidRequest(f"{shape}; {token[:32]!r} is no token id", param=key)
        bias = real(bias)
        if isinstance(bias, bool) or not isinstance(bias, float) or not low <= bias <= high:
            raise InvalidRequest(f"{shape}; got {shown(bias)} for token {token}", param=key)


# -- readers: one key of a decoded body -------------------------------------------------


def require_object(body: Any, what: str = "request body") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return body


def model(body: Mapping[str, Any]) -> str:
    """The ``model`` field: a non-empty string."""
    value = body.get("model")
    if value is None:
        raise InvalidRequest("model: field required", param="model")
    if not isinstance(value, str) or not value:
        raise InvalidRequest("model must be a non-empty string", param="model")
    return value


def check_stop_count(value: list[str], key: str) -> None:
    """At most ``MAX_STOP`` stop strings in ``value`` (``body[key]``)."""
    if len(value) > MAX_STOP:
        raise InvalidRequest(
            f"{key} may hold at most {MAX_STOP} strings, got {len(value)}", param=key
        )


def opt_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string", param=key)
    return value


def opt_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{key} must be a boolean", param=key)
    return value


def opt_int(
    body: Mapping[str, Any], key: str, *, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    """``body[key]`` checked by :class:`Integer`; None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    return Integer(minimum, maximum).check(key, whole(value))


def opt_tokens(body: Mapping[str, Any], key: str) -> int | None:
    """A token count: 1 to ``MAX_TOKENS``; None when absent or null."""
    return opt_int(body, key, minimum=1, maximum=MAX_TOKENS)


def opt_float(
    body: Mapping[str, Any],
    key: str,
    *,
    low: float,
    high: float | None = None,
) -> float | None:
    """``body[key]`` checked by :class:`Number`; None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    return Number(low, high).check(key, real(value))


def prefill_conflict(param: str, what: str) -> InvalidRequest:
    """The 400 for an output constraint beside an assistant turn to continue (a prefill).

    A forced tool call or a JSON format shapes the whole answer from its
    first token, and a continued answer begins inside the prefill's text:
    the two cannot both hold.
    """
    return InvalidRequest(
        f"{param}: {what} cannot be combined with a final assistant turn to continue "
        "(a prefill): it shapes the answer from its first token, and the answer would "
        "begin inside the prefill's text",
        param=param,
    )


def unsupported_type(
    where: str, noun: str, kind: Any, *, serves: str, why: str | None = None, todo: str
) -> InvalidRequest:
    """The 400 for a tool or input item of a type nothing here serves.

    One wording for every dialect: the type, why cortex cannot serve it, what
    it serves instead and what the client should do, e.g. ``tools[8]: tool
    type 'web_search' is not supported (hosted tools run at OpenAI; cortex
    serves only function tools: remove it)``.

    Args:
      where: the field; also the error's ``param``.
      noun: what has the type (``tool``, ``input item``).
      kind: the type as sent.
      serves: what cortex takes instead.
      why: the reason this type cannot be served, when there is more to say.
      todo: what to do about it.
    """
    reason = f"{why}; " if why else ""
    return InvalidRequest(
        f"{where}: {noun} type {shown(kind)} is not supported "
        f"({reason}cortex serves {serves}: {todo})",
        param=where,
    )
