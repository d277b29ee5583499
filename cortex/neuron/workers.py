"""Generation workers: the one owner of each loaded model's context.

Each loaded model has one ``GenerationWorker`` task in the neuron's nursery.
Requests reach it as ``Job``s through a bounded channel and are served in
turn; the decode loop runs in a worker thread under the model's
``CapacityLimiter`` and hands text back through the job's own bounded
channel. This worker is where continuous batching would go.

Cancellation: a job's ``scope`` covers its thread. ``Job.cancel()`` (the
client went away, or the model is being unloaded) makes the thread's next
``trio.from_thread`` call raise ``Cancelled``; the thread closes the
engine's generator and the worker moves on to the next job, within a token.
"""

from __future__ import annotations

import logging
import math
import time

import attrs
import trio

from cortex.errors import QueueFull, ServiceError, Unavailable
from cortex.harness import LoadedModel, Sampling
from cortex.neuron.stops import StopScanner

log = logging.getLogger(__name__)


@attrs.frozen
class GenerationRequest:
    """One prompt to continue. ``max_tokens`` is already clamped to the context."""

    tokens: list[int]
    sampling: Sampling
    max_tokens: int
    #: The client's stop strings: a match is reported as ``stop_sequence``.
    stops: tuple[str, ...] = ()
    #: End-of-turn strings the chat template implies.
    template_stops: tuple[str, ...] = ()


@attrs.frozen
class Delta:
    text: str


@attrs.frozen
class Done:
    finish_reason: str
    #: The client stop string that ended the output, if one did.
    stop_sequence: str | None
    prompt_tokens: int
    completion_tokens: int
    #: Seconds from the first generated token to the last.
    decode_seconds: float
    #: Seconds from the start of the job's thread to its first token.
    first_token_seconds: float | None


@attrs.frozen
class Failed:
    message: str


Event = Delta | Done | Failed


class Job:
    """A request on its way through a worker; the caller reads ``events``."""

    def __init__(self, request: GenerationRequest, *, buffer: int = 64) -> None:
        self.request = request
        self._send, self.events = trio.open_memory_channel[Event](buffer)
        self.scope = trio.CancelScope()
        self.started = trio.Event()

    def cancel(self) -> None:
        self.scope.cancel()


@attrs.frozen
class WorkerStatistics:
    queued: int
    in_flight: int
    last_used: float | None
    tokens_generated: int


class GenerationWorker:
    """Serves one model's jobs in turn. Start with ``nursery.start(worker.run)``."""

    def __init__(self, model: LoadedModel, *, queue_limit: int = 64) -> None:
        self.model = model
        self.limiter = trio.CapacityLimiter(1)
        self._send, self._receive = trio.open_memory_channel[Job](max(0, queue_limit))
        self._current: Job | None = None
        self._cancel_all = False
        self._last_used: float | None = None
        self._tokens_generated = 0

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            queued=self._send.statistics().current_buffer_used,
            in_flight=0 if self._current is None else 1,
            last_used=self._last_used,
            tokens_generated=self._tokens_generated,
        )

    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
          QueueFull: the model's queue is at its limit.
          Unavailable: the model is being unloaded.
        """
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            raise QueueFull(
                f"model {self.model.model_id!r} has {self._send.statistics().current_buffer_used} "
                "requests waiting; retry later",
                retry_after=1,
            ) from None
        except trio.ClosedResourceError:
            raise Unavailable(f"model {self.model.model_id!r} is unloading") from None

    def close(self, *, cancel: bool) -> int:
        """Accept no more jobs; with ``cancel``, also cancel the queued and running ones.

        Returns the number of jobs cancelled. ``run`` returns once the queue is empty.
        """
        self._send.close()
        if not cancel:
            return 0
        self._cancel_all = True
        cancelled = self._send.statistics().current_buffer_used
        if self._current is not None:
            self._current.cancel()
            cancelled += 1
        return cancelled

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._receive:
            async for job in self._receive:
                if self._cancel_all:
                    job.cancel()
                self._current = job
                try:
                    await self._serve(job)
                finally:
                    self._current = None
                    self._last_used = time.time()

    async def _serve(self, job: Job) -> None:
        async with job._send:
            with job.scope:
                job.started.set()
                try:
                    await trio.to_thread.run_sync(self._generate, job, limiter=self.limiter)
                except trio.Cancelled:
                    raise
                except Exception as exc:
                    log.exception("generation failed for %s", self.model.model_id)
                    with trio.move_on_after(1):
                        await job._send.send(
                            Failed(f"generation failed: {type(exc).__name__}: {exc}")
                        )

    def _generate(self, job: Job) -> None:
        """The decode loop; runs in a worker thread."""
        request = job.request
        scanner = StopScanner(request.stops + request.template_stops)
        emitted = 0
        finish = "length"
        started = time.perf_counter()
        first_token: float | None = None

        def emit(event: Event) -> None:
            trio.from_thread.run(job._send.send, event)

        generator = self.model.generate(request.tokens, request.sampling)
        try:
            if request.max_tokens > 0:
                for token in generator:
                    if first_token is None:
                        first_token = time.perf_counter()
                    emitted += 1
                    text = scanner.feed(token.piece)
                    if text:
                        emit(Delta(text))
                    else:
                        trio.from_thread.check_cancelled()
                    if scanner.matched is not None:
                        finish = "stop"
                        break
                    if emitted >= request.max_tokens:
                        break
                else:
                    # The engine ends at end-of-generation, or when the context is full.
                    full = len(request.tokens) + emitted >= self.model.n_ctx
                    finish = "length" if full else "stop"
        finally:
            generator.close()
            self._tokens_generated += emitted
        if scanner.matched is None:
            tail = scanner.flush()
            if tail:
                emit(Delta(tail))
        ended = time.perf_counter()
        stop_sequence = scanner.matched if scanner.matched in request.stops else None
        emit(
            Done(
                finish_reason=finish,
                stop_sequence=stop_sequence,
                prompt_tokens=len(request.tokens),
                completion_tokens=emitted,
                decode_seconds=ended - first_token if first_token is not None else 0.0,
                first_token_seconds=None if first_token is None else first_token - started,
            )
        )


async def collect(job: Job) -> tuple[str, Done]:
    """Read a job to its end; the whole text and how it finished."""
    parts: list[str] = []
    async with job.events:
        async for event in job.events:
            if isinstance(event, Delta):
                parts.append(event.text)
            elif isinstance(event, Done):
                return "".join(parts), event
            else:
                raise GenerationFailed(event.message)
    raise GenerationFailed("generation ended without a result")


class GenerationFailed(ServiceError):
    """The engine failed while generating."""


def tokens_per_second(done: Done) -> float:
    # The first token's time belongs to prompt processing; decode speed is over the rest.
    if done.completion_tokens < 2 or done.decode_seconds <= 0:
        return math.nan
    return (done.completion_tokens - 1) / done.decode_seconds
