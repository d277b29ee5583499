"""Helpers for testing cortex and engine plugins: a fake engine.

``FakeEngine`` is a complete engine plugin with no model files: it loads any
path whose name ends in ``.fake`` (or any path when a load names the
``fake`` harness), tokenizes bytes, and answers with a scripted reply. Plugin
authors can copy its shape; tests use it where a real engine cannot be made
to misbehave on purpose (slow tokens, failures mid-generation).

    from cortex.testing import FakeEngine
    engine = FakeEngine(reply=lambda prompt: "Hello!", token_delay=0.01)
    async with running_neuron(plugins=[engine]) ...
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from cortex.errors import ModelLoadError
from cortex.harness import (
    CancellableTokens,
    ChatPrompt,
    HarnessInfo,
    LoadedModel,
    LoadSpec,
    Placement,
    Sampling,
    Token,
    hookimpl,
)

BOS = 256
END_OF_TURN = "<|end|>"


class FakeModel(LoadedModel):
    """A model whose tokens are bytes and whose output is scripted."""

    harness = "fake"

    def __init__(
        self,
        model_id: str,
        *,
        reply: Callable[[str], str],
        n_ctx: int = 2048,
        token_delay: float = 0.0,
        fail_after: int | None = None,
        parallel: int = 1,
        tokenize_delay: float = 0.0,
        prompt_delay: float = 0.0,
        counts_progress: bool = True,
        wedged: threading.Event | None = None,
    ) -> None:
        self.model_id = model_id
        # generate() keeps no state between calls: any number may run at once.
        self.parallel = parallel
        self.n_ctx = n_ctx
        self.n_ctx_train = n_ctx
        self._reply = reply
        self._token_delay = token_delay
        self._fail_after = fail_after
        self._tokenize_delay = tokenize_delay
        self._prompt_delay = prompt_delay
        self._counts_progress = counts_progress
        self._wedged = wedged
        # Prompt chunks and tokens so far (LoadedModel.progress).
        self._steps = 0
        self.unloaded = False

    def _check(self) -> None:
        # A real engine would crash on a freed model; the fake says so loudly.
        if self.unloaded:
            raise RuntimeError(f"{self.model_id}: used after unload")

    def memory_mb(self) -> int:
        return 1

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        self._check()
        if self._tokenize_delay:
            time.sleep(self._tokenize_delay)
        self._check()
        return ([BOS] if add_bos else []) + list(text.encode())

    def render_chat(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> ChatPrompt:
        self._check()
        lines = []
        for message in messages:
            content = message.get("content") or ""
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content)
            lines.append(f"{message['role']}: {content}{END_OF_TURN}")
        return ChatPrompt(text="".join(lines) + "assistant: ", stop=(END_OF_TURN,))

    def progress(self) -> int | None:
        return self._steps if self._counts_progress else None

    def generate(self, tokens: list[int], sampling: Sampling) -> Iterator[Token]:
        cancelled = threading.Event()
        return CancellableTokens(self._generate(tokens, cancelled), cancelled.set)

    def _generate(self, tokens: list[int], cancelled: threading.Event) -> Iterator[Token]:
        self._check()
        if self._wedged is not None:
            # Hung (a GPU kernel that never returns): no progress, no cancel.
            self._wedged.wait()
        # The prompt, in chunks of 10 ms that each count as progress; a
        # cancel ends it after the chunk in hand, as llama.cpp's does.
        until = time.monotonic() + self._prompt_delay
        while time.monotonic() < until:
            if cancelled.is_set():
                return
            time.sleep(min(0.01, max(0.0, until - time.monotonic())))
            self._steps += 1
        prompt = bytes(t for t in tokens if t < 256).decode(errors="replace")
        for count, byte in enumerate(self._reply(prompt).encode(), start=1):
            if cancelled.is_set():
                return
            if self._token_delay:
                time.sleep(self._token_delay)
            self._steps += 1
            if self._fail_after is not None and count > self._fail_after:
                raise RuntimeError("the fake engine failed on purpose")
            yield Token(byte, bytes([byte]))

    def unload(self) -> None:
        self.unloaded = True


class FakeEngine:
    """An engine plugin: register the instance with the plugin manager.

    Args:
      reply: the output for a prompt (the rendered prompt text).
      token_delay: seconds per generated token (blocking, as a real engine).
      fail_after: raise after this many tokens, to test failure paths.
      parallel: the generations a loaded model serves at once.
      tokenize_delay: seconds each tokenize call takes (blocking).
      prompt_delay: seconds each generation takes before its first token
        (a long prompt), its progress count moving all along; a cancel
        (``CancellableTokens.cancel``) ends it after the 10 ms chunk in hand.
      counts_progress: whether ``progress()`` counts (False: None, an
        engine that cannot tell).
      wedged: while this is not set, every generation hangs before its
        first token without progress (a hung engine); set it to end that.
    """

    name = "fake"

    def __init__(
        self,
        *,
        reply: Callable[[str], str] = lambda prompt: "Hello from the fake engine.",
        token_delay: float = 0.0,
        fail_after: int | None = None,
        parallel: int = 1,
        tokenize_delay: float = 0.0,
        prompt_delay: float = 0.0,
        counts_progress: bool = True,
        wedged: threading.Event | None = None,
    ) -> None:
        self.reply = reply
        self.token_delay = token_delay
        self.fail_after = fail_after
        self.parallel = parallel
        self.tokenize_delay = tokenize_delay
        self.prompt_delay = prompt_delay
        self.counts_progress = counts_progress
        self.wedged = wedged
        self.loaded: list[FakeModel] = []

    @hookimpl
    def cortex_harness_info(self) -> HarnessInfo:
        return HarnessInfo(name=self.name, version="1.0", formats=("fake",), cuda=False)

    @hookimpl
    def cortex_harness_load(self, spec: LoadSpec, placement: Placement) -> LoadedModel | None:
        if spec.harness not in (None, self.name):
            return None
        if spec.harness is None and not spec.path.endswith(".fake"):
            return None
        unknown = set(spec.options) - {"n_ctx", "n_ctx_max"}
        if unknown:
            raise ModelLoadError(f"fake engine: unknown options {sorted(unknown)}")
        model = FakeModel(
            spec.model_id,
            reply=self.reply,
            n_ctx=int(spec.options.get("n_ctx", 2048)),
            token_delay=self.token_delay,
            fail_after=self.fail_after,
            parallel=self.parallel,
            tokenize_delay=self.tokenize_delay,
            prompt_delay=self.prompt_delay,
            counts_progress=self.counts_progress,
            wedged=self.wedged,
        )
        self.loaded.append(model)
        return model
