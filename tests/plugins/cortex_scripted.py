"""A scripted engine plugin for tests, registered through the entry point.

Tests install it the way a third party's engine is installed: a fixture
writes a ``cortex_scripted`` dist-info whose ``cortex.harness`` entry point
names this module (see ``tests/test_tools_neuron.py``). Its "model file" is
a JSON script (``*.script.json``) whose replies are fixed per prompt:

    {"rules": [{"when": "weather in Paris", "tools": true, "reply": "..."}],
     "default": "..."}

A rule's ``"delay"`` holds its first token that many seconds (a long prompt
on a CPU host).

The first rule whose ``when`` occurs in the last user or tool turn, and
whose ``tools`` (when given) says whether the prompt shows tools, gives the
reply. Prompts render through a Hermes-style Jinja template, so assistant
tool calls and tool results from earlier turns show up in the prompt text.

It takes output constraints the way a third-party engine with a GBNF
sampler would: through ``cortex.toolcalls`` and the llama.cpp engine's
public ``grammar_for``, never the neuron's internals. It records the grammar
(and ignores it: replies are scripted).
"""

from __future__ import annotations

import json
import pathlib
import re
import time
from collections.abc import Iterator
from typing import Any

import jinja2.sandbox

from cortex import toolcalls
from cortex.errors import ModelLoadError
from cortex.harness import (
    ChatPrompt,
    HarnessInfo,
    LoadedModel,
    LoadSpec,
    Placement,
    Sampling,
    Token,
    hookimpl,
)
from cortex_llamacpp.grammar import grammar_for

NAME = "scripted"
END = "<|end|>"
TEMPLATE = (
    "{%- if tools %}<|system|># Tools\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}" + END + "\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}<|tool|>{{ m.tool_call_id }}: {{ m.content }}" + END + "\n"
    "{%- elif m.role == 'assistant' %}<|assistant|>{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>"
    '{"name": {{ c.function.name | tojson }}, "arguments": {{ c.function.arguments }}}'
    "</tool_call>{% endfor %}" + END + "\n"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}" + END + "\n"
    "{%- endif %}{% endfor %}<|assistant|>"
)
_TOKEN = re.compile("|".join(re.escape(m) for m in toolcalls.MARKUP) + r"|[\s\S]{1,2}", re.DOTALL)
_TURN = re.compile(r"<\|(?:user|tool)\|>")


class ScriptedModel(LoadedModel):
    harness = NAME

    def __init__(
        self, model_id: str, script: dict[str, Any], tool_format: str | None, n_ctx: int = 8192
    ) -> None:
        self.model_id = model_id
        self.n_ctx = n_ctx
        self._script = script
        self._template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(TEMPLATE)
        self.tool_format = tool_format or toolcalls.detect_family(TEMPLATE)
        #: Every rendered prompt, and the sampling and grammar of every
        #: generation, for assertions.
        self.prompts: list[str] = []
        self.samplings: list[Sampling] = []
        self.grammars: list[str | None] = []

    def memory_mb(self) -> int:
        return 1

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return list(text.encode())

    def render_chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> ChatPrompt:
        text = self._template.render(messages=messages, tools=tools)
        self.prompts.append(text)
        return ChatPrompt(text=text, stop=(END,), add_bos=False)

    def rule(self, prompt: str) -> dict[str, Any] | None:
        turns = _TURN.split(prompt)
        last = turns[-1] if len(turns) > 1 else prompt
        shows_tools = "# Tools" in prompt
        for rule in self._script.get("rules", ()):
            if rule["when"] in last and rule.get("tools", shows_tools) == shows_tools:
                return rule
        return None

    def reply(self, prompt: str) -> str:
        rule = self.rule(prompt)
        if rule is not None:
            return rule["reply"]
        return self._script.get("default", "Nothing scripted for that.")

    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[Token]:
        self.samplings.append(sampling)
        constraint = sampling.constraint
        # Built before the first token, as a real engine would: a schema that
        # does not convert is the client's 400.
        self.grammars.append(None if constraint is None else grammar_for(constraint))
        prompt = bytes(tokens).decode()
        # A rule's "delay": seconds before its first token (a long prompt on a CPU).
        time.sleep((self.rule(prompt) or {}).get("delay", 0))
        # Markup comes out as one token, the rest two characters a token.
        for piece in _TOKEN.findall(self.reply(prompt)):
            yield Token(0, piece.encode())

    def unload(self) -> None:
        pass


@hookimpl
def cortex_harness_info() -> HarnessInfo:
    return HarnessInfo(name=NAME, version="1.0", formats=("script",))


@hookimpl
def cortex_harness_load(spec: LoadSpec, placement: Placement) -> LoadedModel | None:
    if spec.harness not in (None, NAME):
        return None
    if spec.harness is None and not spec.path.endswith(".script.json"):
        return None
    unknown = set(spec.options) - {"tool_format", "n_ctx", "n_ctx_max"}
    if unknown:
        raise ModelLoadError(f"scripted engine: unknown options {sorted(unknown)}")
    script = json.loads(pathlib.Path(spec.path).read_text())
    n_ctx = int(spec.options.get("n_ctx", 8192))
    return ScriptedModel(spec.model_id, script, spec.options.get("tool_format"), n_ctx)
