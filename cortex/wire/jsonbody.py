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
"""

from __future__ import annotations

import json
import re
from typing import Any

from cortex.errors import InvalidRequest

#: Containers (objects, arrays) a body may nest, the outermost included.
MAX_DEPTH = 100

#: A JSON escape of a UTF-16 surrogate (U+D800 to U+DFFF); a valid pair
#: decodes to one code point, a lone one stays a surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


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
