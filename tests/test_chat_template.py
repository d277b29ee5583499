"""The generic forms for what a chat template cannot take (``cortex.chat_template``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cortex.chat_template import (
    TOOLS_FOOTER,
    TOOLS_HEADER,
    TemplateSupport,
    adapt_chat,
    fold_system,
    probe_template,
    tool_turns_as_text,
    tools_text,
)
from cortex.errors import InvalidRequest

TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
#: The exact text README.md documents, for TOOL.
TOOL_TEXT = (
    "# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n"
    '{"type": "function", "function": {"name": "get_time", "parameters": '
    '{"type": "object", "properties": {}}}}\n'
    "</tools>\n\n"
    "For each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)


def _everything(messages, tools):
    return json.dumps([messages, tools])


def _no_system(messages, tools):
    if any(m["role"] == "system" for m in messages):
        raise ValueError("System role not supported")
    return json.dumps(messages)


def _drops_system(messages, tools):
    return json.dumps([m for m in messages if m["role"] != "system"])


@pytest.mark.parametrize(
    ("render", "support"),
    [
        (_everything, TemplateSupport(system=True, tools=True)),
        (_no_system, TemplateSupport(system=False, tools=False)),
        (_drops_system, TemplateSupport(system=False, tools=False)),
    ],
)
def test_probe(render, support):
    assert probe_template(render) == support


def test_tools_text_is_the_documented_hermes_block():
    assert tools_text([TOOL]) == TOOL_TEXT


def test_leading_system_folds_into_the_first_user_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    assert fold_system(messages) == [
        {"role": "user", "content": "Be brief.\n\nHi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]


def test_later_system_messages_fold_forward_or_into_the_user_turn_before():
    # Claude Code puts a reminder right after the user's turn.
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "system", "content": "Reminder A."},
        {"role": "user", "content": "Go"},
        {"role": "system", "content": "Reminder B."},
    ]
    assert fold_system(messages) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Reminder A.\n\nGo\n\nReminder B."},
    ]
    # The next turn renders that turn the same: the reminder stays with "Go"
    # (a prompt that only grows at its end keeps the prompt cache).
    going_on = [
        *messages,
        {"role": "assistant", "content": "Done"},
        {"role": "user", "content": "Thanks"},
    ]
    assert fold_system(going_on) == [
        *fold_system(messages),
        {"role": "assistant", "content": "Done"},
        {"role": "user", "content": "Thanks"},
    ]
    after_assistant = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert fold_system([*after_assistant, {"role": "system", "content": "S"}]) == [
        *after_assistant,
        {"role": "user", "content": "S"},
    ]


def test_tool_turns_become_hermes_text():
    messages = [
        {"role": "user", "content": "Time in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"city": "Oslo"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "?"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
        {"role": "tool", "tool_call_id": "c2", "content": "one"},
        {"role": "user", "content": "Thanks"},
    ]
    assert tool_turns_as_text(messages) == [
        messages[0],
        {
            "role": "assistant",
            "content": 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": "?"}\n</tool_call>',
        },
        {
            "role": "user",
            "content": "<tool_response>\nnoon\n</tool_response>\n"
            "<tool_response>\none\n</tool_response>",
        },
        messages[-1],
    ]


def test_adapt_writes_tools_into_the_system_text_then_folds_it():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    both = TemplateSupport(system=False, tools=False)
    assert adapt_chat(messages, [TOOL], both) == (
        [{"role": "user", "content": f"Be brief.\n\n{TOOL_TEXT}\n\nHi"}],
        None,
    )
    system_only = TemplateSupport(system=True, tools=False)
    assert adapt_chat(messages[1:], [TOOL], system_only) == (
        [{"role": "system", "content": TOOL_TEXT}, messages[1]],
        None,
    )
    assert adapt_chat(messages, [TOOL], TemplateSupport()) == (messages, [TOOL])


def test_non_text_parts_are_never_folded_away():
    content = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": content}]
    with pytest.raises(InvalidRequest, match="'image_url'"):
        fold_system(messages)
    text_only = [{"role": "system", "content": "S"}, {"role": "user", "content": content[:1]}]
    assert fold_system(text_only) == [{"role": "user", "content": "S\n\na"}]


def test_readme_documents_the_tools_text():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = {line.strip() for line in readme.splitlines()}
    for line in (TOOLS_HEADER + TOOLS_FOOTER).splitlines():
        assert line.strip() in lines, line
