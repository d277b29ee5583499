"""From cortex's engine-neutral output constraints to llama.cpp grammars (GBNF).

The neuron asks for a shape (``cortex.harness.JsonSchema`` or
``ToolCalls``); this module writes the grammar that holds sampling to it.
JSON schemas go through llama-cpp-python's own converter; tool calls are
the family's markup (``cortex.toolcalls``) around one JSON object per call.

Other engines with a GBNF sampler may import :func:`grammar_for` as it is.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_cpp.llama_grammar import INVALID_RULE_CHARS_RE, SchemaConverter

from cortex.errors import InvalidRequest
from cortex.harness import JsonSchema, OutputConstraint, ToolCalls
from cortex.toolcalls import HERMES_CLOSE, HERMES_OPEN, MISTRAL_OPEN, check_family


def grammar_for(constraint: OutputConstraint) -> str:
    """The GBNF grammar that enforces ``constraint``.

    Grammars for many large tool schemas take a while to build: call it
    from a worker thread, as ``generate`` is.

    Raises:
      InvalidRequest: a JSON schema that does not convert, or a constraint
        of a kind this engine does not know.
    """
    if isinstance(constraint, JsonSchema):
        return json_grammar(constraint.schema, param=constraint.param)
    if isinstance(constraint, ToolCalls):
        return tool_call_grammar(
            constraint.family,
            constraint.functions,
            parallel=constraint.parallel,
            params=constraint.parameters or (constraint.param,) * len(constraint.functions),
        )
    raise InvalidRequest(
        f"the llama.cpp engine cannot enforce a {type(constraint).__name__} constraint"
    )


class _SchemaConverter(SchemaConverter):
    """llama.cpp's converter, with a rule of its own for each ``$ref``.

    Upstream names a ref's rule after its last path segment and takes any
    rule of that name for the ref: two tools that each define
    ``#/$defs/Item`` (pydantic's names are class names) would both get the
    first tool's ``Item``.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._ref_rules: dict[str, str] = {}

    def resolve_refs(self, schema: Any, url: str) -> Any:
        # Upstream looks no further into a mapping once it holds a "$ref": a
        # root "$ref" beside the "$defs" it points into (pydantic's schema of
        # a recursive model) left the refs inside those definitions unresolved.
        if isinstance(schema, dict) and "$ref" in schema:
            ref = schema.pop("$ref")
            try:
                super().resolve_refs(schema, url)
            finally:
                schema["$ref"] = ref
        return super().resolve_refs(schema, url)

    def _resolve_ref(self, ref: str) -> str:
        name = self._ref_rules.get(ref)
        if name is None:
            base = INVALID_RULE_CHARS_RE.sub("-", ref.split("/")[-1])
            taken = set(self._rules) | set(self._ref_rules.values())
            name, n = base, 0
            while name in taken:
                name, n = f"{base}{n}", n + 1
            # Named before it is built: a recursive schema refers to itself.
            self._ref_rules[ref] = name
            self._refs_being_resolved.add(ref)
            self._ref_rules[ref] = self.visit(self._refs[ref], name)
            self._refs_being_resolved.discard(ref)
        return self._ref_rules[ref]


def _schema_converter() -> Any:
    return _SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)


def _literal(text: str) -> str:
    # JSON string escapes are valid GBNF literal escapes.
    return json.dumps(text, ensure_ascii=False)


def json_grammar(schema: Mapping[str, Any] | None, *, param: str = "response_format") -> str:
    """A GBNF grammar for JSON text matching ``schema`` (None: any JSON object).

    Raises:
      InvalidRequest: the schema cannot be turned into a grammar.
    """
    converter = _schema_converter()
    try:
        # A copy: resolving rewrites the refs in place, and the schema is the client's.
        resolved = converter.resolve_refs(copy.deepcopy(schema or {"type": "object"}), "schema")
        converter.visit(resolved, "")
        return converter.format_grammar()
    except InvalidRequest:
        raise
    except Exception as exc:
        raise InvalidRequest(
            f"{param}: cannot build a grammar from the JSON schema: {_why(exc)}", param=param
        )


def _why(exc: Exception) -> str:
    # The converter's reasons can quote the whole schema back.
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def tool_call_grammar(
    family: str,
    functions: Sequence[Mapping[str, Any]],
    *,
    parallel: bool = True,
    params: Sequence[str] = (),
) -> str:
    """A GBNF grammar whose every output is a call (or, with ``parallel``, calls)
    in ``family``'s markup to one of ``functions``.

    ``functions`` are OpenAI ``tool.function`` objects; each call's arguments
    follow the function's ``parameters`` schema. ``params`` names where the
    request holds each of those schemas (default ``tools``).

    Raises:
      InvalidRequest: a ``parameters`` schema does not convert. A call whose
        arguments could be anything would not be the call the schema asks for.
    """
    check_family(family)
    converter = _schema_converter()
    arguments_key = "parameters" if family == "llama3" else "arguments"
    names = []
    for i, function in enumerate(functions):
        name = f"tool-call-{i}"
        try:
            # Resolved on their own: their "#/$defs/..." refs point into them,
            # not into the call object around them.
            arguments = converter.resolve_refs(
                copy.deepcopy(function.get("parameters") or {"type": "object"}), name
            )
            schema = {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, arguments_key: arguments},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
            converter.visit(schema, name)
        except Exception as exc:
            param = params[i] if i < len(params) else "tools"
            raise InvalidRequest(
                f"{param}: cannot build a grammar from the JSON schema of tool "
                f"{function['name']!r}: {_why(exc)}",
                param=param,
            )
        names.append(name)
    if not names:
        raise InvalidRequest("no function to call", param="tool_choice")
    call = " | ".join(names)
    if family == "hermes":
        one = f"{_literal(HERMES_OPEN + chr(10))} ( {call} ) {_literal(chr(10) + HERMES_CLOSE)}"
        # Blocks follow one another directly, with no newline between: models
        # write a newline after a call whether or not another follows, and
        # once a newline could only lead to another block, that newline
        # forced a call after every call (a model that would have ended its
        # turn repeated its call until the token limit). Here the token after
        # a block is the model's end of turn, or the next block's opening.
        more = " ( tool-block )*" if parallel else ""
        root = f"tool-block{more}"
        rules = f"root ::= {root}\ntool-block ::= {one}\n"
    elif family == "llama3":
        root = 'tool-any ( "; " tool-any )*' if parallel else "tool-any"
        rules = f"root ::= {root}\ntool-any ::= {call}\n"
    else:
        more = ' ( ", " tool-any )*' if parallel else ""
        rules = f'root ::= {_literal(MISTRAL_OPEN + "[")} tool-any{more} "]"\ntool-any ::= {call}\n'
    return rules + converter.format_grammar()
