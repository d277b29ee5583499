"""Tool-call families, the streaming parser, the output plan and its grammars (no engine)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from cortex import toolcalls
from cortex.errors import InvalidRequest
from cortex.harness import JsonSchema, ToolCalls
from cortex.neuron.tools import OutputPlan, plan_output
from cortex.toolcalls import _WS, ToolCallDelta, ToolCallParser, parse_tool_calls
from cortex_llamacpp.grammar import grammar_for, tool_call_grammar


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def run(pieces: list[str], family: str) -> tuple[str, list[tuple[str, str]], list]:
    """Feed ``pieces`` one by one: the content, the calls and every piece given out."""
    parser = ToolCallParser(family, new_id=ids())
    out = []
    for piece in pieces:
        out += parser.feed(piece)
    out += parser.flush()
    content = "".join(p for p in out if isinstance(p, str))
    return content, [(c.name, c.arguments) for c in parser.calls], out


def check_deltas(out: list) -> list[tuple[str, str]]:
    """The calls the deltas describe; checks the OpenAI delta discipline on the way."""
    calls: dict[int, list[str]] = {}
    for piece in out:
        if not isinstance(piece, ToolCallDelta):
            continue
        if piece.index not in calls:
            assert piece.index == len(calls)
            assert piece.id and piece.name and piece.arguments == ""
            assert piece.to_openai()["type"] == "function"
            calls[piece.index] = [piece.name, ""]
        else:
            assert piece.id is None and piece.name is None
            assert set(piece.to_openai()) == {"index", "function"}
            calls[piece.index][1] += piece.arguments
    return [(name, arguments) for name, arguments in calls.values()]


HERMES_TWO = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)

CASES = [
    # family, text, content, calls
    ("hermes", "Just text, no calls.", "Just text, no calls.", []),
    (
        "hermes",
        HERMES_TWO,
        "Let me check.",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    (
        "hermes",
        '<tool_call>{"name": "f", "arguments": {"a": [1, {"b": "}</tool_call>"}]}}</tool_call>',
        "",
        [("f", '{"a": [1, {"b": "}</tool_call>"}]}')],
    ),
    # Arguments before the name; arguments as a JSON string; no arguments at all.
    (
        "hermes",
        '<tool_call>{"arguments": {"a": 1}, "name": "f"}</tool_call>',
        "",
        [("f", '{"a": 1}')],
    ),
    (
        "hermes",
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        "",
        [("f", '{"a": 1}')],
    ),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>', "", [("f", "{}")]),
    # No closing tag, text after the call, a second call without a closing tag.
    (
        "hermes",
        '<tool_call>{"name": "f", "arguments": {}}\n\nDone.',
        "Done.",
        [("f", "{}")],
    ),
    (
        "hermes",
        '<tool_call>{"name": "f", "arguments": {}}<tool_call>{"name": "g", "arguments": {}}',
        "",
        [("f", "{}"), ("g", "{}")],
    ),
    # Cut short by the token limit: the call keeps what it has.
    ("hermes", '<tool_call>{"name": "f", "arguments": {"a": "Par', "", [("f", '{"a": "Par')]),
    ("hermes", 'Hi <tool_call>{"name": "f", "arguments": {}}\n</tool_c', "Hi", [("f", "{}")]),
    (
        "llama3",
        '{"name": "f", "parameters": {"q": 1}}; {"name": "g", "parameters": {}}',
        "",
        [("f", '{"q": 1}'), ("g", "{}")],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "f", "parameters": {"q": true}}',
        "",
        [("f", '{"q": true}')],
    ),
    ("llama3", '\n{"name": "f", "parameters": {"q": null}}\n', "", [("f", '{"q": null}')]),
    (
        "mistral",
        '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]',
        "",
        [("f", '{"a": 1}'), ("g", "{}")],
    ),
    (
        "mistral",
        'Sure. [TOOL_CALLS] [{"name": "f", "arguments": {"x": -1.5e3}, "id": "abc123def"}]',
        "Sure.",
        [("f", '{"x": -1.5e3}')],
    ),
]

MALFORMED = [
    ("hermes", "<tool_call>oops</tool_call> hi"),
    ("hermes", '<tool_call>{"name": 5}</tool_call>'),
    ("hermes", '<tool_call>{"name" "f"}</tool_call>'),
    ("hermes", '<tool_call>{"city": "Paris"}</tool_call>'),
    ("hermes", "a < b and <tool_call >x"),
    ("llama3", '{"answer": 42}'),
    ("llama3", '  Sure {"name": "f", "parameters": {}}'),
    ("llama3", "<|python_tag|>brave_search.call(query='x')"),
    ("llama3", "{not json at all"),
    ("mistral", "[TOOL_CALLS] nope"),
    ("mistral", "[TOOL_CALLS][1, 2]"),
]


#: Output cut short by the token limit inside markup, before a call's
#: arguments begin: the markup is neither content nor a call.
CUT = [
    ("hermes", "<tool_call>", "", []),
    ("hermes", '<tool_call>\n{"', "", []),
    ("hermes", 'Hello <tool_call>\n{"name": "f", "arguments"', "Hello", []),
    ("hermes", "Hello <tool_call", "Hello", []),
    ("hermes", "1 <", "1 <", []),
    (
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><tool_call>\n{"name',
        "",
        [("f", '{"a": 1}')],
    ),
    ("llama3", '{"name": "f", "param', "", []),
    ("llama3", '<|python_tag|>{"na', "", []),
    ("llama3", '{"na', '{"na', []),
    ("mistral", "[TOOL_", "", []),
    ("mistral", 'Sure. [TOOL_CALLS][{"name": "f", "arguments": {}}, {"na', "Sure.", [("f", "{}")]),
]


@pytest.mark.parametrize(("family", "text", "content", "calls"), CUT)
def test_markup_cut_short_is_dropped(family: str, text: str, content: str, calls: list) -> None:
    for at in range(len(text) + 1):
        got, parsed, out = run([text[:at], text[at:]], family)
        assert (got, parsed) == (content, calls), at
        assert check_deltas(out) == calls
    assert run(list(text), family)[:2] == (content, calls)


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
def test_families(family: str, text: str, content: str, calls: list) -> None:
    got, parsed, out = run([text], family)
    assert (got, parsed) == (content, calls)
    assert check_deltas(out) == calls


@pytest.mark.parametrize(("family", "text", "content", "calls"), CASES)
def test_every_split_gives_the_same_answer(
    family: str, text: str, content: str, calls: list
) -> None:
    for at in range(len(text) + 1):
        got, parsed, out = run([text[:at], text[at:]], family)
        assert (got, parsed) == (content, calls), at
        assert check_deltas(out) == calls
    got, parsed, out = run(list(text), family)
    assert (got, parsed) == (content, calls)
    assert check_deltas(out) == calls


@pytest.mark.parametrize(("family", "text"), MALFORMED)
def test_malformed_output_is_text(family: str, text: str) -> None:
    for at in range(len(text) + 1):
        assert run([text[:at], text[at:]], family)[:2] == (text, [])
    assert run(list(text), family)[:2] == (text, [])


def test_text_streams_and_only_possible_markup_is_held() -> None:
    parser = ToolCallParser("hermes", new_id=ids())
    assert parser.feed("Hello wor") == ["Hello wor"]
    # A space may precede a call, and "<tool" may start one: both wait.
    assert parser.feed("ld <tool") == ["ld"]
    assert parser.feed("box>") == [" <toolbox>"]
    assert parser.feed(" <tool_call>") == []
    pieces = parser.feed('{"name": "f", "arguments": {"a"')
    assert pieces == [ToolCallDelta(0, id="call_0", name="f"), ToolCallDelta(0, '{"a"')]
    assert parser.feed(": 1}}") == [ToolCallDelta(0, ": 1}")]
    assert parser.feed("</tool_call>\n") == []
    assert parser.flush() == []
    assert [c.to_openai() for c in parser.calls] == [
        {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]


def test_random_output_never_crashes_or_loses_text() -> None:
    """Random mixes of markup and JSON fragments: no exception, and with no call, no loss."""
    fragments = [
        "<tool_call>",
        "</tool_call>",
        "[TOOL_CALLS]",
        "<|python_tag|>",
        '{"name": "f", ',
        '"arguments": ',
        '"parameters": ',
        "{",
        "}",
        "[",
        "]",
        '"',
        "\\",
        ",",
        ":",
        " ",
        "\n",
        "text",
        "1",
        "é",
    ]
    rng = random.Random(5)
    for _ in range(600):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 14)))
        for family in toolcalls.FAMILIES:
            content, calls, out = run([text], family)
            assert check_deltas(out) == calls
            cut = rng.randint(0, len(text))
            assert run([text[:cut], text[cut:]], family)[:2] == (content, calls)
            if not calls:
                # All of it, but for markup the output ends in (cut short).
                assert text.startswith(content)
                rest = text[len(content) :].lstrip(_WS)
                assert (
                    not rest
                    or rest[0] == "{"
                    or any(rest.startswith(m) or m.startswith(rest) for m in toolcalls.MARKUP)
                ), (text, content)
            else:
                for name, _ in calls:
                    assert name == "f"


def test_parse_tool_calls_whole_text() -> None:
    content, calls = parse_tool_calls(HERMES_TWO, "hermes", new_id=ids())
    assert content == "Let me check."
    assert [c.id for c in calls] == ["call_0", "call_1"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    with pytest.raises(ValueError):
        ToolCallParser("nope")


# -- families ---------------------------------------------------------------------------

QWEN = (
    "{%- if tools %}...<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>"
    'For each function call, return a json object ...:\\n<tool_call>\\n{"name": ...}'
)
LLAMA31 = (
    "<|start_header_id|>ipython<|end_header_id|>{%- if builtin_tools is defined %}"
    "{{- '<|python_tag|>' + tool_call.name + '.call(' }}"
)
LLAMA32 = (
    "{{- '<|start_header_id|>user<|end_header_id|>' }} Given the following functions {{ tools }}"
)
MISTRAL = "{%- if tools %}[AVAILABLE_TOOLS]...{{- '[TOOL_CALLS][' }}"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\\n{{ m.content }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize(
    ("template", "name", "family"),
    [
        (QWEN, None, "hermes"),
        (LLAMA31, None, "llama3"),
        (LLAMA32, None, "llama3"),
        (MISTRAL, None, "mistral"),
        (CHATML, None, None),
        (None, None, None),
        (CHATML, "Qwen2.5 7B Instruct", "hermes"),
        (None, "Meta-Llama-3.1-8B-Instruct", "llama3"),
        (None, "Mistral-7B-Instruct-v0.3", "mistral"),
    ],
)
def test_detect_family(template: str | None, name: str | None, family: str | None) -> None:
    assert toolcalls.detect_family(template, name=name) == family


def test_family_of_a_model() -> None:
    class Model:
        tool_format = None

    assert toolcalls.family_of(Model()) == toolcalls.DEFAULT_FAMILY
    Model.tool_format = "mistral"
    assert toolcalls.family_of(Model()) == "mistral"


# -- the output plan --------------------------------------------------------------------

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def plan(**kwargs):
    values = dict(
        family="hermes",
        tools=None,
        tool_choice=None,
        parallel_tool_calls=None,
        response_format=None,
    )
    values.update(kwargs)
    return plan_output(**values)


def grammar(plan: OutputPlan) -> str | None:
    """The llama.cpp grammar for the plan's constraint, as that engine builds it."""
    return None if plan.constraint is None else grammar_for(plan.constraint)


