"""One generation, from an HTTP request to its last event: the session.

:class:`Sessions` does the prologue every inference route shares: render the
chat (through an :class:`~cortex.neuron.tools.OutputPlan`), tokenize, check
the context, clamp ``max_tokens``, queue the job and wait for the engine to
admit it. The :class:`Generation` it returns hands out the job's events, or
its whole text, and records the metrics on the way (time to first token,
decode rate, finished jobs). The routes only turn events into a dialect.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

import attrs
import trio

from cortex import toolcalls
from cortex.errors import ContextOverflow, CortexError, Unavailable
from cortex.harness import ChatPrompt, Sampling
from cortex.neuron.metrics import NeuronMetrics
from cortex.neuron.models import ModelManager, ModelSlot
from cortex.neuron.tools import CHAT_FIELDS, PLAIN, RESPONSES_FIELDS, OutputPlan, plan_output
from cortex.neuron.workers import (
    CANCELLED_BY_UNLOAD,
    Delta,
    Done,
    Failed,
    GenerationRequest,
    Job,
    collect,
    tokens_per_second,
)
from cortex.wire import openai, responses

ChatLike = openai.ChatRequest | responses.ResponsesRequest


@attrs.define(eq=False)
class Generation:
    """A queued, admitted job and what its answer is read with.

    Resource handling: ``events`` closes the job when its consumer stops;
    ``finish`` closes it once the answer is whole.
    """

    slot: ModelSlot
    job: Job
    arrived: float
    metrics: NeuronMetrics
    plan: OutputPlan = PLAIN

    def parser(self) -> toolcalls.ToolCallParser | None:
        """A tool-call parser for the answer, or None when it is plain text."""
        family = self.plan.family
        return None if family is None else toolcalls.ToolCallParser(family)

    async def events(self) -> AsyncIterator[Delta | Done | Failed]:
        """The job's events; cancels the job if the consumer stops early."""
        first = True
        try:
            async for event in self.job.events:
                if self.job.scope.cancel_called:
                    # What is still buffered was generated before the cancel:
                    # nothing is sent after it.
                    break
                if first and isinstance(event, Delta):
                    first = False
                    self.metrics.time_to_first_token.labels(self.slot.id).observe(
                        time.perf_counter() - self.arrived
                    )
                if isinstance(event, Done):
                    self._observe_done(event)
                yield event
                if not isinstance(event, Delta):
                    return
            # The worker closed the job without an ending: it was cancelled
            # (the model is being unloaded).
            yield Failed(CANCELLED_BY_UNLOAD)
        finally:
            self.job.close()

    async def finish(self) -> tuple[str, Done]:
        """The whole answer and how it ended."""
        text, done = await collect(self.job)
        if done.completion_tokens:
            self.metrics.time_to_first_token.labels(self.slot.id).observe(
                time.perf_counter() - self.arrived - done.decode_seconds
            )
        self._observe_done(done)
        return text, done

    def _observe_done(self, done: Done) -> None:
        # Counted here, as the answer ends, or by the worker if it never does
        # (ModelManager.on_job_finished): once either way.
        self.metrics.job_finished(self.slot.id, self.job)
        self.metrics.decode_rate(self.slot.id, tokens_per_second(done))


