"""Request bodies: bytes to JSON, for every route of both roles.

One parser so that every malformed body fails the same way, as
``InvalidRequest`` (a 400 in the caller's dialect), never as an exception
the web framework turns into a 500:

- not UTF-8, not JSON, or JSON's non-values (``NaN``, ``Infinity``);
- a string (a key too) holding a lone UTF-16 surrogate: JSON's ``\\ud800``
  escape decodes to a Python ``str`` that cannot be encoded as UTF-8, and
  an engine would fail on it deep in tokenization. JavaScript clients send
  them when they cut a string in the middle of an emoji. The error names
  the field (``messages[0].content``; Anthropic's ``messages.0.content``);
- nested deeper than ``MAX_DEPTH``. ``json.loads`` itself raises
  ``RecursionError`` near the interpreter's recursion limit (100k nested
  arrays are 200 KB), and what parses may still be too deep for whatever
  walks it later (re-encoding, a schema converter), so the bound is far
  below that limit and far above any real request (tool schemas nest a few
  dozen levels at most).

A body may come compressed (``Content-Encoding``): :func:`decode` undoes
gzip and deflate before parsing, and refuses any other encoding (415),
naming it and the ones it takes. The size limit applies to the decoded
body too, checked as it is decompressed: a small bomb never expands in
memory beyond the limit.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

from cortex.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

#: Containers (objects, arrays) a body may nest, the outermost included.
MAX_DEPTH = 100

#: A JSON escape of a UTF-16 surrogate (U+D800 to U+DFFF); a valid pair
#: decodes to one code point, a lone one stays a surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


#: The Content-Encoding values :func:`decode` undoes; ``identity`` is none.
ENCODINGS = ("gzip", "deflate")


def decode(data: bytes, encoding: str | None, *, limit: int) -> bytes:
    """``data`` with its ``Content-Encoding`` undone; as is when it has none.

    A list (``deflate, gzip``: applied in that order) is undone last first.

    Args:
      encoding: the Content-Encoding header, or None.
      limit: the most bytes the decoded body may have.

    Raises:
      UnsupportedMediaType: an encoding other than gzip, deflate or identity.
      PayloadTooLarge: the decoded body is over ``limit``.
      InvalidRequest: the data is not what its encoding says.
    """
    codings = [c.strip().lower() for c in (encoding or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    for coding in codings:
        if coding not in ENCODINGS:
            raise UnsupportedMediaType(
                f"Content-Encoding {coding!r} is not supported: send the body "
                f"uncompressed, or as {' or '.join(ENCODINGS)}"
            )
    for coding in reversed(codings):
        data = _decompress(data, coding, limit)
    return data


def _decompress(data: bytes, coding: str, limit: int) -> bytes:
    # gzip: a header and trailer around deflate (wbits 16+); HTTP's deflate
    # is zlib's format, though some clients send raw deflate (wbits < 0).
    formats = [16 + zlib.MAX_WBITS] if coding == "gzip" else [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    for wbits in formats:
        try:
            return _inflate(data, wbits, limit)
        except zlib.error:
            continue
    raise InvalidRequest(f"request body is not valid {coding} data (its Content-Encoding)")


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    """Decompress every member of ``data``, never more than ``limit`` + 1 bytes out."""
    parts: list[bytes] = []
    size = 0
    while data:
        inflater = zlib.decompressobj(wbits)
        # At most one byte over the limit: enough to know it is over.
        part = inflater.decompress(data, limit - size + 1)
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"request body over the {limit}-byte limit once decoded")
        if not inflater.eof:
            raise zlib.error("truncated")
        parts.append(part)
        # gzip allows members one after another; zlib and raw deflate do not.
        data = inflater.unused_data if wbits > zlib.MAX_WBITS else b""
    return b"".join(parts)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def loads(data: bytes, *, max_depth: int = MAX_DEPTH, dotted: bool = False) -> Any:
    """``data`` decoded as JSON.

    ``dotted``: a place is named in Anthropic's notation (``lone_surrogate_at``).

    Raises:
      InvalidRequest: not valid JSON, a lone surrogate in a string (named
        by its place as ``param``), or nested deeper than ``max_depth``.
    """
    try:
        value = json.loads(data, parse_constant=_not_json)
    except RecursionError:
        raise InvalidRequest(f"request body is nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    # Depth cannot exceed the number of opening brackets: most bodies need no walk.
    if data.count(b"[") + data.count(b"{") > max_depth and depth_over(value, max_depth):
        raise InvalidRequest(f"request body is nested deeper than {max_depth} levels")
    # Only an escape makes a surrogate: raw ones are not UTF-8 and failed above.
    if _SURROGATE_ESCAPE.search(data):
        where = lone_surrogate_at(value, dotted=dotted)
        if where is not None:
            raise InvalidRequest(
                f"{where or 'the body'} holds a lone UTF-16 surrogate (an escape from "
                "\\ud800 to \\udfff without its pair): not valid Unicode text",
                param=where or None,
            )
    return value


def loads_object(
    data: bytes, *, max_depth: int = MAX_DEPTH, dotted: bool = False
) -> dict[str, Any]:
    """``data`` decoded as a JSON object.

    Raises:
      InvalidRequest: as :func:`loads`, or not an object.
    """
    value = loads(data, max_depth=max_depth, dotted=dotted)
    if not isinstance(value, dict):
        raise InvalidRequest("request body must be a JSON object")
    return value


def depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers more than ``limit`` deep (no recursion)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def lone_surrogate_at(value: Any, *, dotted: bool = False) -> str | None:
    """Where ``value`` first holds a string with a lone surrogate, or None.

    The place is a path like ``messages[0].content``, or with ``dotted``
    ``messages.0.content`` as Anthropic writes it (``""``: the value
    itself); a key with one is named by its object's path.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                if _SURROGATE.search(key):
                    return where
                stack.append((child, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend(
                (child, f"{where}.{i}" if dotted else f"{where}[{i}]")
                for i, child in enumerate(item)
            )
    return None