def test_plan_output() -> None:
    assert plan().plain
    auto = plan(tools=[TOOL])
    assert (auto.tools, auto.family, grammar(auto)) == ([TOOL], "hermes", None)
    none = plan(tools=[TOOL], tool_choice="none")
    assert none.plain and none.tools is None
    required = plan(tools=[TOOL], tool_choice="required")
    assert required.family == "hermes" and "<tool_call>" in grammar(required)
    named = plan(
        tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    assert '"\\"get_weather\\""' in grammar(named)
    with pytest.raises(InvalidRequest):
        plan(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "other"}})
    with pytest.raises(InvalidRequest):
        plan(tool_choice="required")
    assert plan(response_format={"type": "text"}).plain
    json_object = plan(response_format={"type": "json_object"})
    assert json_object.family is None and "root ::=" in grammar(json_object)
    # A forced call wins over a response format.
    both = plan(tools=[TOOL], tool_choice="required", response_format={"type": "json_object"})
    assert grammar(both) == grammar(required)


@pytest.mark.parametrize("family", toolcalls.FAMILIES)
def test_tool_call_grammar_markup(family: str) -> None:
    grammar = tool_call_grammar(family, [TOOL["function"]], parallel=False)
    assert grammar.startswith("root ::= ")
    head = "\n".join(grammar.splitlines()[:2])
    markup = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS][", "llama3": "tool-any"}[family]
    assert markup in head
    key = "parameters" if family == "llama3" else "arguments"
    assert f'"\\"{key}\\""' in grammar


def test_constraints_are_engine_neutral() -> None:
    required = plan(tools=[TOOL], tool_choice="required", parallel_tool_calls=False)
    assert required.constraint == ToolCalls(
        family="hermes",
        functions=(TOOL["function"],),
        parallel=False,
        parameters=("tools[0].function.parameters",),
    )
    schema = {"type": "object"}
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    json_schema = plan(response_format=spec)
    assert json_schema.constraint == JsonSchema(schema, param="response_format.json_schema")
    assert plan(response_format={"type": "json_object"}).constraint == JsonSchema(None)


def test_a_schema_that_does_not_convert_is_the_clients_fault() -> None:
    with pytest.raises(InvalidRequest) as refused:
        grammar_for(JsonSchema({"$ref": "#/nope"}, param="response_format.json_schema"))
    assert refused.value.param == "response_format.json_schema"


def test_a_tools_schema_is_held_to_as_given_or_refused() -> None:
    # A ref into the tool's own $defs (what pydantic writes) resolves there,
    # and the client's schema is left as it came.
    unit = {"type": "string", "enum": ["celsius", "fahrenheit"]}
    parameters = {
        "type": "object",
        "$defs": {"Unit": unit},
        "properties": {"unit": {"$ref": "#/$defs/Unit"}},
    }
    sent = json.dumps(parameters)
    grammar = tool_call_grammar("hermes", [{"name": "f", "parameters": parameters}])
    assert '"\\"celsius\\""' in grammar
    assert json.dumps(parameters) == sent
    # Two tools' $defs of one name are each their own (llama.cpp's converter
    # gave the second tool the first one's Item).
    first = {
        "type": "object",
        "$defs": {"Item": {"enum": ["a"]}},
        "properties": {"i": {"$ref": "#/$defs/Item"}},
    }
    second = {
        "type": "object",
        "$defs": {"Item": {"enum": ["x"]}},
        "properties": {"i": {"$ref": "#/$defs/Item"}},
    }
    both = tool_call_grammar(
        "hermes", [{"name": "f", "parameters": first}, {"name": "g", "parameters": second}]
    )
    rules = dict(line.split(" ::= ", 1) for line in both.splitlines() if " ::= " in line)
    assert rules[rules["tool-call-0-arguments-i"]] == '"\\"a\\""', rules
    assert rules[rules["tool-call-1-arguments-i"]] == '"\\"x\\""', rules
    # One that resolves nowhere is refused, naming the tool and where it is.
    broken = {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}
    functions = [{"name": "f", "parameters": parameters}, {"name": "g", "parameters": broken}]
    with pytest.raises(InvalidRequest) as refused:
        tool_call_grammar("hermes", functions, params=("tools[0].x", "tools[1].x"))
    assert refused.value.param == "tools[1].x"
    assert refused.value.message.startswith(
        "tools[1].x: cannot build a grammar from the JSON schema of tool 'g'"
    )
