"""Tools and structured output for one chat request: the output plan.

:func:`plan_output` decides what the chat template sees as ``tools``, which
tool-call family (``cortex.toolcalls``) the answer is read with, and which
engine-neutral constraint (``cortex.harness.OutputConstraint``) the engine
must enforce. Engines turn constraints into what they sample with (the
llama.cpp engine into a grammar); nothing here knows how.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from cortex.errors import InvalidRequest
from cortex.harness import JsonSchema, OutputConstraint, ToolCalls


@attrs.frozen
class OutputPlan:
    """How one chat request's output is produced and read.

    Attributes:
      tools: what the chat template receives as ``tools`` (None: nothing).
      family: the family to parse tool calls with; None reads plain text.
      constraint: the shape the engine must hold the output to, or None.
    """

    tools: list[dict[str, Any]] | None = None
    family: str | None = None
    constraint: OutputConstraint | None = None

    @property
    def plain(self) -> bool:
        """Nothing to parse or constrain: the no-tools fast path."""
        return self.family is None and self.constraint is None


PLAIN = OutputPlan()


@attrs.frozen
class OutputFields:
    """Where a route's request holds the schemas an output plan constrains with.

    The engine that cannot turn a schema into what it samples with refuses
    the request naming the field (``param``), in the route's own notation.

    Attributes:
      schema: the response format's JSON schema.
      parameters: a tool's parameters schema; ``{i}`` is the tool's index.
    """

    schema: str
    parameters: str


CHAT_FIELDS = OutputFields("response_format.json_schema", "tools[{i}].function.parameters")
RESPONSES_FIELDS = OutputFields("text.format.schema", "tools[{i}].parameters")


def plan_output(
    *,
    family: str,
    tools: list[dict[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None,
    parallel_tool_calls: bool | None,
    response_format: Mapping[str, Any] | None,
    fields: OutputFields = CHAT_FIELDS,
) -> OutputPlan:
    """Decide how to render, constrain and parse one request's output.

    ``tool_choice`` none hides the tools from the model; auto (the default
    with tools) lets it choose and parses what it writes; required and a
    named function constrain the output to calls. Without a forced call,
    ``response_format`` json_object / json_schema constrains the output to
    JSON. ``fields`` says how the route names the schemas, for the
    engine's refusal of one.

    Raises:
      InvalidRequest: a choice that names no given tool, or required without
        tools.
    """
    functions = [tool["function"] for tool in tools or ()]
    parameters = [fields.parameters.format(i=i) for i in range(len(functions))]
    choice = tool_choice if tool_choice is not None else ("auto" if functions else "none")
    constraint: OutputConstraint | None = None
    if isinstance(choice, Mapping):
        wanted = choice["function"]["name"]
        named = [i for i, f in enumerate(functions) if f.get("name") == wanted]
        if not named:
            raise InvalidRequest(
                f"tool_choice names function {wanted!r}, which is not in tools",
                param="tool_choice",
            )
        constraint = ToolCalls(
            family=family,
            functions=(functions[named[0]],),
            parallel=False,
            parameters=(parameters[named[0]],),
        )
    elif choice == "required":
        if not functions:
            raise InvalidRequest("tool_choice required needs tools", param="tool_choice")
        constraint = ToolCalls(
            family=family,
            functions=tuple(functions),
            parallel=parallel_tool_calls is not False,
            parameters=tuple(parameters),
        )
    if constraint is None and response_format is not None:
        kind = response_format.get("type")
        if kind == "json_object":
            constraint = JsonSchema(None)
        elif kind == "json_schema":
            spec = response_format.get("json_schema") or {}
            constraint = JsonSchema(spec.get("schema") or {}, param=fields.schema)
    if choice == "none" or not functions:
        return OutputPlan(constraint=constraint)
    return OutputPlan(tools=tools, family=family, constraint=constraint)