@attrs.define(eq=False)
class Sessions:
    """Starts generations on a neuron's models.

    Args:
      default_max_tokens: the limit of a request that sets none.
    """

    manager: ModelManager
    metrics: NeuronMetrics
    default_max_tokens: int

    async def start_chat(
        self,
        req: ChatLike,
        *,
        max_tokens: int | None,
        stops: Sequence[str],
        endpoint: str,
        arrived: float,
    ) -> Generation:
        """Render, tokenize and queue a chat-shaped request (chat or Responses).

        Args:
          arrived: when the request came in (``time.perf_counter()``), for
            the time to first token.
        """
        with self.manager.using(req.model) as slot:
            plan = output_plan(slot, req)
            continues = isinstance(req, openai.ChatRequest) and req.continue_final_message
            prompt = await render(slot, req.messages, plan.tools, continue_final=continues)
            job = self.queue(
                slot,
                prompt_tokens=await tokenize_prompt(slot, prompt),
                max_tokens=max_tokens,
                sampling=constrained(req.sampling.apply({}), plan),
                stops=stops,
                template_stops=prompt.stop,
                endpoint=endpoint,
            )
        # Admission waits out the prompt (minutes, for a long one) outside
        # ``using``: an unload waits for the slot's users, and must be able
        # to cancel this job meanwhile, not wait for its first token.
        generation = await self.admit(slot, job, arrived=arrived)
        return attrs.evolve(generation, plan=plan)

    async def submit(
        self,
        slot: ModelSlot,
        *,
        prompt_tokens: list[int],
        max_tokens: int | None,
        sampling: Sampling,
        stops: Sequence[str],
        template_stops: Sequence[str],
        endpoint: str,
        arrived: float,
    ) -> Generation:
        """Queue one generation and wait until the engine admits it.

        Raises:
          Unavailable: the model is being unloaded.
          ContextOverflow: the prompt leaves no room in the context.
          CortexError: the queue is full, or the engine refused the request.
        """
        job = self.queue(
            slot,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            sampling=sampling,
            stops=stops,
            template_stops=template_stops,
            endpoint=endpoint,
        )
        return await self.admit(slot, job, arrived=arrived)

    def queue(
        self,
        slot: ModelSlot,
        *,
        prompt_tokens: list[int],
        max_tokens: int | None,
        sampling: Sampling,
        stops: Sequence[str],
        template_stops: Sequence[str],
        endpoint: str,
    ) -> Job:
        """Queue one generation on ``slot``'s worker; ``admit`` waits for it.

        Raises:
          Unavailable: the model is being unloaded.
          ContextOverflow: the prompt leaves no room in the context.
          QueueFull: the model's queue is at its limit.
        """
        # A request that got past serving() before an unload began still runs:
        # the unload waits for it (ModelManager.using) and then drains it.
        if slot.model is None or slot.worker is None:
            raise Unavailable(f"model {slot.id!r} is being unloaded", retry_after=2)
        job = Job(
            GenerationRequest(
                tokens=prompt_tokens,
                sampling=sampling,
                max_tokens=self._limit(slot, len(prompt_tokens), max_tokens, endpoint),
                stops=tuple(stops),
                template_stops=tuple(template_stops),
            )
        )
        try:
            slot.worker.submit(job)
        except CortexError:
            self.metrics.rejected.labels(slot.id).inc()
            raise
        self.metrics.requests.labels(slot.id, endpoint).inc()
        return job

    async def admit(self, slot: ModelSlot, job: Job, *, arrived: float) -> Generation:
        """Wait until the engine admits ``job`` (``Job.wait_admitted``).

        Raises:
          Unavailable: the job was cancelled first (the model is being unloaded).
          CortexError: the engine refused the request.
        """
        try:
            # Before any answer is begun: a request the engine refuses is a
            # 4xx, not a 200 stream that ends in an error.
            await job.wait_admitted()
        except BaseException:
            job.close()
            raise
        return Generation(slot=slot, job=job, arrived=arrived, metrics=self.metrics)

    def _limit(
        self, slot: ModelSlot, prompt_length: int, max_tokens: int | None, endpoint: str
    ) -> int:
        assert slot.model is not None
        room = slot.model.n_ctx - prompt_length
        if room <= 0:
            raise ContextOverflow.of(
                prompt_length, slot.model.n_ctx, param=PROMPT_FIELD.get(endpoint, "messages")
            )
        # Beyond what the context leaves, max_tokens is clamped (finish_reason
        # "length"), never rejected: clients such as Claude Code ask for 32000.
        # A request without one gets the configured default, not the whole
        # context (minutes of decoding for a runaway reply).
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        return min(max_tokens, room)


#: The request field that holds the prompt, per endpoint: a too long prompt's ``param``.
PROMPT_FIELD = {"chat": "messages", "completions": "prompt", "responses": "input"}


def output_plan(slot: ModelSlot, req: ChatLike) -> OutputPlan:
    if req.tools is None and req.response_format is None:
        return PLAIN
    return plan_output(
        family=toolcalls.family_of(slot.model),
        tools=req.tools,
        tool_choice=req.tool_choice,
        parallel_tool_calls=req.parallel_tool_calls,
        response_format=req.response_format,
        fields=RESPONSES_FIELDS if isinstance(req, responses.ResponsesRequest) else CHAT_FIELDS,
    )


def constrained(sampling: Sampling, plan: OutputPlan) -> Sampling:
    if plan.constraint is None:
        return sampling
    return attrs.evolve(sampling, constraint=plan.constraint)


async def render(
    slot: ModelSlot,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    *,
    continue_final: bool = False,
) -> ChatPrompt:
    """The prompt for ``messages``.

    With ``continue_final`` the last message, a text-only assistant turn
    (``openai.parse_chat_request`` checked it), is a prefill: the prompt
    ends with its text and no end of turn (``LoadedModel.render_prefilled``).
    """
    model = slot.model
    assert model is not None
    if continue_final:
        *before, last = messages
        call = partial(model.render_prefilled, before, last["content"] or "", tools=tools)
    else:
        call = partial(model.render_chat, messages, tools=tools)
    return await trio.to_thread.run_sync(call)


async def tokenize_prompt(slot: ModelSlot, prompt: ChatPrompt) -> list[int]:
    assert slot.model is not None
    return await trio.to_thread.run_sync(
        partial(slot.model.tokenize, prompt.text, add_bos=prompt.add_bos, special=prompt.special)
    )


async def tokenize_text(slot: ModelSlot, text: str) -> list[int]:
    assert slot.model is not None
    return await trio.to_thread.run_sync(partial(slot.model.tokenize, text))


def usage_of(done: Done) -> openai.Usage:
    return openai.Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        cached_tokens=done.cached_tokens,
    )


def tool_finish(done: Done, calls: Sequence[toolcalls.ToolCall]) -> tuple[str, str | None]:
    """The finish_reason and stop_sequence of an answer that may hold tool calls.

    A call cut short by the token limit stays ``length``: the client must not
    run it as if it were whole.
    """
    if calls and done.finish_reason != "length":
        return "tool_calls", None
    return done.finish_reason, done.stop_sequence


def outcome(done: Done) -> tuple[str, str | None]:
    """A Responses status and incomplete reason for how generation ended."""
    if done.finish_reason == "length":
        return "incomplete", "max_output_tokens"
    return "completed", None
